/* Ground truth for the netlink process watch (tracer/process/netlink.py): a peak
 * RSS the process no longer has when it exits, and a known exit status.
 *
 * usage: netlink_peak MODE
 *   single    touch 64 MiB, free it, exit(3) from main
 *   threads   four workers parked in pause(); main touches and frees
 *             64 MiB, then calls exit(3) while they still run
 *   leader    main pthread_exit()s first; the last worker touches and frees
 *             64 MiB and calls exit(3): the leader's exit is not the
 *             process's
 * It prints "ready", then waits for a line (or EOF) on stdin, so a watcher
 * can subscribe after its exec and before it runs; before exiting it prints
 * "rss_bytes N", its RSS then.
 */
#include "common.h"

#include <sys/mman.h>

#define PEAK_BYTES (64L * 1024 * 1024)
#define WORKERS 4

static pthread_barrier_t parked;

static void print_rss(void)
{
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/thread-self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2)
        die("/proc/thread-self/statm");
    fclose(f);
    printf("rss_bytes %ld\n", resident * sysconf(_SC_PAGESIZE));
    fflush(stdout);
}

/* mmap, not malloc: the free must give the pages back whatever the malloc
 * thresholds are, so the RSS at exit is well under the peak. */
static void touch_and_free(void)
{
    char *p = mmap(NULL, PEAK_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    memset(p, 1, PEAK_BYTES);
    if (munmap(p, PEAK_BYTES) != 0)
        die("munmap");
}

static void *idle_worker(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&parked);
    for (;;)
        pause();
    return NULL;
}

static void *last_worker(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&parked);
    usleep(100 * 1000); /* let main's pthread_exit land first */
    touch_and_free();
    print_rss();
    exit(3);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s single|threads|leader\n", argv[0]);
        return 64;
    }
    const char *mode = argv[1];
    printf("ready\n");
    fflush(stdout);
    for (int c = getchar(); c != EOF && c != '\n'; c = getchar())
        ;
    if (strcmp(mode, "single") == 0) {
        touch_and_free();
        print_rss();
        exit(3);
    }
    int leader = strcmp(mode, "leader") == 0;
    if (!leader && strcmp(mode, "threads") != 0) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 64;
    }
    pthread_t threads[WORKERS];
    pthread_barrier_init(&parked, NULL, WORKERS + 1);
    for (int i = 0; i < WORKERS; i++) {
        void *(*fn)(void *) = leader && i == WORKERS - 1 ? last_worker : idle_worker;
        if (pthread_create(&threads[i], NULL, fn, NULL) != 0)
            die("pthread_create");
    }
    pthread_barrier_wait(&parked);
    if (leader)
        pthread_exit(NULL);
    touch_and_free();
    print_rss();
    exit(3);
}
