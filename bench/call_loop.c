/* Calls one function of a shared object in a loop, for timing uprobes.
 *
 *   call_loop LIB.so SYMBOL CALLS
 *
 * Prints "ready" and waits for a line on stdin (time for a tracer to attach),
 * then prints "ns_per_call N" and stays alive until stdin closes, so the
 * tracer can detach while the process still exists. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: call_loop LIB.so SYMBOL CALLS\n");
		return 2;
	}
	void *lib = dlopen(argv[1], RTLD_NOW);
	if (!lib) {
		fprintf(stderr, "call_loop: %s\n", dlerror());
		return 2;
	}
	void (*fn)(void *) = (void (*)(void *))dlsym(lib, argv[2]);
	if (!fn) {
		fprintf(stderr, "call_loop: no symbol %s\n", argv[2]);
		return 2;
	}
	long calls = atol(argv[3]);
	char line[64];

	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof line, stdin))
		return 2;

	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < calls; i++)
		fn(line);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
	printf("ns_per_call %.1f\n", ns / calls);
	fflush(stdout);
	while (fgets(line, sizeof line, stdin))
		;
	return 0;
}
