/* Shared by the ground-truth programs: each writes what it did, as JSON, to
 * a file named on its command line (memtrace owns stdout), and publishes it
 * by rename so a reader never sees half a file. */
#ifndef MEMTRACE_TEST_COMMON_H
#define MEMTRACE_TEST_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* glibc 2.36 has gettid(), but the raw syscall keeps older toolchains and
 * musl builds of these helpers working too. */
static inline long current_tid(void) { return syscall(SYS_gettid); }

static inline void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(99);
}

/* Counters in the same shape as memtrace's JSON. */
struct tally {
    long long alloc_bytes, free_bytes, alloc_count, free_count;
};

static inline void tally_alloc(struct tally *t, size_t n) { t->alloc_bytes += n; t->alloc_count++; }
static inline void tally_free(struct tally *t, size_t n) { t->free_bytes += n; t->free_count++; }

static inline void tally_json(FILE *f, const struct tally *t)
{
    fprintf(f, "\"live_bytes\": %lld, \"alloc_bytes\": %lld, \"free_bytes\": %lld, "
               "\"alloc_count\": %lld, \"free_count\": %lld",
            t->alloc_bytes - t->free_bytes, t->alloc_bytes, t->free_bytes,
            t->alloc_count, t->free_count);
}

/* Open PATH.tmp for the caller to fill; publish_file() renames it to PATH. */
static inline FILE *open_truth(const char *path, char *tmp, size_t tmp_len)
{
    snprintf(tmp, tmp_len, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        die("fopen");
    return f;
}

static inline void publish_file(FILE *f, const char *tmp, const char *path)
{
    if (fclose(f) != 0)
        die("fclose");
    if (rename(tmp, path) != 0)
        die("rename");
}

/* Block SIGUSR1 in the calling thread (and so in every thread it creates
 * afterwards) so that sigwait() can take it without a handler race. */
static inline void block_sigusr1(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0)
        die("pthread_sigmask");
}

static inline void wait_sigusr1(void)
{
    sigset_t set;
    int sig;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    if (sigwait(&set, &sig) != 0)
        die("sigwait");
}

#endif
