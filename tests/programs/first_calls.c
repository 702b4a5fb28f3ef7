/* The first calls of a launched program, made as soon as it can: main
 * starts its threads at once, and each allocates FIRST_BLOCKS blocks of
 * FIRST_SIZE bytes from first_call() and keeps them. Those calls come a
 * fraction of a millisecond after ld.so has mapped libc; walked before
 * libc's unwind table is in place, their stacks stop at start_thread
 * instead of going on to clone3 (collect/launchhold.py).
 *
 * usage: first_calls */
#include "common.h"

#define THREADS 4
#define FIRST_BLOCKS 3
#define FIRST_SIZE 7001

static void *kept[THREADS][FIRST_BLOCKS];

__attribute__((noinline)) static void *first_call(void)
{
    void *p = malloc(FIRST_SIZE);
    if (!p)
        die("malloc");
    memset(p, 1, FIRST_SIZE);
    return p;
}

static void *thread_main(void *arg)
{
    long k = (long)arg;
    for (int i = 0; i < FIRST_BLOCKS; i++)
        kept[k][i] = first_call();
    return NULL;
}

int main(void)
{
    pthread_t threads[THREADS];
    for (long k = 0; k < THREADS; k++)
        if (pthread_create(&threads[k], NULL, thread_main, (void *)k) != 0)
            die("pthread_create");
    for (int k = 0; k < THREADS; k++)
        pthread_join(threads[k], NULL);
    return 0;
}
