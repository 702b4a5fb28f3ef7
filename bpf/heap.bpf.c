/* Heap layer: uprobes on glibc's malloc family.
 *
 * Every event is folded into kernel maps; Python reads aggregates once per
 * interval and never sees a single malloc. Knobs come from Python as -D
 * flags (see memtrace/collect/heap.py). */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#ifndef MAX_ALLOCS
/* One entry per live tracked block (40 B key+value, allocated on demand
 * thanks to BPF_F_NO_PREALLOC, so an idle trace costs nothing). 1 Mi live
 * blocks is a large service; beyond that inserts fail and are counted as
 * drops, and the CLI names --max-allocs. */
#define MAX_ALLOCS (1 << 20)
#endif
#ifndef MAX_STATS
/* (thread, stack) pairs: a few hundred threads times a few hundred sites. */
#define MAX_STATS 65536
#endif
#ifndef MAX_STACKS
/* Distinct user stacks; each entry preallocates 127 frames * 8 B, so 16 Ki
 * stacks cost 16 MiB of kernel memory. A full map or a hash collision loses
 * the deep frames only: the immediate caller is kept in heap_key.caller. */
#define MAX_STACKS 16384
#endif
#ifndef MAX_THREADS
/* Calls in flight (one per thread inside malloc at any moment). */
#define MAX_THREADS 16384
#endif
/* Hooks for layers that follow blocks (the 64 MiB arena buckets). */
#ifndef ON_HEAP_ALLOC
#define ON_HEAP_ALLOC(addr, size)
#endif
#ifndef ON_HEAP_FREE
#define ON_HEAP_FREE(info)
#endif

enum call_kind { CALL_ALLOC, CALL_REALLOC, CALL_POSIX_MEMALIGN };

/* A malloc-family call between its entry and its return. */
struct pending_call {
    u64 size;
    u64 arg;      /* realloc: the old block; posix_memalign: the out pointer */
    u64 entry_sp; /* a later entry with a lower sp is a call made from inside */
    struct heap_key key;
    u32 kind;
    u32 nested;   /* inner hooked calls (memalign -> malloc) still open */
};

BPF_F_TABLE("hash", u64, struct alloc_info, allocs, MAX_ALLOCS, BPF_F_NO_PREALLOC);
BPF_HASH(heap_stats, struct heap_key, struct heap_counts, MAX_STATS);
BPF_HASH(pending, u32, struct pending_call, MAX_THREADS);
/* Names of threads caught at their first allocation, so a thread that ends
 * between two snapshots still has a name. */
BPF_HASH(thread_names, u32, struct thread_name, MAX_THREADS);
BPF_STACK_TRACE(stacks, MAX_STACKS);
BPF_PERCPU_ARRAY(counters, u64, CNT_MAX);

static __always_inline void count(u32 which)
{
    u64 *c = counters.lookup(&which);
    if (c)
        (*c)++;
}

/* The tracepoint filter (pid) attaches per process, but a child forked by
 * the target inherits breakpoints until the kernel drops them: check tgid. */
static __always_inline int traced(u64 id)
{
    return (id >> 32) == TARGET_TGID;
}

static __always_inline void make_key(struct pt_regs *ctx, u32 tid, u64 sp, u64 sp_adjust,
                                     struct heap_key *key)
{
    key->tid = tid;
    key->caller = 0;
    bpf_probe_read_user(&key->caller, sizeof(key->caller), (void *)(sp + sp_adjust));
    key->stack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
    if (key->stack_id < 0)
        count(CNT_STACK_LOST);
}

static __always_inline struct heap_counts *stats_for(struct heap_key *key)
{
    struct heap_counts *c = heap_stats.lookup(key);
    if (c)
        return c;
    struct heap_counts zero = {};
    if (heap_stats.insert(key, &zero) != 0 && heap_stats.lookup(key) == 0) {
        count(CNT_DROP_STATS);
        return 0;
    }
    struct thread_name name = {};
    bpf_get_current_comm(&name.comm, sizeof(name.comm));
    thread_names.update(&key->tid, &name);
    return heap_stats.lookup(key);
}

static __always_inline void charge_free(struct alloc_info *info)
{
    struct heap_counts *c = heap_stats.lookup(&info->key);
    if (!c)
        return;
    __sync_fetch_and_add(&c->free_bytes, info->size);
    __sync_fetch_and_add(&c->free_count, 1);
    ON_HEAP_FREE(info);
}

static __always_inline void forget_block(u64 addr)
{
    struct alloc_info *found = allocs.lookup(&addr);
    if (!found) {
        count(CNT_UNTRACKED_FREE);
        return;
    }
    struct alloc_info info = *found;
    if (allocs.delete(&addr) == 0)
        charge_free(&info);
}

