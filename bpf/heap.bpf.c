/* Heap layer: uprobes on glibc's malloc family.
 *
 * Every event is folded into kernel maps; Python reads aggregates once per
 * interval and never sees a single malloc. Knobs come from Python as -D
 * flags (see memtrace/collect/heap.py). */

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
#define BUCKET_SHIFT 26 /* glibc's HEAP_MAX_SIZE: 64 MiB on 64-bit */

BPF_F_TABLE("hash", u64, struct alloc_info, allocs, MAX_ALLOCS, BPF_F_NO_PREALLOC);
BPF_HASH(heap_stats, struct heap_key, struct heap_counts, MAX_STATS);
/* Names of threads caught at their first allocation, so a thread that ends
 * between two snapshots still has a name. */
BPF_HASH(thread_names, u32, struct thread_name, MAX_THREADS);

/* entry_sp: the stack pointer at the function's first instruction, where
 * the return address is, whatever the probe site skipped. */
static __always_inline void make_key(struct pt_regs *ctx, u32 tid, u64 entry_sp,
                                     struct heap_key *key, int hot)
{
    key->tid = tid;
    key->bucket = 0; /* known when the block's address is */
    if (hot) {
        u64 caller;
        key->stack = user_stack_at(ctx, entry_sp, &caller);
        key->caller = caller;
    } else {
        /* Rare calls: the kernel's walk, which the verifier checks in a
         * fraction of the time (each copy of the fast walk costs ~0.06 s
         * of load time). */
        key->caller = 0;
        bpf_probe_read_user(&key->caller, sizeof(key->caller), (void *)entry_sp);
        key->stack = user_stack(ctx);
    }
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

static __always_inline void charge_free(u64 addr, struct alloc_info *info)
{
    struct heap_counts *c = heap_stats.lookup(&info->key);
    if (!c)
        return;
    __sync_fetch_and_add(&c->free_bytes, info->size);
    __sync_fetch_and_add(&c->free_count, 1);
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
        charge_free(addr, &info);
}

static __always_inline void record_block(u64 addr, u64 size, struct heap_key *key)
{
    key->bucket = addr >> BUCKET_SHIFT;
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
            charge_free(addr, &old);
        }
        if (allocs.update(&addr, &info) != 0) {
            count(CNT_DROP_ALLOCS);
            return;
        }
    }
    __sync_fetch_and_add(&c->alloc_bytes, size);
    __sync_fetch_and_add(&c->alloc_count, 1);
}

/* hot: malloc, calloc and realloc, which get the fast stack walk. */
static __always_inline int enter(struct pt_regs *ctx, u32 kind, u64 size, u64 arg, u64 sp_adjust,
                                 int hot)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    u32 tid = id;
    u64 sp = PT_REGS_SP(ctx) + sp_adjust;
    struct pending_call *call = call_slot(tid, 1);
    if (!call) {
        count(CNT_DROP_PENDING);
        return 0;
    }
    if (call->active && call->entry_sp >= sp) {
        /* glibc calls its own public entry points (memalign and realloc
         * relay to malloc), often as a tail call at the same sp, where the
         * return address is already the uretprobe trampoline: the outer
         * call, which read the real caller, accounts for the block. An
         * open call at a lower sp is one whose return was lost: replaced. */
        call->nested++;
        return 0;
    }
    call->size = size;
    call->arg = arg;
    call->entry_sp = sp;
    call->kind = kind;
    call->nested = 0;
    call->rss_anon_before = 0;
    make_key(ctx, tid, sp, &call->key, hot);
    call->active = 1;
    return 0;
}

/* Returns the finished outermost call, or 0 for an inner or unknown one. */
static __always_inline struct pending_call *leave(u32 *tid)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    *tid = id;
    struct pending_call *open = open_call(*tid);
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
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, MALLOC_SP_ADJUST, 1);
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
    return enter(ctx, CALL_ALLOC, n * size, 0, CALLOC_SP_ADJUST, 1);
}

int realloc_enter(struct pt_regs *ctx)
{
    /* realloc(p, 0) is free(p) in glibc, through free() itself: left to the
     * free probe, so that free needs no look at calls in flight. */
    if (PT_REGS_PARM2(ctx) == 0 && PT_REGS_PARM1(ctx) != 0)
        return 0;
    return enter(ctx, CALL_REALLOC, PT_REGS_PARM2(ctx), PT_REGS_PARM1(ctx), REALLOC_SP_ADJUST, 1);
}

/* memalign and aligned_alloc (one address in glibc 2.36): (alignment, size) */
int memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, MEMALIGN_SP_ADJUST, 0);
}

/* A function of its own from glibc 2.38 on. */
int aligned_alloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, ALIGNED_ALLOC_SP_ADJUST, 0);
}

int valloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, VALLOC_SP_ADJUST, 0);
}

/* pvalloc promises whole pages: the program owns the rounded size. */
int pvalloc_enter(struct pt_regs *ctx)
{
    u64 size = (PT_REGS_PARM1(ctx) + TARGET_PAGE_SIZE - 1) & ~(u64)(TARGET_PAGE_SIZE - 1);
    return enter(ctx, CALL_ALLOC, size ? size : TARGET_PAGE_SIZE, 0, PVALLOC_SP_ADJUST, 0);
}

int posix_memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx),
                 POSIX_MEMALIGN_SP_ADJUST, 0);
}

int alloc_return(struct pt_regs *ctx)
{
    u32 tid;
    struct pending_call *call = leave(&tid);
    if (!call)
        return 0;
    struct pending_call done = *call;
    close_call(tid, call);
    u64 addr = PT_REGS_RC(ctx);
    if (done.kind == CALL_POSIX_MEMALIGN) {
        if (addr != 0) /* an error number, nothing allocated */
            return 0;
        bpf_probe_read_user(&addr, sizeof(addr), (void *)done.arg);
    } else if (done.kind == CALL_REALLOC) {
        /* glibc frees the old block when it returns a new one; on
         * failure the old block stays. */
        if (done.arg && addr)
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
    forget_block(addr);
    return 0;
}

/* malloc_trim is a call in flight like the others, so that the madvise
 * calls it makes are marked as inside malloc, and its RSS effect is known. */
int trim_enter(struct pt_regs *ctx)
{
    if (!traced(bpf_get_current_pid_tgid()))
        return 0;
    count(CNT_TRIM_CALLS);
    enter(ctx, CALL_TRIM, 0, 0, TRIM_SP_ADJUST, 0);
    struct pending_call *call = open_call(bpf_get_current_pid_tgid());
    if (call && call->kind == CALL_TRIM)
        call->rss_anon_before = current_rss_anon();
    return 0;
}

int trim_return(struct pt_regs *ctx)
{
    u32 tid;
    struct pending_call *call = leave(&tid);
    if (!call)
        return 0;
    if (call->kind == CALL_TRIM) {
        if (PT_REGS_RC(ctx) == 1)
            count(CNT_TRIM_RELEASED);
        emit_trim(call, PT_REGS_RC(ctx));
    }
    close_call(tid, call);
    return 0;
}
