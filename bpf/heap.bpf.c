/* Heap layer: uprobes on glibc's malloc family.
 *
 * Every event is folded into kernel maps; Python reads aggregates once per
 * interval and never sees a single malloc. Knobs come from Python as -D
 * flags (Probes.cflags in tracer/collect/probes.py). */

#ifndef ALLOC_BUCKET_BITS
/* log2 of the buckets of the live-block table; Python sizes it for twice
 * --max-allocs slots (see below). */
#define ALLOC_BUCKET_BITS 18
#endif
#define ALLOC_BUCKETS (1U << ALLOC_BUCKET_BITS)
/* Eight 16-byte slots: a bucket is two cache lines. */
#define ALLOC_WAYS 8
/* A block goes in the first bucket with a free slot among its home bucket
 * and the next ones. At half load (twice --max-allocs slots) four full
 * buckets in a row do not happen in practice; if they do, a drop is
 * counted. */
#define ALLOC_PROBE 4
#ifndef MAX_STATS
/* (thread, stack) pairs: a few hundred threads times a few hundred sites. */
#define MAX_STATS 65536
#endif
/* A slot's meta word: the block's size above its stats index. */
#define STATS_INDEX_BITS 20 /* --max-stats is at most 1 Mi */
#define MAX_BLOCK_SIZE ((1ULL << (64 - STATS_INDEX_BITS)) - 1) /* 16 TiB */
#define BUCKET_SHIFT 26 /* glibc's HEAP_MAX_SIZE: 64 MiB on 64-bit */

/* Live blocks, so that a free from any thread is charged back to the
 * thread and stack that allocated. Not a BPF hash map: its insert and its
 * lookup plus delete (bucket lock, element allocation, RCU free) were most
 * of what memtrace cost per malloc beyond the probes themselves. An array
 * of buckets is found by index (inlined by the verifier), and a slot is
 * claimed and released with one compare-and-swap on its address: no lock,
 * no allocation. The price is memory allocated up front: 32 bytes per
 * --max-allocs (32 MiB at the default), less than memleak's preallocated
 * hash. Address 0 marks a free slot. */
struct alloc_slot {
    u64 addr;
    u64 meta;
};
struct alloc_bucket {
    struct alloc_slot slot[ALLOC_WAYS];
};
BPF_ARRAY(allocs, struct alloc_bucket, ALLOC_BUCKETS);

/* Aggregates, split in two so that a free needs no hash lookup: the key
 * (thread, stack, bucket) names an index once, at its first allocation,
 * and blocks carry the index. Python reads the counters by mmap. */
BPF_HASH(heap_index, struct heap_key, u32, MAX_STATS);
BPF_F_TABLE("array", u32, struct heap_counts, heap_counts, MAX_STATS, BPF_F_MMAPABLE);
/* The key of each index, so that Python reads two arrays up to
 * heap_next_index instead of walking the hash (two syscalls per key). A
 * zero tid: not named yet, or an index lost to a race. */
BPF_F_TABLE("array", u32, struct heap_key, heap_keys, MAX_STATS, BPF_F_MMAPABLE);
BPF_ARRAY(heap_next_index, u64, 1);
/* Names of threads caught at their first allocation, so a thread that ends
 * between two snapshots still has a name. */
BPF_HASH(thread_names, u32, struct thread_name, MAX_THREADS);
BPF_ARRAY(heap_peak, struct heap_peak, 1);
/* The target's execs since the attach: blocks carry the generation they
 * were allocated in (in their counters' key), and the old image's blocks
 * are gone with it. */
BPF_ARRAY(exec_generation, u32, 1);
/* Moved on by the reader at each read: what a row's change marks it with
 * (heap_counts.mark). */
BPF_ARRAY(heap_epoch, u64, 1);

#ifndef ALLOCATOR_KIND
#define ALLOCATOR_KIND ALLOCATOR_GLIBC
#endif

static __always_inline u32 log2_floor(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) r += 1;
    return r;
}

/* A size rounded up to the class that holds it, where classes are
 * 2^(1/per_doubling) apart: step 2^(lg - log2(per_doubling)). */
static __always_inline u64 round_class(u64 size, u32 lg_per_doubling, u64 min_step)
{
    u32 lg = log2_floor(size - 1);
    u64 step = lg > lg_per_doubling ? 1ULL << (lg - lg_per_doubling) : 1;
    if (step < min_step)
        step = min_step;
    return (size + step - 1) & ~(step - 1);
}

