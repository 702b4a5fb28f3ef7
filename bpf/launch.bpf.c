/* A launched command, stopped once ld.so has mapped the libraries it needs
 * and before any of their code runs, so that their unwind tables are in
 * place for its first calls. Without the stop, a program that starts
 * threads at once makes its first allocations while Python is still
 * placing libc's table, and those stacks end at the first frame without a
 * frame pointer (start_thread, not start_thread <- clone3).
 *
 * ld.so calls _dl_debug_state, the debuggers' breakpoint, each time it
 * changes its list of objects, and sets _r_debug.r_state to RT_CONSISTENT
 * first (glibc's <link.h>): at startup once every needed library is
 * mapped, before relocation and constructors. memtrace is still the
 * command's ptrace tracer then, so the signal raised here stops the thread
 * for it (a signal-delivery stop) instead of being delivered; memtrace
 * places the tables and detaches with the signal cancelled. Should memtrace
 * die first, the kernel detaches it and the signal arrives: one whose
 * default is to be ignored (collect/launchhold.py). */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#define RT_CONSISTENT 0

BPF_ARRAY(launch_hold, struct launch_hold, 1);

/* Attached to the launched process alone (its pid), on its ld.so. */
int launch_objects_listed(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct launch_hold *hold = launch_hold.lookup(&zero);
    if (!hold || !hold->signal)
        return 0;
    u32 state = 1;
    if (bpf_probe_read_user(&state, sizeof(state), (void *)hold->r_state_at) != 0 ||
        state != RT_CONSISTENT)
        return 0; /* RT_ADD: about to map them */
    u32 sig = hold->signal;
    hold->signal = 0; /* once: a dlopen later changes the list too */
    bpf_send_signal_thread(sig);
    return 0;
}
