/* names_main [COUNT [wait|MS]]: allocates COUNT blocks of 4000 bytes
 * through libnames.so's static functions and keeps them. With "wait",
 * prints "ready" and waits for stdin to close (tests that read the
 * process's maps); else sleeps MS milliseconds (300) and exits (traced
 * launches). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *names_exported(size_t n);

int main(int argc, char **argv)
{
    int count = argc > 1 ? atoi(argv[1]) : 100;
    void **kept = calloc(count, sizeof *kept);
    for (int i = 0; i < count; i++)
        kept[i] = names_exported(4000);
    if (argc > 2 && strcmp(argv[2], "wait") == 0) {
        printf("ready\n");
        fflush(stdout);
        char buf[16];
        while (read(0, buf, sizeof buf) > 0)
            ;
    } else {
        usleep((argc > 2 ? atoi(argv[2]) : 300) * 1000);
    }
    return kept[count - 1] == NULL;
}
