/* Many threads, each allocating a little now and then: the target of
 * bench/threads.py. Each thread keeps a small stack (64 KiB) and its own
 * guard page, so the process has two mappings per thread; each mallocs a
 * block of its own size every ~100 ms and frees it at the next.
 *
 * usage: many_threads [N]   (default 2000; runs until killed) */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void *worker(void *arg)
{
    long k = (long)arg;
    for (;;) {
        char *volatile block = malloc(64 + k % 512);
        block[0] = 1;
        usleep(100000 + k % 1000);
        free(block);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, worker, (void *)i) != 0) {
            perror("pthread_create");
            return 1;
        }
    }
    pause();
    return 0;
}