static __always_inline void record_block(u64 addr, u64 size, struct heap_key *key)
{
    struct heap_counts *c = stats_for(key);
    if (!c)
        return;
    struct alloc_info info = {.size = size, .key = *key};
    if (allocs.insert(&addr, &info) != 0) {
        /* The address is live in our map: its free was missed (a block
         * released by a path we do not hook). Retire it, then record. */
        struct alloc_info *stale = allocs.lookup(&addr);
        if (stale) {
            struct alloc_info old = *stale;
            charge_free(&old);
        }
        if (allocs.update(&addr, &info) != 0) {
            count(CNT_DROP_ALLOCS);
            return;
        }
    }
    __sync_fetch_and_add(&c->alloc_bytes, size);
    __sync_fetch_and_add(&c->alloc_count, 1);
    ON_HEAP_ALLOC(addr, size);
}

static __always_inline int enter(struct pt_regs *ctx, u32 kind, u64 size, u64 arg, u64 sp_adjust)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    u32 tid = id;
    u64 sp = PT_REGS_SP(ctx);
    struct pending_call *open = pending.lookup(&tid);
    if (open && open->entry_sp > sp) {
        /* glibc calls its own public entry points (memalign and realloc
         * relay to malloc): the outer call accounts for the block. */
        open->nested++;
        return 0;
    }
    struct pending_call call = {.size = size, .arg = arg, .entry_sp = sp, .kind = kind};
    make_key(ctx, tid, sp, sp_adjust, &call.key);
    if (pending.update(&tid, &call) != 0)
        count(CNT_DROP_PENDING);
    return 0;
}

/* Returns the finished outermost call, or 0 for an inner or unknown one. */
static __always_inline struct pending_call *leave(u32 *tid)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    *tid = id;
    struct pending_call *open = pending.lookup(tid);
    if (!open)
        return 0;
    if (open->nested) {
        open->nested--;
        return 0;
    }
    return open;
}

int malloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, MALLOC_SP_ADJUST);
}

int calloc_enter(struct pt_regs *ctx)
{
    u64 n = PT_REGS_PARM1(ctx), size = PT_REGS_PARM2(ctx);
    if (size) {
        u64 limit = ~0ULL / size;
        /* Hide the division from LLVM, which would turn the check into a
         * 128-bit multiply that BPF cannot call. */
        asm volatile("" : "+r"(limit));
        if (n > limit)
            return 0; /* overflow: calloc fails without allocating */
    }
    return enter(ctx, CALL_ALLOC, n * size, 0, CALLOC_SP_ADJUST);
}

int realloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_REALLOC, PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx), REALLOC_SP_ADJUST);
}

/* memalign and aligned_alloc (one address in glibc 2.36): (alignment, size) */
int memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, MEMALIGN_SP_ADJUST);
}

/* A function of its own from glibc 2.38 on. */
int aligned_alloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, ALIGNED_ALLOC_SP_ADJUST);
}

int valloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, VALLOC_SP_ADJUST);
}

/* pvalloc promises whole pages: the program owns the rounded size. */
int pvalloc_enter(struct pt_regs *ctx)
{
    u64 size = (PT_REGS_PARM1(ctx) + TARGET_PAGE_SIZE - 1) & ~(u64)(TARGET_PAGE_SIZE - 1);
    return enter(ctx, CALL_ALLOC, size ? size : TARGET_PAGE_SIZE, 0, PVALLOC_SP_ADJUST);
}

int posix_memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx),
                 POSIX_MEMALIGN_SP_ADJUST);
}

int alloc_return(struct pt_regs *ctx)
{
    u32 tid;
    struct pending_call *call = leave(&tid);
    if (!call)
        return 0;
    struct pending_call done = *call;
    pending.delete(&tid);
    u64 addr = PT_REGS_RC(ctx);
    if (done.kind == CALL_POSIX_MEMALIGN) {
        if (addr != 0) /* an error number, nothing allocated */
            return 0;
        bpf_probe_read_user(&addr, sizeof(addr), (void *)done.arg);
    } else if (done.kind == CALL_REALLOC) {
        /* glibc frees the old block when it returns a new one, and when
         * asked for 0 bytes; on failure the old block stays. */
        if (done.arg && (addr || done.size == 0))
            forget_block(done.arg);
    }
    if (addr)
        record_block(addr, done.size, &done.key);
    return 0;
}

int free_enter(struct pt_regs *ctx)
{
    u64 addr = PT_REGS_PARM1(ctx);
    if (!addr)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    u32 tid = id;
    struct pending_call *open = pending.lookup(&tid);
    if (open && open->entry_sp > PT_REGS_SP(ctx))
        return 0; /* realloc(p, 0) frees through free(): realloc accounts */
    forget_block(addr);
    return 0;
}

int trim_enter(struct pt_regs *ctx)
{
    if (traced(bpf_get_current_pid_tgid()))
        count(CNT_TRIM_CALLS);
    return 0;
}

int trim_return(struct pt_regs *ctx)
{
    if (traced(bpf_get_current_pid_tgid()) && PT_REGS_RC(ctx) == 1)
        count(CNT_TRIM_RELEASED);
    return 0;
}
