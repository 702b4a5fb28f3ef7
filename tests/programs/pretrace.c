/* Ground truth for frees of blocks allocated before the trace began.
 *
 * Thread "pretrace" allocates BEFORE_BLOCKS blocks from alloc_before(), then
 * the program writes OUT.ready and waits for SIGUSR1 (the test attaches
 * memtrace in between). After the signal the thread frees all of them
 * (memtrace never saw these allocations: untracked frees, not subtracted),
 * allocates AFTER_BLOCKS blocks of the same size from alloc_after() (glibc
 * hands back the addresses just freed) and frees every fourth one.
 * The program then writes OUT, waits for a second SIGUSR1 (the thread stays
 * alive until then) and exits 0.
 *
 * usage: pretrace OUT
 */
#include "common.h"

#define BEFORE_BLOCKS 50
#define AFTER_BLOCKS 80
#define BLOCK_SIZE 1000

static void *before[BEFORE_BLOCKS], *after[AFTER_BLOCKS];
static pthread_barrier_t parked, start, done, finish;
static long tid;
static struct tally traced;
static long untracked_frees;

__attribute__((noinline)) void *alloc_before(void)
{
    void *p = malloc(BLOCK_SIZE);
    if (!p)
        die("malloc");
    memset(p, 1, BLOCK_SIZE);
    return p;
}

__attribute__((noinline)) void *alloc_after(void)
{
    void *p = malloc(BLOCK_SIZE);
    if (!p)
        die("malloc");
    memset(p, 2, BLOCK_SIZE);
    tally_alloc(&traced, BLOCK_SIZE);
    return p;
}

static void *thread_main(void *arg)
{
    (void)arg;
    tid = current_tid();
    pthread_setname_np(pthread_self(), "pretrace");
    for (int i = 0; i < BEFORE_BLOCKS; i++)
        before[i] = alloc_before();
    pthread_barrier_wait(&parked);
    pthread_barrier_wait(&start);
    for (int i = 0; i < BEFORE_BLOCKS; i++) {
        free(before[i]);
        untracked_frees++;
    }
    for (int i = 0; i < AFTER_BLOCKS; i++)
        after[i] = alloc_after();
    for (int i = 0; i < AFTER_BLOCKS; i += 4) {
        free(after[i]);
        tally_free(&traced, BLOCK_SIZE);
    }
    /* stay alive until the test is done with the tracer */
    pthread_barrier_wait(&done);
    pthread_barrier_wait(&finish);
    return NULL;
}

int main(int argc, char **argv)
{
    char path[4200], tmp[4300];
    pthread_t thread;

    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT\n", argv[0]);
        return 64;
    }
    block_sigusr1();
    pthread_barrier_init(&parked, NULL, 2);
    pthread_barrier_init(&start, NULL, 2);
    pthread_barrier_init(&done, NULL, 2);
    pthread_barrier_init(&finish, NULL, 2);
    if (pthread_create(&thread, NULL, thread_main, NULL) != 0)
        die("pthread_create");
    pthread_barrier_wait(&parked);

    snprintf(path, sizeof path, "%s.ready", argv[1]);
    FILE *f = open_truth(path, tmp, sizeof tmp);
    fprintf(f, "%d\n", (int)getpid());
    publish_file(f, tmp, path);
    wait_sigusr1();

    pthread_barrier_wait(&start);
    pthread_barrier_wait(&done);
    f = open_truth(argv[1], tmp, sizeof tmp);
    fprintf(f, "{\"pid\": %d, \"untracked_free_count\": %ld, \"threads\": [\n"
               "  {\"tid\": %ld, \"name\": \"pretrace\", ",
            (int)getpid(), untracked_frees, tid);
    tally_json(f, &traced);
    fprintf(f, "}],\n \"functions\": {\"alloc_after\": {");
    tally_json(f, &traced);
    fprintf(f, "}}}\n");
    publish_file(f, tmp, argv[1]);
    wait_sigusr1();
    pthread_barrier_wait(&finish);
    pthread_join(thread, NULL);
    return 0;
}
