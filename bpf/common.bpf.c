/* What every layer uses: the process filter, counters and the stack map.
 * The collector joins the layers it needs after this file (bcc loads the
 * programs of one text only). */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#ifndef MAX_STACKS
/* Distinct user stacks; each entry preallocates 127 frames * 8 B, so 16 Ki
 * stacks cost 16 MiB of kernel memory. A full map or a hash collision loses
 * the deep frames only: the heap layer keeps the immediate caller apart. */
#define MAX_STACKS 16384
#endif
#ifndef MAX_THREADS
/* Calls in flight: one per thread inside malloc or a syscall at a time. */
#define MAX_THREADS 16384
#endif

enum call_kind { CALL_ALLOC, CALL_REALLOC, CALL_POSIX_MEMALIGN, CALL_TRIM };

/* A malloc-family call between its entry and its return. */
struct pending_call {
    u64 size;
    u64 arg;      /* realloc: the old block; posix_memalign: the out pointer */
    u64 entry_sp; /* a later entry with a lower sp is a call made from inside */
    struct heap_key key;
    u32 kind;
    u32 nested;   /* inner hooked calls (memalign -> malloc) still open */
    s64 rss_anon_before; /* malloc_trim: anonymous RSS at entry */
};

/* Shared with the address-space layer: a syscall made while its thread has
 * a call here open was made by the allocator, for that caller. */
BPF_HASH(pending, u32, struct pending_call, MAX_THREADS);
BPF_STACK_TRACE(stacks, MAX_STACKS);
BPF_PERCPU_ARRAY(counters, u64, CNT_MAX);

static __always_inline void count(u32 which)
{
    u64 *c = counters.lookup(&which);
    if (c)
        (*c)++;
}

/* Uprobes attach per process, but a child forked by the target inherits
 * breakpoints until the kernel drops them, and tracepoints see every
 * process: the thread group decides. */
static __always_inline int traced(u64 id)
{
    return (id >> 32) == TARGET_TGID;
}
