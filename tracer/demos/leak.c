/* memtrace reproduction "leak": a true leak beside balanced traffic.
 *
 * One thread ("request-loop") serves fake requests. Every request takes a
 * scratch buffer and frees it (balanced: live bytes stay flat), and every
 * request also registers its client in a table that nothing ever cleans,
 * through a three-deep call path (handle_request -> register_client ->
 * intern_client_name), so the leak has one clear stack that grows at a
 * steady --rate-kib per second while the rest stays flat. Ground truth (what
 * the leak holds) goes to stderr once a second.
 *
 * Usage: leak [--seconds S] [--rate-kib N] [--pause]
 */
#include "demo_support.c"

#include <stdint.h>

#define TICKS_PER_SECOND 100

struct truth {
    size_t leaked_bytes, leaked_blocks;
    unsigned long requests;
};

static struct truth truth;
static uint64_t rng = 0x2545F4914F6CDD1DULL;

static size_t between(size_t lo, size_t hi)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return lo + rng % (hi - lo + 1);
}

/* The leak: a copy of the client's name that nobody keeps a pointer to
 * long enough to free. */
static NOINLINE char *intern_client_name(unsigned long request, size_t size)
{
    char *name = malloc(size);
    if (!name)
        die("malloc");
    memset(name, 0, size);
    snprintf(name, size, "client-%lu", request);
    truth.leaked_bytes += size;
    truth.leaked_blocks++;
    return name;
}

static NOINLINE void register_client(unsigned long request, size_t size)
{
    char *volatile name = intern_client_name(request, size);
    (void)name; /* "registered" and lost */
}

static NOINLINE void build_response(size_t size)
{
    char *volatile scratch = malloc(size);
    if (!scratch)
        die("malloc");
    memset(scratch, 'r', size);
    free(scratch);
}

static NOINLINE void handle_request(size_t leak_size)
{
    truth.requests++;
    build_response(between(512, 8192));
    if (leak_size)
        register_client(truth.requests, leak_size);
}

/* Serves requests for `seconds`, leaking about `rate` bytes a second. */
static void serve(const char *phase_name, double seconds, size_t rate)
{
    struct timespec began;
    size_t leaked_before = truth.leaked_bytes;
    double next_report = 1.0;

    clock_gettime(CLOCK_MONOTONIC, &began);
    for (;;) {
        double t = seconds_since(&began);
        if (t >= seconds)
            break;
        /* Leak on schedule rather than per request, so the rate holds
         * whatever the tick length turns out to be. */
        size_t due = (size_t)(t * (double)rate);
        while (truth.leaked_bytes - leaked_before < due)
            handle_request(between(64, 1024));
        handle_request(0);
        if (t >= next_report) {
            say("truth %s: t=%.0fs leaked_bytes=%zu leaked_blocks=%zu "
                "requests=%lu", phase_name, next_report, truth.leaked_bytes,
                truth.leaked_blocks, truth.requests);
            next_report += 1.0;
        }
        nap(1000000 / TICKS_PER_SECOND);
    }
    say("truth %s: leaked_bytes=%zu leaked_blocks=%zu requests=%lu",
        phase_name, truth.leaked_bytes, truth.leaked_blocks, truth.requests);
}

static const char usage[] =
    "usage: leak [--seconds S] [--rate-kib N] [--pause]\n"
    "One call path mallocs and never frees, at a steady rate, beside\n"
    "balanced traffic. Ground truth goes to stderr every second.\n"
    "  --seconds S    how long the leaking phase lasts (default 4)\n"
    "  --rate-kib N   KiB leaked per second (default 256)\n"
    "  --pause        wait for Enter or SIGUSR1 before each phase\n";

int main(int argc, char **argv)
{
    double seconds = 4.0, rate_kib = 256.0;
    int pause = 0;

    demo_name = "leak";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds")) {
            seconds = number_arg(argc, argv, &i, 0.1, 86400);
        } else if (!strcmp(argv[i], "--rate-kib")) {
            rate_kib = number_arg(argc, argv, &i, 1, 1 << 20);
        } else if (!strcmp(argv[i], "--pause")) {
            pause = 1;
        } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        } else {
            say("unknown option %s\n%s", argv[i], usage);
            return 2;
        }
    }
    if (pause)
        pause_setup();
    pthread_setname_np(pthread_self(), "request-loop");
    say("pid %d: leaking %.0f KiB/s for %.1f s", (int)getpid(), rate_kib,
        seconds);

    phase("warmup", "balanced requests only: live bytes stay flat");
    serve("warmup", 1.0, 0);
    phase("leak", "every request also leaks its client's name");
    serve("leak", seconds, (size_t)(rate_kib * KIB));
    phase("hold", "requests stop; the leaked blocks stay");
    nap(500000);
    say("truth hold: leaked_bytes=%zu leaked_blocks=%zu", truth.leaked_bytes,
        truth.leaked_blocks);
    say("done");
    return 0;
}
