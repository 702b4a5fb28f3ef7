/* A service-like target for bench/soak.py: worker threads come and go, each
 * serving a few hundred "requests" before it exits; they malloc, calloc,
 * realloc and free blocks of 16 B to 256 KiB, hand some to a shared cache
 * (freed later by another thread), and map, touch, protect and unmap
 * anonymous memory. Every block carries a pattern derived from its seed,
 * checked before it is freed and after every realloc (the kept prefix):
 * a tracer that disturbed the process shows up as mismatches.
 *
 *   soak_target SECONDS EXEC_AT RESULTS [PHASE]
 *
 * Runs SECONDS in all. At EXEC_AT seconds it stops its workers, drains the
 * cache, appends its figures to RESULTS and execs itself once (phase 2) for
 * the rest of the time. Each phase appends one JSON line to RESULTS; the
 * exit status is 0 when no check failed.
 *
 * Built by bench/soak.py with -O2 -fno-builtin so no malloc/free pair is
 * optimised away. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 6          /* alive at once */
#define LOCAL_SLOTS 32     /* blocks a worker holds */
#define CACHE_SLOTS 2048   /* blocks shared between workers */
#define BATCH 8            /* ops between two 2 ms pauses: a modest load */

struct block {
	size_t size;
	uint64_t seed;
	unsigned char data[];
};

static struct {
	atomic_ullong mallocs, callocs, reallocs, frees, maps, requests, threads, checked_bytes,
		mismatches;
} stats;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct block *cache[CACHE_SLOTS];
static atomic_int stopping;

static uint64_t next_random(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned char pattern(uint64_t seed, size_t i)
{
	return (unsigned char)((seed >> (i % 7 * 8)) + i * 131);
}

static void fill(struct block *b, size_t from)
{
	for (size_t i = from; i < b->size; i++)
		b->data[i] = pattern(b->seed, i);
}

static void check(const struct block *b, size_t upto)
{
	size_t bad = 0;
	for (size_t i = 0; i < upto; i++)
		bad += b->data[i] != pattern(b->seed, i);
	if (bad)
		atomic_fetch_add(&stats.mismatches, 1);
	atomic_fetch_add_explicit(&stats.checked_bytes, upto, memory_order_relaxed);
}

static size_t random_size(uint64_t *s)
{
	uint64_t r = next_random(s) % 100;
	if (r < 75)
		return 16 + next_random(s) % 512;
	if (r < 99)
		return 512 + next_random(s) % 4096;
	return 65536 + next_random(s) % (192 * 1024); /* some above the mmap threshold */
}

static struct block *new_block(uint64_t *s)
{
	size_t size = random_size(s);
	struct block *b;
	if (next_random(s) % 8 == 0) {
		b = calloc(1, sizeof *b + size);
		atomic_fetch_add_explicit(&stats.callocs, 1, memory_order_relaxed);
		if (b) {
			for (size_t i = 0; i < size; i++)
				if (b->data[i])
					atomic_fetch_add(&stats.mismatches, 1);
		}
	} else {
		b = malloc(sizeof *b + size);
		atomic_fetch_add_explicit(&stats.mallocs, 1, memory_order_relaxed);
	}
	if (!b) {
		perror("malloc");
		exit(3);
	}
	b->size = size;
	b->seed = next_random(s) | 1;
	fill(b, 0);
	return b;
}

static void drop_block(struct block *b)
{
	if (!b)
		return;
	check(b, b->size);
	free(b);
	atomic_fetch_add_explicit(&stats.frees, 1, memory_order_relaxed);
}

static struct block *grow_or_shrink(struct block *b, uint64_t *s)
{
	size_t size = random_size(s);
	size_t kept = size < b->size ? size : b->size;
	struct block *n = realloc(b, sizeof *b + size);
	atomic_fetch_add_explicit(&stats.reallocs, 1, memory_order_relaxed);
	if (!n) {
		perror("realloc");
		exit(3);
	}
	n->size = size;
	check(n, kept);
	fill(n, kept);
	return n;
}

static void map_churn(uint64_t *s)
{
	size_t pages = 16 + next_random(s) % 240;
	size_t len = pages * 4096;
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(3);
	}
	atomic_fetch_add_explicit(&stats.maps, 1, memory_order_relaxed);
	uint64_t seed = next_random(s);
	for (size_t i = 0; i < pages; i++)
		p[i * 4096] = (unsigned char)(seed + i);
	mprotect(p, len, PROT_READ);
	for (size_t i = 0; i < pages; i++)
		if (p[i * 4096] != (unsigned char)(seed + i))
			atomic_fetch_add(&stats.mismatches, 1);
	munmap(p, len);
}

