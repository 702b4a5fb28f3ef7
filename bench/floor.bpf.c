/* The cheapest possible probe: it runs and does nothing. What a workload
 * loses under it is the price of the uprobe mechanism alone (trap, and
 * emulation or single-step of the probed instruction), the floor any
 * tracer built on uprobes pays. */
#include <uapi/linux/ptrace.h>

int on_hit(struct pt_regs *ctx)
{
	return 0;
}