/* The block as the allocator holds it. glibc: the chunk, with its size
 * word and 16-byte rounding, at least 32 bytes (MINSIZE), what the arenas'
 * books count (large blocks are mmapped chunks, outside every arena, where
 * Python does not use this). jemalloc: its size class (what
 * malloc_usable_size says, and what Redis's used_memory counts): 8, then
 * multiples of 16 to 128, then four classes per doubling. mimalloc: words,
 * then four bins per doubling. tcmalloc: its classes come from a table;
 * eight per doubling is close. */
static __always_inline u64 chunk_of(u64 size)
{
#if ALLOCATOR_KIND == ALLOCATOR_JEMALLOC
    if (size <= 8)
        return 8;
    if (size <= 128)
        return (size + 15) & ~15ULL;
    return round_class(size, 2, 16);
#elif ALLOCATOR_KIND == ALLOCATOR_MIMALLOC
    if (size <= 64)
        return size ? (size + 7) & ~7ULL : 8;
    return round_class(size, 2, 8);
#elif ALLOCATOR_KIND == ALLOCATOR_TCMALLOC
    if (size <= 128)
        return size ? (size + 15) & ~15ULL : 8;
    return round_class(size, 3, 16);
#else
    u64 chunk = (size + 8 + 15) & ~15ULL;
    return chunk < 32 ? 32 : chunk;
#endif
}

static __always_inline u32 current_generation(void)
{
    u32 zero = 0;
    u32 *gen = exec_generation.lookup(&zero);
    return gen ? *gen : 0;
}

static __always_inline void add_live(s64 bytes)
{
    u32 zero = 0;
    struct heap_peak *p = heap_peak.lookup(&zero);
    if (!p)
        return;
    s64 now = __sync_fetch_and_add(&p->live_bytes, bytes) + bytes;
    if (bytes > 0 && now > p->peak_bytes) {
        /* Two CPUs may race here; the loser's peak is at most one block
         * off, and the next call past it corrects it. */
        p->peak_bytes = now;
        p->peak_ns = bpf_ktime_get_ns();
    }
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    if (!traced(bpf_get_current_pid_tgid()))
        return 0;
    u32 zero = 0;
    u32 *gen = exec_generation.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
    struct heap_peak *p = heap_peak.lookup(&zero);
    if (p)
        p->live_bytes = 0; /* the old image's blocks are gone */
    return 0;
}

/* entry_sp: the stack pointer at the function's first instruction, where
 * the return address is, whatever the probe site skipped. */
static __always_inline void make_key(struct pt_regs *ctx, u32 tid, u64 entry_sp,
                                     struct pending_call *call, int walk)
{
    struct heap_key *key = &call->key;
    key->tid = tid;
    key->bucket = 0; /* known when the block's address is */
    if (walk) {
        /* Both come from the walk (walk_heap_stack), tail-called at the
         * end of enter(). */
        key->stack = 0;
        key->caller = 0;
    } else {
        /* malloc_trim, whose program goes on after enter(): the kernel's
         * walk. */
        key->caller = 0;
        bpf_probe_read_user(&key->caller, sizeof(key->caller), (void *)entry_sp);
        key->stack = user_stack(ctx);
    }
}

/* The counters' index of key, given at its first allocation; -1: none
 * left. */
static __always_inline s64 stats_index(struct heap_key *key)
{
    u32 *found = heap_index.lookup(key);
    if (found)
        return *found;
    u32 zero = 0;
    u64 *next = heap_next_index.lookup(&zero);
    if (!next)
        return -1;
    u64 fresh = __sync_fetch_and_add(next, 1);
    if (fresh >= MAX_STATS) {
        count(CNT_DROP_STATS);
        return -1;
    }
    u32 index = fresh;
    if (heap_index.insert(key, &index) != 0) {
        /* Another CPU named it first (its index wasted, never read), or
         * the map is full. */
        found = heap_index.lookup(key);
        if (!found) {
            count(CNT_DROP_STATS);
            return -1;
        }
        return *found;
    }
    struct heap_key *named = heap_keys.lookup(&index);
    if (named)
        *named = *key;
    struct thread_name name = {};
    bpf_get_current_comm(&name.comm, sizeof(name.comm));
    thread_names.update(&key->tid, &name);
    return index;
}

/* After the row's counters moved: a plain store, as every writer in an
 * epoch writes the same value. */
