/* A target that does nothing until told to, for the error and cleanup
 * tests. Built dynamically against glibc, statically, and against musl.
 *
 * usage: idle [--exit]
 *   default  block until SIGTERM/SIGINT (exit 0 on either)
 *   --exit   exit 0 at once
 */
#include <signal.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    sigset_t set;
    int sig;
    char *p;

    if (argc > 1 && strcmp(argv[1], "--exit") == 0)
        return 0;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigwait(&set, &sig);
    /* still able to allocate after whatever was attached to us */
    p = malloc(100);
    if (!p)
        return 1;
    memset(p, 1, 100);
    free(p);
    return 0;
}
