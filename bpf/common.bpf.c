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
    u32 may_nest; /* realloc and the aligned allocators relay to malloc */
    u64 entry_ns; /* when a call that may nest was entered */
    s64 rss_anon_before; /* malloc_trim: anonymous RSS at entry */
    u32 active;   /* a call is open (task storage keeps the slot between calls) */
    u32 caller_follows; /* syscalls were sent without the caller: send it at return */
    /* What this thread's last call found, kept between calls (task
     * storage only): a loop that mallocs from one site skips the stack
     * store's lookup and the counters' hash lookup. */
    u64 last_stack;          /* the stack it stored */
    struct heap_key last_key; /* the counters it charged, */
    u64 last_index;          /* at this index + 1 (0: none) */
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

#ifndef MAX_TRACED
#define MAX_TRACED 1024
#endif
/* The thread groups traced, filled by the collector after the load: in a
 * map, not compiled in, so that one compiled object (and the cache of it)
 * serves any process, and one loaded object can serve several. */
BPF_HASH(traced_tgids, u32, u32, MAX_TRACED);

/* Uprobes attach per process, but a child forked by the target inherits
 * breakpoints until the kernel drops them, and tracepoints see every
 * process: the thread group decides. */
static __always_inline int traced(u64 id)
{
    u32 tgid = id >> 32;
    return traced_tgids.lookup(&tgid) != 0;
}

static __always_inline u64 store_stack(struct stack_frames *frames, u64 hash)
{
    hash |= 1; /* never 0 */
    if (!stacks.lookup(&hash) && stacks.insert(&hash, frames) != 0 && !stacks.lookup(&hash))
        count(CNT_STACK_LOST);
    return hash;
}

/* The current user stack (the kernel's frame-pointer walk), stored once;
 * returns its key (0: none). For the syscall tracepoints, which are rare:
 * the kernel walks on through whatever the frame pointer holds and reads
 * address 0 at the end of most chains, and each such page fault costs about
 * 0.5 us (see user_stack_at for the uprobes). */
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

#ifndef STACK_CHUNK
/* Bytes of user stack read at once: one read costs about 0.1 us whatever
 * its size up to here, so the caller and the first frames come in one. */
#define STACK_CHUNK 1024
#endif
/* A caller's frame lies above its callee's and within the thread's stack:
 * a frame pointer outside (sp, sp + STACK_SPAN] is not one. */
#define STACK_SPAN (256ULL << 20)

struct stack_chunk {
    u8 b[STACK_CHUNK];
};
BPF_PERCPU_ARRAY(chunk_scratch, struct stack_chunk, 1);

struct frame_walk {
    struct stack_frames *frames;
    struct stack_chunk *chunk;
    u64 base, have; /* chunk holds user bytes [base, base + have) */
    u64 low;        /* the next frame lies at or above */
    u64 fp;
    u64 hash;
};

/* One frame of the walk: 1 ends it. Its state lives in a struct on the
 * BPF stack: the verifier then prunes more of the 126 steps, ~0.06 s per
 * program where locals took 0.13-0.2 s. (bpf_loop would verify it once,
 * but bcc 0.26 leaves its callback pointer unrelocated.) */
static __always_inline long walk_step(u32 i, void *data)
{
    struct frame_walk *w = data;
    u32 slot = i + 1; /* ip[0] is the probed instruction */
    if (slot >= MAX_STACK_DEPTH)
        return 1;
    struct stack_frames *frames = w->frames;
    struct stack_chunk *chunk = w->chunk;
    frames->ip[slot] = 0; /* the end mark, unless a frame follows */
    u64 fp = w->fp;
    if (fp < w->low || fp - w->low > STACK_SPAN)
        return 1;
    u64 off = fp - w->base;
    if (fp < w->base || off + 16 > w->have) {
        w->base = fp;
        off = 0;
        w->have = STACK_CHUNK;
        if (bpf_probe_read_user(chunk->b, STACK_CHUNK, (void *)fp) != 0) {
            /* within STACK_CHUNK of the end of the stack's mapping */
            w->have = 16;
            if (bpf_probe_read_user(chunk->b, 16, (void *)fp) != 0)
                return 1;
        }
    }
    if (off > STACK_CHUNK - 16) /* for the verifier: checked above */
        return 1;
    u64 next_fp = *(u64 *)&chunk->b[off];
    u64 ret = *(u64 *)&chunk->b[off + 8];
    if (!ret)
        return 1;
    frames->ip[slot] = ret;
    w->hash = (w->hash ^ ret) * 0x100000001b3ULL;
    w->low = fp + 16;
    w->fp = next_fp;
    return 0;
}

/* At a uprobe at a function's entry: the return address at entry_sp
 * (*caller) when the walk's first read brings it, else 0 (read alone, it
 * cost ~150 ns: the heap layer takes it at return instead), and the key
 * of the frame-pointer walk (*last_stored: the key this thread stored
 * last, not looked up again; updated), in
 * the layout of user_stack (ip[0] the probed instruction, then one return
 * address per frame). Stored once; returns 0 for none.
 *
 * Our own walk, where bpf_get_stack cost ~0.7 us even for one frame: the
 * kernel follows the frame pointer wherever it points, so a program built
 * without frame pointers (rbp a plain register) or the 0 ending every
 * chain costs it a page fault per call. This walk stops before reading a
 * frame pointer that cannot be one (not above the previous frame, or
 * beyond STACK_SPAN), and reads the stack STACK_CHUNK bytes at a time.
 * Every frame it reads goes into the hash, so distinct walks never share
 * a key; it stops only where no real frame can be, or at MAX_STACK_DEPTH
 * as bpf_get_stack does. */
static __always_inline u64 user_stack_at(struct pt_regs *regs, u64 entry_sp, u64 *caller,
                                         u64 *last_stored)
{
    *caller = 0;
    u64 fp = PT_REGS_FP(regs);
    u64 ip = PT_REGS_IP(regs);
    u64 first = (0xcbf29ce484222325ULL ^ ip) * 0x100000001b3ULL; /* as in user_stack */
    if ((fp < PT_REGS_SP(regs) || fp - PT_REGS_SP(regs) > STACK_SPAN) &&
        (first | 1) == *last_stored)
        return *last_stored; /* no frame to walk (as in walk_step): stored last time */
    u32 zero = 0;
    struct stack_chunk *chunk = chunk_scratch.lookup(&zero);
    if (!chunk)
        return 0;
    u64 base = entry_sp, have = 0;
    if (fp >= entry_sp && fp - entry_sp <= STACK_CHUNK - 16 &&
        bpf_probe_read_user(chunk->b, STACK_CHUNK, (void *)base) == 0) {
        have = STACK_CHUNK; /* the caller and the first frame in one read */
        *caller = *(u64 *)chunk->b;
    }
#ifdef NO_STACKS /* benchmarks only: what the stack walk costs */
    return 0;
#endif
    struct stack_frames *frames = stack_scratch.lookup(&zero);
    if (!frames)
        return 0;
    frames->ip[0] = ip;
    struct frame_walk walk = {
        .frames = frames, .chunk = chunk, .base = base, .have = have,
        .low = PT_REGS_SP(regs), .fp = fp, .hash = first,
    };
    for (u32 i = 0; i < MAX_STACK_DEPTH - 1; i++)
        if (walk_step(i, &walk))
            break;
    /* The thread stored this very stack last time: it is in the map. */
    if ((walk.hash | 1) == *last_stored)
        return *last_stored;
    /* What lies past the end mark is stale and never read. */
    *last_stored = store_stack(frames, walk.hash);
    return *last_stored;
}