static __always_inline void mark_changed(struct heap_counts *c)
{
    u32 zero = 0;
    u64 *epoch = heap_epoch.lookup(&zero);
    if (epoch && c->mark != *epoch)
        c->mark = *epoch;
}

static __always_inline struct heap_counts *counts_at(u64 index)
{
    u32 i = index;
    if (index >= MAX_STATS)
        return 0;
    return heap_counts.lookup(&i);
}

static __always_inline void charge_free(u64 meta)
{
    u32 index = meta & ((1U << STATS_INDEX_BITS) - 1);
    struct heap_counts *c = counts_at(index);
    if (!c)
        return;
    u64 size = meta >> STATS_INDEX_BITS;
    __sync_fetch_and_add(&c->free_bytes, size);
    __sync_fetch_and_add(&c->free_count, 1);
    __sync_fetch_and_add(&c->free_chunk_bytes, chunk_of(size));
    mark_changed(c);
    /* A block of an image before the last exec left the live total then. */
    struct heap_key *named = heap_keys.lookup(&index);
    if (named && named->generation == current_generation())
        add_live(-(s64)size);
}

static __always_inline u32 home_bucket(u64 addr)
{
    /* Blocks are 16-byte aligned: the low bits carry nothing. */
    return ((addr >> 4) * 0x9E3779B97F4A7C15ULL) >> (64 - ALLOC_BUCKET_BITS);
}

/* The block this CPU freed last. Some allocators' delete calls their own
 * free, both probed (C++'s sized delete in jemalloc and mimalloc): the
 * inner call finds the block gone, and is the same free, not an untracked
 * one. Cleared when the address is handed out again. */
BPF_PERCPU_ARRAY(last_freed, u64, 1);

static __always_inline void forget_block(u64 addr)
{
    u32 home = home_bucket(addr);
    for (u32 i = 0; i < ALLOC_PROBE; i++) {
        u32 b = (home + i) & (ALLOC_BUCKETS - 1);
        struct alloc_bucket *bucket = allocs.lookup(&b);
        if (!bucket)
            return;
        for (u32 j = 0; j < ALLOC_WAYS; j++) {
            struct alloc_slot *slot = &bucket->slot[j];
            if (slot->addr != addr)
                continue;
            /* The meta word first: once the address is cleared, an
             * allocation on another CPU may take the slot. */
            u64 meta = slot->meta;
            if (__sync_val_compare_and_swap(&slot->addr, addr, 0) == addr) {
                charge_free(meta);
                u32 zero = 0;
                u64 *last = last_freed.lookup(&zero);
                if (last)
                    *last = addr;
            }
            return; /* else a second free of the block raced this one */
        }
    }
    u32 zero = 0;
    u64 *last = last_freed.lookup(&zero);
    if (last && *last == addr)
        return; /* the same free, seen again by an inner probe */
    count(CNT_UNTRACKED_FREE);
}

/* 1: kept; 0: dropped. */
static __always_inline int keep_block(u64 addr, u64 meta)
{
    u32 home = home_bucket(addr);
    for (u32 i = 0; i < ALLOC_PROBE; i++) {
        u32 b = (home + i) & (ALLOC_BUCKETS - 1);
        struct alloc_bucket *bucket = allocs.lookup(&b);
        if (!bucket)
            return 0;
        for (u32 j = 0; j < ALLOC_WAYS; j++) {
            struct alloc_slot *slot = &bucket->slot[j];
            if (slot->addr == addr) {
                /* Still live in our table: its free was missed (a block
                 * released by a path we do not hook). Retire it. (One in
                 * a later bucket than this, after a full home bucket,
                 * goes unseen: a missed free and a full bucket at once.) */
                u64 old = slot->meta;
                slot->meta = meta;
                charge_free(old);
                return 1;
            }
        }
        for (u32 j = 0; j < ALLOC_WAYS; j++) {
            struct alloc_slot *slot = &bucket->slot[j];
            if (slot->addr == 0 && __sync_val_compare_and_swap(&slot->addr, 0, addr) == 0) {
                /* No other CPU can free the block before malloc returns
                 * it, so the meta word may follow the address. */
                slot->meta = meta;
                return 1;
            }
        }
    }
    count(CNT_DROP_ALLOCS);
    return 0;
}

static __always_inline int same_key(struct heap_key *a, struct heap_key *b)
{
    return a->stack == b->stack && a->caller == b->caller && a->tid == b->tid &&
           a->bucket == b->bucket && a->generation == b->generation;
}

