/* Shared by the C demos, which #include it; not a demo itself.
 *
 * Every demo reports on stderr, one line per fact, prefixed with its name:
 *   [NAME] phase PHASE: what happens now
 *   [NAME] truth PHASE: key=value ...   (the program's own accounting)
 * and can pause before each phase (--pause) until Enter or SIGUSR1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
/* Not every demo uses every helper. */
#define HELPER __attribute__((unused)) static
#define KIB 1024UL
#define MIB (1024UL * 1024UL)

static const char *demo_name = "demo";

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
HELPER void say(const char *fmt, ...)
{
    /* One write per line so lines from concurrent threads never mix;
     * stderr is unbuffered and would otherwise write piece by piece. */
    char line[1024];
    int n = snprintf(line, sizeof line, "[%s] ", demo_name);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (write(2, line, (size_t)n) < 0) {
        /* Nothing sensible to do if stderr is gone. */
    }
}

HELPER void die(const char *what)
{
    say("error: %s: %s", what, strerror(errno));
    exit(1);
}

HELPER double seconds_since(const struct timespec *then)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - then->tv_sec) +
           (double)(now.tv_nsec - then->tv_nsec) / 1e9;
}

HELPER void nap(long micros)
{
    struct timespec ts = {micros / 1000000, (micros % 1000000) * 1000};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Resident and anonymous-resident bytes, from /proc/self/statm, read with
 * plain syscalls so that measuring does not itself call malloc. */
HELPER void read_rss(unsigned long *rss_bytes, unsigned long *anon_bytes)
{
    char buf[256];
    unsigned long size, resident, shared;
    unsigned long page = (unsigned long)sysconf(_SC_PAGESIZE);
    ssize_t n = -1;
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);

    *rss_bytes = *anon_bytes = 0;
    if (fd >= 0) {
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
    }
    if (n <= 0)
        return;
    buf[n] = '\0';
    if (sscanf(buf, "%lu %lu %lu", &size, &resident, &shared) != 3)
        return;
    *rss_bytes = resident * page;
    *anon_bytes = (resident - shared) * page;
}

/* The value of option argv[*i], a number in [min, max], or exit 2. */
HELPER double number_arg(int argc, char **argv, int *i, double min, double max)
{
    char *end;
    double value;

    if (*i + 1 >= argc) {
        say("%s needs a value (see --help)", argv[*i]);
        exit(2);
    }
    value = strtod(argv[*i + 1], &end);
    if (end == argv[*i + 1] || *end != '\0' || !(value >= min && value <= max)) {
        say("%s: '%s' is not a number from %g to %g (see --help)", argv[*i],
            argv[*i + 1], min, max);
        exit(2);
    }
    *i += 1;
    return value;
}

/* ---- pausing between phases ---------------------------------------------- */

static int pause_fd = -1;

/* SIGUSR1 is blocked in every thread and read from a signalfd, so whichever
 * thread the kernel picks, main sees it. Call before starting threads. */
HELPER void pause_setup(void)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pause_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (pause_fd < 0)
        die("signalfd");
}

/* Waits for Enter on stdin or SIGUSR1. Does nothing unless pause_setup ran. */
HELPER void pause_before(const char *next_phase)
{
    static int stdin_open = 1;
    struct signalfd_siginfo info;
    char buf[256];

    if (pause_fd < 0)
        return;
    /* A signal sent while a phase ran must not skip this pause. */
    while (read(pause_fd, &info, sizeof info) > 0)
        ;
    say("paused before phase %s: press Enter or run 'kill -USR1 %d'",
        next_phase, (int)getpid());
    for (;;) {
        struct pollfd fds[2] = {{pause_fd, POLLIN, 0}, {0, POLLIN, 0}};
        if (poll(fds, stdin_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if ((fds[0].revents & POLLIN) &&
            read(pause_fd, &info, sizeof info) > 0)
            return;
        if (stdin_open && fds[1].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0)
                stdin_open = 0; /* EOF: only SIGUSR1 can resume now */
            else if (memchr(buf, '\n', (size_t)n))
                return;
        }
    }
}

HELPER void phase(const char *name, const char *what)
{
    pause_before(name);
    say("phase %s: %s", name, what);
}
