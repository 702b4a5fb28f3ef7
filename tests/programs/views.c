/* One memfd of VIEW_MIB MiB mapped shared at three addresses, every page
 * touched through each: the kernel's RSS counts it three times, its PSS
 * once (as the JVM's ZGC maps its heap). Holds for argv[1] ms, then exits. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define VIEW_MIB 48

int main(int argc, char **argv)
{
    size_t size = (size_t)VIEW_MIB << 20;
    int fd = memfd_create("views_heap", 0);
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
        return 1;
    char *views[3];
    for (int i = 0; i < 3; i++) {
        views[i] = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (views[i] == MAP_FAILED)
            return 1;
    }
    memset(views[0], 1, size);
    for (size_t at = 0; at < size; at += 4096)
        if (views[1][at] != views[2][at])
            return 2;
    usleep((useconds_t)(argc > 1 ? atoi(argv[1]) : 1000) * 1000);
    return 0;
}