/* cache: the thread's call slot, which remembers the last key's index. */
static __always_inline void record_block(u64 addr, u64 size, struct heap_key *key,
                                         struct pending_call *cache)
{
    if (size > MAX_BLOCK_SIZE) {
        count(CNT_DROP_ALLOCS);
        return;
    }
    key->bucket = addr >> BUCKET_SHIFT;
    key->generation = current_generation();
    s64 index;
    if (cache->last_index && same_key(&cache->last_key, key)) {
        index = cache->last_index - 1;
    } else {
        index = stats_index(key);
        if (index >= 0) {
            cache->last_key = *key;
            cache->last_index = index + 1;
        }
    }
    struct heap_counts *c = counts_at(index);
    if (!c)
        return;
    u32 zero = 0;
    u64 *last = last_freed.lookup(&zero);
    if (last && *last == addr)
        *last = 0; /* handed out again: a free of it is a new one */
    if (!keep_block(addr, (size << STATS_INDEX_BITS) | index))
        return;
    __sync_fetch_and_add(&c->alloc_bytes, size);
    __sync_fetch_and_add(&c->alloc_count, 1);
    __sync_fetch_and_add(&c->alloc_chunk_bytes, chunk_of(size));
    mark_changed(c);
    add_live(size);
}

#ifndef NEST_WINDOW_NS
/* glibc's relays call malloc at their very start (realloc of NULL, an
 * alignment malloc already gives): an open call older than this cannot be
 * the outer call of a new entry; its return was lost. */
#define NEST_WINDOW_NS 100000000ULL /* 100 ms */
#endif

/* A call open in the thread's slot that a new entry at sp is nested in.
 * glibc calls its own public entry points (memalign and realloc relay to
 * malloc), often as a tail call at the same sp, where the return address
 * is already the uretprobe trampoline: the outer call, which read the real
 * caller, accounts for the block. Anything else is an open call whose
 * return was lost, which must not swallow the thread's later calls: it is
 * replaced. */
static __always_inline int nested_in(struct pending_call *call, u64 sp)
{
    if (!call->active || !call->may_nest || call->entry_sp < sp)
        return 0;
    return bpf_ktime_get_ns() - call->entry_ns < NEST_WINDOW_NS;
}

/* walk: the stack comes from our walk, tail-called: enter() is then the
 * program's last step (every allocating function; not malloc_trim).
 * may_nest: the function may call another hooked one (see nested_in). */
static __always_inline int enter(struct pt_regs *ctx, u32 kind, u64 size, u64 arg, u64 sp_adjust,
                                 int walk, int may_nest)
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
    if (nested_in(call, sp)) {
        call->nested++;
        return 0;
    }
    call->size = size;
    call->arg = arg;
    call->entry_sp = sp;
    call->kind = kind;
    call->may_nest = may_nest;
    call->entry_ns = may_nest ? bpf_ktime_get_ns() : 0;
    call->nested = 0;
    call->rss_anon_before = 0;
    call->caller_follows = 0;
    make_key(ctx, tid, sp, call, walk);
    call->active = 1;
    if (walk) {
        u32 zero = 0;
        struct walk_request *req = walk_requests.lookup(&zero);
        if (req) {
            req->entry_sp = sp;
            req->continuing = 0;
            walk_uprobe.call(ctx, WALK_HEAP);
        }
    }
    return 0;
}

/* The walk of an allocating call's stack, reached by tail call from enter() and
 * from itself: the key's stack and caller (see walk_begin). */
int walk_heap_stack(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct walk_request *req = walk_requests.lookup(&zero);
    if (!req)
        return 0;
    struct frame_walk *w = req->continuing ? walk_state.lookup(&zero)
                                           : walk_begin(ctx, req->entry_sp, 1);
    if (!w)
        return 0;
    if (!walk_steps(w)) {
        req->continuing = 1;
        walk_uprobe.call(ctx, WALK_HEAP);
    }
    req->continuing = 0;
    /* The call's slot only now: a task storage lookup per run adds up. */
    struct pending_call *call = open_call(bpf_get_current_pid_tgid());
    if (call) {
        call->key.caller = w->caller;
        call->key.stack = walk_end(w, &call->last_stack);
    }
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
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, MALLOC_SP_ADJUST, 1, 0);
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
    return enter(ctx, CALL_ALLOC, n * size, 0, CALLOC_SP_ADJUST, 1, 0);
}

