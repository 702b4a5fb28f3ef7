/* What every layer uses: the process filter, counters and the stack map.
 * The collector joins the layers it needs after this file (bcc loads the
 * programs of one text only). */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#ifndef MAX_STACKS
/* Distinct user stacks, 1 KiB each, allocated as they appear (a JVM start
 * sees a few thousand). Not bpf_get_stackid's stack map: that one keeps a
 * single stack per hash bucket and refuses colliding ones, which lost 18 %
 * of a JVM's stacks at a third full. A full map loses the deep frames
 * only: the heap layer keeps the immediate caller apart. */
#define MAX_STACKS 65536
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
    u32 active;   /* a call is open (task storage keeps the slot between calls) */
};

/* The call each thread has open. Shared with the address-space layer: a
 * syscall made while its thread has a call open was made by the allocator,
 * for that caller. Task storage makes it a pointer away, where a hash map
 * costs an insert, two lookups and a delete on every malloc; kernels that
 * refuse task storage in uprobe programs get the hash map (the collector
 * retries without CALLS_IN_TASK_STORAGE). */
#ifdef CALLS_IN_TASK_STORAGE
BPF_TASK_STORAGE(calls_by_task, struct pending_call);

static __always_inline struct pending_call *call_slot(u32 tid, int create)
{
    return calls_by_task.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                          create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline void close_call(u32 tid, struct pending_call *call)
{
    call->active = 0;
}
#else
BPF_HASH(pending, u32, struct pending_call, MAX_THREADS);

static __always_inline struct pending_call *call_slot(u32 tid, int create)
{
    struct pending_call *call = pending.lookup(&tid);
    if (call || !create)
        return call;
    struct pending_call fresh = {};
    pending.insert(&tid, &fresh);
    return pending.lookup(&tid);
}

static __always_inline void close_call(u32 tid, struct pending_call *call)
{
    pending.delete(&tid);
}
#endif

static __always_inline struct pending_call *open_call(u32 tid)
{
    struct pending_call *call = call_slot(tid, 0);
    return call && call->active ? call : 0;
}
BPF_F_TABLE("hash", u64, struct stack_frames, stacks, MAX_STACKS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stack_scratch, struct stack_frames, 1);
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

static __always_inline u64 store_stack(struct stack_frames *frames, u64 hash)
{
    hash |= 1; /* never 0 */
    if (!stacks.lookup(&hash) && stacks.insert(&hash, frames) != 0 && !stacks.lookup(&hash))
        count(CNT_STACK_LOST);
    return hash;
}

/* The current user stack (the frame-pointer walk), stored once; returns its
 * key (0: none). Measured on the malloc hot path: about half of memtrace's
 * cost per call; a walk done here with bpf_probe_read_user per frame cost
 * the same. */
static __always_inline u64 user_stack(void *ctx)
{
#ifdef NO_STACKS /* benchmarks only: what the stack walk costs */
    return 0;
#endif
    u32 zero = 0;
    struct stack_frames *frames = stack_scratch.lookup(&zero);
    if (!frames)
        return 0;
    /* bpf_get_stack zeroes what it does not fill: equal stacks are equal
     * buffers, and the walk ends at the first zero. The bound stays a
     * constant for the verifier. */
    long size = bpf_get_stack(ctx, frames->ip, sizeof(frames->ip), BPF_F_USER_STACK);
    if (size <= 0)
        return 0;
    u64 hash = 0xcbf29ce484222325ULL; /* FNV-1a over whole frames */
    for (int i = 0; i < MAX_STACK_DEPTH; i++) {
        u64 ip = frames->ip[i];
        if (!ip)
            break;
        hash = (hash ^ ip) * 0x100000001b3ULL;
    }
    return store_stack(frames, hash);
}
