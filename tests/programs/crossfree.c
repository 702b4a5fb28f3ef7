/* Ground truth for frees made by another thread.
 *
 * Thread "owner" allocates BLOCKS blocks from alloc_in_owner(); thread
 * "freer" then frees FREED of them from free_from_other(). memtrace must
 * charge those frees to the owner thread and the owner's stack: the freer
 * itself allocates nothing.
 *
 * usage: crossfree OUT [--hold-ms N]
 *   --hold-ms  keep both threads alive N ms after OUT is written
 */
#include "common.h"

#include <time.h>

#define BLOCKS 120
#define FREED 45
#define BLOCK_SIZE 3000

static void *blocks[BLOCKS];
static pthread_barrier_t allocated, done, finish;
static long owner_tid, freer_tid;
static struct tally owner;

__attribute__((noinline)) void *alloc_in_owner(int i)
{
    void *p = malloc(BLOCK_SIZE);
    if (!p)
        die("malloc");
    memset(p, i & 0xff, BLOCK_SIZE);
    tally_alloc(&owner, BLOCK_SIZE);
    return p;
}

__attribute__((noinline)) void free_from_other(int i)
{
    free(blocks[i]);
    blocks[i] = NULL;
    tally_free(&owner, BLOCK_SIZE);
}

static void *owner_main(void *arg)
{
    (void)arg;
    owner_tid = current_tid();
    pthread_setname_np(pthread_self(), "owner");
    for (int i = 0; i < BLOCKS; i++)
        blocks[i] = alloc_in_owner(i);
    pthread_barrier_wait(&allocated);
    pthread_barrier_wait(&done);
    pthread_barrier_wait(&finish);
    return NULL;
}

static void *freer_main(void *arg)
{
    (void)arg;
    freer_tid = current_tid();
    pthread_setname_np(pthread_self(), "freer");
    pthread_barrier_wait(&allocated);
    for (int i = 0; i < FREED; i++)
        free_from_other(i * BLOCKS / FREED);
    pthread_barrier_wait(&done);
    pthread_barrier_wait(&finish);
    return NULL;
}

int main(int argc, char **argv)
{
    char tmp[4200];
    pthread_t a, b;
    struct tally none = {0};
    long hold_ms = 0;

    if (argc == 4 && strcmp(argv[2], "--hold-ms") == 0)
        hold_ms = atol(argv[3]);
    else if (argc != 2) {
        fprintf(stderr, "usage: %s OUT [--hold-ms N]\n", argv[0]);
        return 64;
    }
    pthread_barrier_init(&allocated, NULL, 2);
    pthread_barrier_init(&done, NULL, 3);
    pthread_barrier_init(&finish, NULL, 3);
    if (pthread_create(&a, NULL, owner_main, NULL) != 0 ||
        pthread_create(&b, NULL, freer_main, NULL) != 0)
        die("pthread_create");
    pthread_barrier_wait(&done);

    FILE *f = open_truth(argv[1], tmp, sizeof tmp);
    fprintf(f, "{\"pid\": %d, \"threads\": [\n  {\"tid\": %ld, \"name\": \"owner\", ",
            (int)getpid(), owner_tid);
    tally_json(f, &owner);
    fprintf(f, "},\n  {\"tid\": %ld, \"name\": \"freer\", ", freer_tid);
    tally_json(f, &none);
    fprintf(f, "}],\n \"functions\": {\"alloc_in_owner\": {");
    tally_json(f, &owner);
    fprintf(f, "}}}\n");
    publish_file(f, tmp, argv[1]);
    if (hold_ms > 0) {
        struct timespec ts = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    pthread_barrier_wait(&finish);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    return 0;
}