static __always_inline int realloc_of(struct pt_regs *ctx, u64 old, u64 size)
{
    if (size == 0 && old != 0) {
#ifdef REALLOC_ZERO_FREES
        /* jemalloc, tcmalloc and mimalloc free the block inside, without
         * their public free(); mimalloc then returns a fresh empty block. */
        if (traced(bpf_get_current_pid_tgid()))
            forget_block(old);
        return enter(ctx, CALL_ALLOC, 0, 0, REALLOC_SP_ADJUST, 1, 1);
#else
        /* realloc(p, 0) is free(p) in glibc, through free() itself: left
         * to the free probe, so that free needs no look at calls in flight. */
        return 0;
#endif
    }
    return enter(ctx, CALL_REALLOC, size, old, REALLOC_SP_ADJUST, 1, 1);
}

/* realloc, and jemalloc's rallocx (p, size, flags) */
int realloc_enter(struct pt_regs *ctx)
{
    return realloc_of(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
}

/* reallocarray (p, n, size), a function of its own in mimalloc (glibc's
 * goes through realloc, probed there). */
int reallocarray_enter(struct pt_regs *ctx)
{
    u64 n = PT_REGS_PARM2(ctx), size = PT_REGS_PARM3(ctx);
    if (size) {
        u64 limit = ~0ULL / size;
        asm volatile("" : "+r"(limit)); /* as in calloc_enter */
        if (n > limit)
            return 0; /* overflow: fails without allocating */
    }
    return realloc_of(ctx, PT_REGS_PARM1(ctx), n * size);
}

/* memalign and aligned_alloc (one address in glibc 2.36): (alignment, size) */
int memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, MEMALIGN_SP_ADJUST, 1, 1);
}

/* A function of its own from glibc 2.38 on. */
int aligned_alloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM2(ctx), 0, ALIGNED_ALLOC_SP_ADJUST, 1, 1);
}

int valloc_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_ALLOC, PT_REGS_PARM1(ctx), 0, VALLOC_SP_ADJUST, 1, 1);
}

/* pvalloc promises whole pages: the program owns the rounded size. */
int pvalloc_enter(struct pt_regs *ctx)
{
    u64 size = (PT_REGS_PARM1(ctx) + TARGET_PAGE_SIZE - 1) & ~(u64)(TARGET_PAGE_SIZE - 1);
    return enter(ctx, CALL_ALLOC, size ? size : TARGET_PAGE_SIZE, 0, PVALLOC_SP_ADJUST, 1, 1);
}

int posix_memalign_enter(struct pt_regs *ctx)
{
    return enter(ctx, CALL_POSIX_MEMALIGN, PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx),
                 POSIX_MEMALIGN_SP_ADJUST, 1, 1);
}

int alloc_return(struct pt_regs *ctx)
{
    u32 tid;
    struct pending_call *call = leave(&tid);
    if (!call)
        return 0;
    struct heap_key key = call->key;
    if (!key.caller) {
        /* The uretprobe runs with ip set back to the return address: the
         * caller, at no cost. */
        key.caller = PT_REGS_IP(ctx);
        if (call->caller_follows)
            emit_caller(tid, &key);
    }
    u64 addr = PT_REGS_RC(ctx);
    if (call->kind == CALL_POSIX_MEMALIGN) {
        u64 block = 0;
        if (addr == 0) /* else an error number, nothing allocated */
            bpf_probe_read_user(&block, sizeof(block), (void *)call->arg);
        addr = block;
    } else if (call->kind == CALL_REALLOC) {
        /* glibc frees the old block when it returns a new one; on
         * failure the old block stays. */
        if (call->arg && addr)
            forget_block(call->arg);
    }
    if (addr)
        record_block(addr, call->size, &key, call);
    /* Last: with the hash-map fallback, closing deletes the slot. */
    close_call(tid, call);
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
    struct target_state *t = target_state(bpf_get_current_pid_tgid());
    if (!t)
        return 0;
    __sync_fetch_and_add(&t->trim_calls, 1);
    enter(ctx, CALL_TRIM, 0, 0, TRIM_SP_ADJUST, 0, 0);
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
    struct target_state *t = target_state(bpf_get_current_pid_tgid());
    if (call->kind == CALL_TRIM) {
        if (PT_REGS_RC(ctx) == 1 && t)
            __sync_fetch_and_add(&t->trim_released_calls, 1);
        emit_trim(call, PT_REGS_RC(ctx));
    }
    close_call(tid, call);
    return 0;
}
