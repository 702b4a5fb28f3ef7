/* Fill glibc arenas with fragmented free memory and print the ground truth
 * that tests/integration/test_glibc_arenas.py checks memtrace against.
 *
 *   arenas [THREADS [MIB_PER_THREAD [MIB_THREAD0]]]     (defaults 4 40 90)
 *
 * Each thread (own arena: the threads stay alive together) allocates blocks
 * of 1-32 KiB until it requested its MiB, touches them, frees 90 % in a
 * shuffled order (every 10th block stays, pinning the free runs between
 * them), then frees 20 tiny blocks: 7 go to its tcache, 13 to a fastbin.
 * Thread 0 asks for more than one 64 MiB heap. The main thread does the
 * same with 8 MiB on the brk heap.
 *
 * Output (stdout, line-buffered, key=value):
 *   thread index=I arena=0x.. heap=0x.. live_bytes=N chunk_bytes=N ...
 *     (arena=0x0 heap=0x0: the thread was given main_arena, M_ARENA_MAX)
 *   main arena=main live_bytes=N chunk_bytes=N ...
 *   malloc_info's XML (per-arena sizes in glibc's own words)
 *   ready rss=N
 * then reads commands on stdin: "trim" runs malloc_trim(0) and prints
 *   trimmed rss_before=N rss_after=N result=R
 * "churn" sets every thread mallocing and freeing nonstop (to read a busy
 * target), "crowd" maps 1 MiB just below each thread heap, the way a
 * full heap lies below the next one glibc places right after it (read and
 * write, MAP_NORESERVE: the kernel merges the two into one mapping), and
 * prints
 *   crowded heaps=N    (N: heaps with a free gap below them to take)
 * and "exit" (or EOF) ends the program.
 *
 * Nothing here allocates behind the test's back once "ready" is printed:
 * stdout has a static buffer, stdin and /proc are read with read(2), and
 * the pointer arrays are mmap'd.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define HEAP_MAX_SIZE (64UL << 20)
#define MIN_BLOCK 1024
#define MAX_BLOCK (32 * 1024)
#define KEEP_EVERY 10
#define TINY_BLOCKS 20
#define TINY_SIZE 40

struct truth {
    uintptr_t arena, heap, last_heap;
    size_t blocks, kept, live_bytes, chunk_bytes;
};

static char stdout_buffer[1 << 16];
static struct truth truths[64];
static size_t mib_of[64];
static pthread_barrier_t done;
static pthread_mutex_t hold = PTHREAD_MUTEX_INITIALIZER;

static uint64_t next_random(uint64_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return *state >> 33;
}

static void *map_array(size_t count)
{
    void *p = mmap(NULL, count * sizeof(void *), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

/* The arena owning a pointer, the way glibc finds it: a chunk flagged
 * NON_MAIN_ARENA lies in a 64 MiB-aligned heap whose heap_info starts with
 * its arena's address; any other chunk is main_arena's (reported as 0). */
static int in_thread_arena(void *p) { return ((size_t *)p)[-1] & 0x4; }
static uintptr_t heap_of(void *p)
{
    return in_thread_arena(p) ? (uintptr_t)p & ~(HEAP_MAX_SIZE - 1) : 0;
}
static uintptr_t arena_of(void *p) { return in_thread_arena(p) ? *(uintptr_t *)heap_of(p) : 0; }

static void fill_and_fragment(size_t mib, uint64_t seed, struct truth *t)
{
    size_t target = mib << 20, requested = 0, n = 0;
    size_t cap = target / MIN_BLOCK + 1;
    char **blocks = map_array(cap);
    size_t *order = map_array(cap);

    while (requested < target) {
        size_t size = MIN_BLOCK + next_random(&seed) % (MAX_BLOCK - MIN_BLOCK + 1);
        blocks[n] = malloc(size);
        memset(blocks[n], 0xa5, size);
        requested += size;
        n++;
    }
    size_t freeing = 0;
    for (size_t i = 0; i < n; i++)
        if (i % KEEP_EVERY)
            order[freeing++] = i;
    for (size_t i = freeing; i > 1; i--) {
        size_t j = next_random(&seed) % i, tmp = order[i - 1];
        order[i - 1] = order[j];
        order[j] = tmp;
    }
    for (size_t i = 0; i < freeing; i++) {
        free(blocks[order[i]]);
        blocks[order[i]] = NULL;
    }
    t->blocks = n;
    for (size_t i = 0; i < n; i += KEEP_EVERY) {
        t->kept++;
        t->live_bytes += malloc_usable_size(blocks[i]);
        t->chunk_bytes += malloc_usable_size(blocks[i]) + sizeof(size_t);
    }
    t->heap = heap_of(blocks[0]);
    t->last_heap = heap_of(blocks[(n - 1) / KEEP_EVERY * KEEP_EVERY]);
    t->arena = arena_of(blocks[0]);
}

