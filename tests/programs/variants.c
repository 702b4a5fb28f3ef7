/* Ground truth for every allocation entry point memtrace counts.
 *
 * One noinline function per variant, all run on a thread named "variants",
 * so both the per-function (frames[0]) and the per-thread totals are known
 * exactly. The semantics checked are memtrace's: realloc is a free of the
 * old block plus an alloc of the new one, realloc(NULL, n) is an alloc,
 * realloc(p, 0) a free, calloc counts nmemb * size, the aligned variants the
 * requested size, pvalloc the size rounded up to the page size.
 *
 * usage: variants OUT [--exit STATUS] [--hold-ms N]
 *   --exit     exit with STATUS (default 0) once OUT is written
 *   --hold-ms  stay alive N ms after OUT is written (threads stay alive)
 */
#include "common.h"

#include <malloc.h>
#include <time.h>

#define MAX_FUNCS 16

struct func {
    const char *name;
    struct tally t;
};

static struct func funcs[MAX_FUNCS];
static int n_funcs;
static struct tally thread_total;
static long variants_tid;

/* The blocks stay reachable so the compiler cannot drop an allocation. */
void *volatile kept[MAX_FUNCS * 2];
static int n_kept;

static struct tally *count_for(const char *name)
{
    for (int i = 0; i < n_funcs; i++)
        if (strcmp(funcs[i].name, name) == 0)
            return &funcs[i].t;
    funcs[n_funcs].name = name;
    return &funcs[n_funcs++].t;
}

static void counted_alloc(const char *fn, void *p, size_t n)
{
    if (!p)
        die(fn);
    memset(p, 0xab, n);
    kept[n_kept++] = p;
    tally_alloc(count_for(fn), n);
    tally_alloc(&thread_total, n);
}

static void counted_free(const char *fn, size_t n)
{
    tally_free(count_for(fn), n);
    tally_free(&thread_total, n);
}

__attribute__((noinline)) void use_calloc(void)
{
    counted_alloc(__func__, calloc(3, 1000), 3 * 1000);
}

__attribute__((noinline)) void realloc_grow(void)
{
    void *p = malloc(100);
    counted_alloc(__func__, p, 100);
    n_kept--;
    p = realloc(p, 10000);
    counted_free(__func__, 100);
    counted_alloc(__func__, p, 10000);
}

__attribute__((noinline)) void realloc_shrink(void)
{
    void *p = malloc(8000);
    counted_alloc(__func__, p, 8000);
    n_kept--;
    p = realloc(p, 1000);
    counted_free(__func__, 8000);
    counted_alloc(__func__, p, 1000);
}

__attribute__((noinline)) void realloc_from_null(void)
{
    /* volatile: gcc would otherwise fold realloc(NULL, n) into malloc(n) */
    void *volatile none = NULL;
    counted_alloc(__func__, realloc(none, 2500), 2500);
}

__attribute__((noinline)) void realloc_to_zero(void)
{
    void *p = malloc(3000);
    counted_alloc(__func__, p, 3000);
    n_kept--;
    /* glibc frees the block and returns NULL */
    if (realloc(p, 0) != NULL) {
        fprintf(stderr, "realloc(p, 0) did not free\n");
        exit(98);
    }
    counted_free(__func__, 3000);
}

__attribute__((noinline)) void use_posix_memalign(void)
{
    void *p = NULL;
    if (posix_memalign(&p, 256, 5000) != 0)
        p = NULL;
    counted_alloc(__func__, p, 5000);
}

__attribute__((noinline)) void use_aligned_alloc(void)
{
    counted_alloc(__func__, aligned_alloc(4096, 12288), 12288);
}

__attribute__((noinline)) void use_memalign(void)
{
    counted_alloc(__func__, memalign(64, 700), 700);
}

__attribute__((noinline)) void use_valloc(void)
{
    counted_alloc(__func__, valloc(6000), 6000);
}

__attribute__((noinline)) void use_pvalloc(void)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    counted_alloc(__func__, pvalloc(5000), (5000 + page - 1) / page * page);
}

static pthread_barrier_t done, finish;

static void *variants_main(void *arg)
{
    (void)arg;
    variants_tid = current_tid();
    pthread_setname_np(pthread_self(), "variants");
    use_calloc();
    realloc_grow();
    realloc_shrink();
    realloc_from_null();
    realloc_to_zero();
    use_posix_memalign();
    use_aligned_alloc();
    use_memalign();
    use_valloc();
    use_pvalloc();
    pthread_barrier_wait(&done);
    pthread_barrier_wait(&finish);
    return NULL;
}

int main(int argc, char **argv)
{
    char tmp[4200];
    pthread_t thread;
    int status = 0;
    long hold_ms = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT [--exit STATUS] [--hold-ms N]\n", argv[0]);
        return 64;
    }
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--exit") == 0 && i + 1 < argc)
            status = atoi(argv[++i]);
        else if (strcmp(argv[i], "--hold-ms") == 0 && i + 1 < argc)
            hold_ms = atol(argv[++i]);
        else {
            fprintf(stderr, "unknown argument %s\n", argv[i]);
            return 64;
        }
    }
    pthread_barrier_init(&done, NULL, 2);
    pthread_barrier_init(&finish, NULL, 2);
    if (pthread_create(&thread, NULL, variants_main, NULL) != 0)
        die("pthread_create");
    pthread_barrier_wait(&done);

    FILE *f = open_truth(argv[1], tmp, sizeof tmp);
    fprintf(f, "{\"pid\": %d, \"threads\": [{\"tid\": %ld, \"name\": \"variants\", ",
            (int)getpid(), variants_tid);
    tally_json(f, &thread_total);
    fprintf(f, "}],\n \"functions\": {");
    for (int i = 0; i < n_funcs; i++) {
        fprintf(f, "%s\n  \"%s\": {", i ? "," : "", funcs[i].name);
        tally_json(f, &funcs[i].t);
        fprintf(f, "}");
    }
    fprintf(f, "}}\n");
    publish_file(f, tmp, argv[1]);
    if (hold_ms > 0) {
        struct timespec ts = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    pthread_barrier_wait(&finish);
    pthread_join(thread, NULL);
    return status;
}
