/* Go callers of C code in a Go program with cgo. Go calls C through
 * runtime.asmcgocall, which moves to the thread's system stack first: a walk
 * from malloc up through the C frames reaches asmcgocall there, and the Go
 * frames that made the call are on the goroutine's own stack, elsewhere in
 * memory, where no CFA rule or frame pointer leads. asmcgocall keeps what
 * finds it just below its call (memtrace.h GO_CGOCALL_*): from there the
 * walk moves to the goroutine's stack, at asmcgocall's return address into
 * runtime.cgocall, and goes on by frame pointers, which Go keeps.
 * Joined before common.bpf.c: its walk state holds a struct go_walk. */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

BPF_ARRAY(go_runtime, struct go_runtime, 1);

struct go_walk {
    u64 lo, hi; /* runtime.asmcgocall of the process walked; 0, 0: none */
};

/* At the start of a walk: a process that is not the Go one pays this
 * lookup, and a compare per frame. */
static __always_inline void go_walk_begin(struct go_walk *g, u64 id)
{
    u32 zero = 0;
    struct go_runtime *rt = go_runtime.lookup(&zero);
    if (rt && rt->tgid && rt->tgid == id >> 32) {
        g->lo = rt->cgocall_lo;
        g->hi = rt->cgocall_hi;
    } else {
        g->lo = g->hi = 0;
    }
}

/* Whether return address `pc` is into asmcgocall: its frame is on the
 * system stack at sp. */
static __always_inline int go_cgocall_frame(struct go_walk *g, u64 pc)
{
    return pc - 1 - g->lo < g->hi - g->lo;
}

/* The goroutine's stack pointer at its call of asmcgocall, where the return
 * address into runtime.cgocall is; 0 when it cannot be read. */
static __always_inline u64 go_caller_sp(u64 sp)
{
    u64 kept[2] = {}; /* GO_CGOCALL_DEPTH, GO_CGOCALL_G */
    _Static_assert(GO_CGOCALL_G == GO_CGOCALL_DEPTH + 8, "the two words asmcgocall keeps");
    if (bpf_probe_read_user(kept, sizeof(kept), (void *)(sp + GO_CGOCALL_DEPTH)) != 0)
        return 0;
    if (!kept[1])
        return kept[0]; /* no switch: its stack pointer itself */
    u64 hi = 0;
    if (bpf_probe_read_user(&hi, 8, (void *)(kept[1] + GO_G_STACK_HI)) != 0 || hi < kept[0])
        return 0;
    return hi - kept[0];
}