/* Allocate and free forever, in a ring of live blocks, until _exit. */
static void churn(uint64_t seed)
{
    enum { SLOTS = 512 };
    char *slots[SLOTS] = {0};
    for (;;) {
        size_t i = next_random(&seed) % SLOTS;
        free(slots[i]);
        size_t size = 16 + next_random(&seed) % (64 * 1024);
        slots[i] = malloc(size);
        slots[i][0] = 1;
    }
}

static void *worker(void *arg)
{
    size_t index = (size_t)arg;
    struct truth *t = &truths[index];
    void *tiny[TINY_BLOCKS];

    fill_and_fragment(mib_of[index], 1000 + index, t);
    for (int i = 0; i < TINY_BLOCKS; i++)
        tiny[i] = malloc(TINY_SIZE);
    for (int i = 0; i < TINY_BLOCKS; i++)
        free(tiny[i]);
    pthread_barrier_wait(&done);
    /* Stay alive so no arena goes back on glibc's free list. */
    pthread_mutex_lock(&hold);
    pthread_mutex_unlock(&hold);
    churn(2000 + index);
    return NULL;
}

static long rss_bytes(void)
{
    char buf[128];
    int fd = open("/proc/self/statm", O_RDONLY);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    long size, resident;
    if (sscanf(buf, "%ld %ld", &size, &resident) != 2)
        return -1;
    return resident * sysconf(_SC_PAGESIZE);
}

/* 1 if [heap - 1 MiB, heap) was free and now merges with the heap's head. */
static int crowd(uintptr_t heap)
{
    size_t size = 1 << 20;
    void *p = mmap((void *)(heap - size), size, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    if (p != (void *)(heap - size)) { /* a kernel without MAP_FIXED_NOREPLACE */
        munmap(p, size);
        return 0;
    }
    /* Made writable afterwards, as glibc grows a heap: that is when the
     * kernel merges it with its neighbour. */
    mprotect(p, size, PROT_READ | PROT_WRITE);
    memset(p, 0x5a, size);
    return 1;
}

static int read_command(char *buf, size_t cap)
{
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(0, buf + n, 1);
        if (r <= 0)
            return -1;
        if (buf[n] == '\n')
            break;
        n++;
    }
    buf[n] = 0;
    return 0;
}

int main(int argc, char **argv)
{
    size_t threads = argc > 1 ? strtoul(argv[1], NULL, 10) : 4;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 40;
    size_t mib0 = argc > 3 ? strtoul(argv[3], NULL, 10) : 90;
    if (threads < 1 || threads > 63) {
        fprintf(stderr, "arenas: THREADS must be 1..63\n");
        return 1;
    }
    setvbuf(stdout, stdout_buffer, _IOLBF, sizeof stdout_buffer);
    printf("start pid=%d threads=%zu\n", getpid(), threads);

    struct truth *main_truth = &truths[63];
    fill_and_fragment(8, 7, main_truth);

    for (size_t i = 0; i < threads; i++)
        mib_of[i] = i == 0 ? mib0 : mib;
    pthread_barrier_init(&done, NULL, threads + 1);
    pthread_mutex_lock(&hold);
    pthread_t tids[64];
    for (size_t i = 0; i < threads; i++)
        if (pthread_create(&tids[i], NULL, worker, (void *)i) != 0) {
            fprintf(stderr, "arenas: pthread_create failed\n");
            return 1;
        }
    pthread_barrier_wait(&done);

    for (size_t i = 0; i < threads; i++) {
        struct truth *t = &truths[i];
        printf("thread index=%zu arena=%#lx heap=%#lx blocks=%zu kept=%zu live_bytes=%zu "
               "chunk_bytes=%zu tiny_freed=%d tiny_chunk=%zu\n",
               i, (unsigned long)t->arena, (unsigned long)t->heap, t->blocks, t->kept,
               t->live_bytes, t->chunk_bytes, TINY_BLOCKS,
               (size_t)((TINY_SIZE + sizeof(size_t) + 15) & ~15UL));
    }
    printf("main arena=main blocks=%zu kept=%zu live_bytes=%zu chunk_bytes=%zu\n",
           main_truth->blocks, main_truth->kept, main_truth->live_bytes, main_truth->chunk_bytes);
    malloc_info(0, stdout);
    printf("ready rss=%ld\n", rss_bytes());

    char command[64];
    while (read_command(command, sizeof command) == 0) {
        if (strcmp(command, "trim") == 0) {
            long before = rss_bytes();
            int result = malloc_trim(0);
            long after = rss_bytes();
            printf("trimmed rss_before=%ld rss_after=%ld result=%d\n", before, after, result);
        } else if (strcmp(command, "churn") == 0) {
            pthread_mutex_unlock(&hold);
            printf("churning\n");
        } else if (strcmp(command, "crowd") == 0) {
            int crowded = 0;
            for (size_t i = 0; i < threads; i++) {
                if (truths[i].heap)
                    crowded += crowd(truths[i].heap);
                if (truths[i].last_heap && truths[i].last_heap != truths[i].heap)
                    crowded += crowd(truths[i].last_heap);
            }
            printf("crowded heaps=%d\n", crowded);
        } else if (strcmp(command, "exit") == 0) {
            break;
        }
    }
    _exit(0);
}