struct worker {
	pthread_t thread;
	uint64_t seed;
	atomic_int done;
};

static void serve_request(struct block **local, uint64_t *s)
{
	int ops = 50 + next_random(s) % 200;
	for (int k = 0; k < ops; k++) {
		uint64_t op = next_random(s) % 1000;
		struct block **slot = &local[next_random(s) % LOCAL_SLOTS];
		if (op < 550) {
			drop_block(*slot);
			*slot = new_block(s);
		} else if (op < 800) {
			if (*slot)
				*slot = grow_or_shrink(*slot, s);
		} else if (op < 995) {
			/* into the shared cache: whatever it evicts was made by another thread */
			struct block *b = new_block(s), *old;
			pthread_mutex_lock(&cache_lock);
			size_t i = next_random(s) % CACHE_SLOTS;
			old = cache[i];
			cache[i] = b;
			pthread_mutex_unlock(&cache_lock);
			drop_block(old);
		} else {
			map_churn(s);
		}
		if (k % BATCH == BATCH - 1) {
			struct timespec pause = {0, 2000000};
			nanosleep(&pause, NULL);
		}
	}
	atomic_fetch_add_explicit(&stats.requests, 1, memory_order_relaxed);
}

static void *work(void *arg)
{
	struct worker *w = arg;
	struct block *local[LOCAL_SLOTS] = {0};
	uint64_t s = w->seed;
	char name[16];
	snprintf(name, sizeof name, "worker-%llu", (unsigned long long)(w->seed % 100));
	pthread_setname_np(pthread_self(), name);
	int requests = 20 + next_random(&s) % 80; /* a thread lives for about a second */
	for (int r = 0; r < requests && !atomic_load(&stopping); r++)
		serve_request(local, &s);
	for (int i = 0; i < LOCAL_SLOTS; i++)
		drop_block(local[i]);
	atomic_store(&w->done, 1);
	return NULL;
}

static void start(struct worker *w, uint64_t *s)
{
	w->seed = next_random(s);
	atomic_store(&w->done, 0);
	if (pthread_create(&w->thread, NULL, work, w)) {
		perror("pthread_create");
		exit(3);
	}
	atomic_fetch_add_explicit(&stats.threads, 1, memory_order_relaxed);
}

static void write_results(const char *path, int phase, double seconds)
{
	FILE *f = fopen(path, "a");
	if (!f) {
		perror(path);
		exit(3);
	}
	fprintf(f,
		"{\"phase\": %d, \"pid\": %d, \"seconds\": %.1f, \"threads\": %llu, \"requests\": %llu, "
		"\"mallocs\": %llu, \"callocs\": %llu, \"reallocs\": %llu, \"frees\": %llu, \"maps\": %llu, "
		"\"checked_bytes\": %llu, \"mismatches\": %llu}\n",
		phase, getpid(), seconds, stats.threads, stats.requests, stats.mallocs, stats.callocs,
		stats.reallocs, stats.frees, stats.maps, stats.checked_bytes, stats.mismatches);
	fclose(f);
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s SECONDS EXEC_AT RESULTS [PHASE]\n", argv[0]);
		return 2;
	}
	double seconds = atof(argv[1]), exec_at = atof(argv[2]);
	const char *results = argv[3];
	int phase = argc > 4 ? atoi(argv[4]) : 1;
	double begin = now_s();
	double until = begin + (phase == 1 && exec_at > 0 && exec_at < seconds ? exec_at : seconds);
	uint64_t s = 0x9E3779B97F4A7C15ull ^ (uint64_t)phase;
	struct worker workers[WORKERS];
	for (int i = 0; i < WORKERS; i++)
		start(&workers[i], &s);
	while (now_s() < until) {
		struct timespec tick = {0, 5000000};
		nanosleep(&tick, NULL);
		for (int i = 0; i < WORKERS; i++) {
			if (atomic_load(&workers[i].done)) {
				pthread_join(workers[i].thread, NULL);
				start(&workers[i], &s);
			}
		}
	}
	atomic_store(&stopping, 1);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(workers[i].thread, NULL);
	for (int i = 0; i < CACHE_SLOTS; i++)
		drop_block(cache[i]);
	double ran = now_s() - begin;
	write_results(results, phase, ran);
	if (phase == 1 && ran < seconds) {
		char rest[32];
		snprintf(rest, sizeof rest, "%.3f", seconds - ran);
		char *again[] = {argv[0], rest, "0", (char *)results, "2", NULL};
		execv("/proc/self/exe", again);
		perror("execv");
		return 3;
	}
	return stats.mismatches ? 1 : 0;
}
