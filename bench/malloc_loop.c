/* A malloc-heavy workload that stays alive between runs, so tracers can be
 * attached to and detached from one process while it is measured.
 *
 *   malloc_loop            prints "ready PID", then reads commands on stdin:
 *   run MODE THREADS SECONDS   runs MODE on THREADS threads for SECONDS,
 *                              prints "ops N seconds S"
 *   quit                       exits
 *
 * One op is one malloc and one free (mode large: one malloc; one in ten
 * blocks is kept live in a ring and freed when the ring wraps).
 *   fixed64  malloc(64) + free: the tcache fast path, the worst case for a
 *            tracer (most calls per second)
 *   mixed    16 B - 4 KiB, 64 blocks live per thread, freed in random order
 *   large    32 KiB - 512 KiB, 10 % kept live (ring of 32 per thread)
 *   deep     fixed64 under DEEP_FRAMES frames built with frame pointers:
 *            what a stack walk costs per frame (bench/prog_cost.py)
 *
 * Built by bench/overhead.py with -O2 -fno-builtin so the compiler cannot
 * drop a malloc/free pair. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64
#define MIXED_SLOTS 64
#define LARGE_KEPT 32
#define DEEP_FRAMES 24

enum mode { FIXED64, MIXED, LARGE, DEEP };

static atomic_int stop;

struct worker {
	pthread_t thread;
	enum mode mode;
	uint64_t seed;
	uint64_t ops;
};

static inline uint64_t next_random(uint64_t *s)
{
	/* xorshift64: cheap next to malloc, and the same sequence every run */
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void run_fixed64(struct worker *w)
{
	uint64_t ops = 0;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		volatile char *p = malloc(64);
		p[0] = (char)ops;
		free((void *)p);
		ops++;
	}
	w->ops = ops;
}

static void run_mixed(struct worker *w)
{
	char *slot[MIXED_SLOTS] = {0};
	uint64_t ops = 0;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		uint64_t r = next_random(&w->seed);
		unsigned i = r % MIXED_SLOTS;
		free(slot[i]);
		slot[i] = malloc(16 + (r >> 8) % (4096 - 16 + 1));
		slot[i][0] = (char)ops;
		ops++;
	}
	for (unsigned i = 0; i < MIXED_SLOTS; i++)
		free(slot[i]);
	w->ops = ops;
}

static void run_large(struct worker *w)
{
	char *kept[LARGE_KEPT] = {0};
	unsigned next = 0;
	uint64_t ops = 0;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		uint64_t r = next_random(&w->seed);
		size_t size = (32 << 10) + (r >> 8) % ((512 << 10) - (32 << 10) + 1);
		char *p = malloc(size);
		p[0] = p[size - 1] = (char)ops;
		if (r % 10 == 0) {
			free(kept[next]);
			kept[next] = p;
			next = (next + 1) % LARGE_KEPT;
		} else {
			free(p);
		}
		ops++;
	}
	for (unsigned i = 0; i < LARGE_KEPT; i++)
		free(kept[i]);
	w->ops = ops;
}

/* Frame pointers here only: the other modes keep the build's defaults. */
__attribute__((noinline, optimize("no-omit-frame-pointer")))
static void run_deep(struct worker *w, int depth)
{
	if (depth > 0) {
		run_deep(w, depth - 1);
		__asm__ volatile("" ::: "memory"); /* no tail call: keep the frame */
		return;
	}
	uint64_t ops = 0;
	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		volatile char *p = malloc(64);
		p[0] = (char)ops;
		free((void *)p);
		ops++;
	}
	w->ops = ops;
}

static void *work(void *arg)
{
	struct worker *w = arg;
	switch (w->mode) {
	case FIXED64:
		run_fixed64(w);
		break;
	case MIXED:
		run_mixed(w);
		break;
	case LARGE:
		run_large(w);
		break;
	case DEEP:
		run_deep(w, DEEP_FRAMES);
		break;
	}
	return NULL;
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int run(const char *mode_name, int threads, double seconds)
{
	static struct worker workers[MAX_THREADS];
	enum mode mode;

	if (!strcmp(mode_name, "fixed64"))
		mode = FIXED64;
	else if (!strcmp(mode_name, "mixed"))
		mode = MIXED;
	else if (!strcmp(mode_name, "large"))
		mode = LARGE;
	else if (!strcmp(mode_name, "deep"))
		mode = DEEP;
	else
		return -1;
	if (threads < 1 || threads > MAX_THREADS || seconds <= 0)
		return -1;

	atomic_store(&stop, 0);
	double start = now();
	for (int i = 0; i < threads; i++) {
		workers[i] = (struct worker){.mode = mode, .seed = 0x9e3779b97f4a7c15ull + i};
		if (pthread_create(&workers[i].thread, NULL, work, &workers[i]))
			return -1;
	}
	struct timespec nap = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
	nanosleep(&nap, NULL);
	atomic_store(&stop, 1);
	uint64_t ops = 0;
	for (int i = 0; i < threads; i++) {
		pthread_join(workers[i].thread, NULL);
		ops += workers[i].ops;
	}
	printf("ops %llu seconds %.6f\n", (unsigned long long)ops, now() - start);
	fflush(stdout);
	return 0;
}

int main(void)
{
	char line[128], mode[32];
	int threads;
	double seconds;

	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	while (fgets(line, sizeof line, stdin)) {
		if (!strncmp(line, "quit", 4))
			break;
		if (sscanf(line, "run %31s %d %lf", mode, &threads, &seconds) != 3 ||
		    run(mode, threads, seconds) != 0) {
			printf("error bad command: %s", line);
			fflush(stdout);
		}
	}
	return 0;
}
