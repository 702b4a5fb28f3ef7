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

#ifndef MAX_TARGETS
#define MAX_TARGETS 1024
#endif
/* The processes traced, by tgid: one for a trace, every process the agent
 * follows for its shared object. A bit per possible tgid (PID_MAX_LIMIT,
 * 4 Mi: a 512 KiB array) is what every probe checks, in a few ns where a
 * hash lookup cost ~60 ns per malloc; what the kernel keeps for a process
 * is in the targets hash, looked up on rare paths only. Python sets both
 * before a process's probes and clears both after them. */
BPF_ARRAY(traced_tgids, u64, TGID_LIMIT / 64);
BPF_HASH(targets, u32, struct target_state, MAX_TARGETS);

/* Uprobes attach per process, but a child forked by the target inherits
 * breakpoints until the kernel drops them, and tracepoints see every
 * process: the thread group decides. */
static __always_inline int traced(u64 id)
{
    u32 tgid = id >> 32;
    u32 word = tgid / 64;
    u64 *bits = traced_tgids.lookup(&word);
    return bits && (*bits >> (tgid % 64)) & 1;
}

/* The state of a traced process; 0 for one not traced. */
static __always_inline struct target_state *target_state(u64 id)
{
    u32 tgid = id >> 32;
    return targets.lookup(&tgid);
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
 * 0.5 us (see walk_begin for our own walk). */
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

/* Unwind tables, filled by Python (collect/unwind.py) from the .eh_frame
 * of every module built without frame pointers, before the probes attach
 * and when a library is mapped. unwind_modules: sorted by lo, the first
 * unwind_head.modules in use; unwind_pages: per 4 KiB page of a module (from
 * its first_page), the row that holds at the page's start, one more at the
 * end; unwind_rows: sorted by pc within a module. */
#ifndef MAX_UNWIND_ROWS
#define MAX_UNWIND_ROWS (1 << 19)
#endif
#ifndef MAX_UNWIND_PAGES
#define MAX_UNWIND_PAGES (1 << 16)
#endif
BPF_F_TABLE("array", u32, struct unwind_row, unwind_rows, MAX_UNWIND_ROWS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, u32, unwind_pages, MAX_UNWIND_PAGES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct unwind_module, unwind_modules, MAX_UNWIND_MODULES, BPF_F_MMAPABLE);
BPF_ARRAY(unwind_head, struct unwind_head, 1);

/* The rows last found, per CPU, by return address: a hot stack's frames
 * are found again in one lookup, where the search takes ~10. An entry of
 * another generation of the tables (a module added, an exec) is stale. */
#define UNWIND_CACHE_BITS 12
struct unwind_cached {
    u64 pc;
    u32 generation;
    struct unwind_row row;
};
BPF_PERCPU_ARRAY(unwind_cache, struct unwind_cached, 1 << UNWIND_CACHE_BITS);

#define NO_TABLE 0xFFFFFFFF
/* Bisection steps: the modules, and the rows of one page (Python keeps
 * at most 1 << ROW_SEARCH_STEPS per page). */
#ifndef MODULE_SEARCH_STEPS
#define MODULE_SEARCH_STEPS 9
#endif
#ifndef ROW_SEARCH_STEPS
#define ROW_SEARCH_STEPS 12
#endif

/* The walk is a program of its own, reached by tail call from the
 * programs that want a stack (walk_heap_stack, walk_vm_stack): the
 * verifier checks it once, where each inlined copy cost ~0.6 s of load
 * time. A tail call needs the caller's program type and attach type: the
 * uprobes (slot WALK_HEAP; uprobe_multi links where the kernel has them),
 * the syscall kprobes of --vm-probes kprobe (perf events) and the syscall
 * tracepoints (slot WALK_VM). */
enum walk_kind { WALK_HEAP = 0, WALK_VM = 1 };
BPF_PROG_ARRAY(walk_uprobe, 2);
BPF_PROG_ARRAY(walk_kprobe, 2);
BPF_PROG_ARRAY(walk_tracepoint, 2);
/* What the tail-called walk needs from its caller. */
struct walk_request {
    u64 entry_sp;
    u32 scan;       /* vm: the event carries the stack's top words */
    u32 continuing; /* 0: a new walk; 1: the walk program called itself */
    u64 wake;       /* vm: the ring buffer flag the event is sent with */
};
BPF_PERCPU_ARRAY(walk_requests, struct walk_request, 1);

/* The walk's state lives in a map, not on the BPF stack: a value read
 * back from a map is new to the verifier, so the bounds it proves within
 * one step do not make the next steps' states differ (on the stack they
 * did, and the number of states doubled with every step). */
struct frame_walk {
    u64 base, have; /* chunk holds user bytes [base, base + have) */
    u64 sp;         /* the frame's stack pointer: its caller's frame lies above */
    u64 fp;
    u64 pc;         /* where the frame's code is (a return address after the first) */
    u64 hash;
    u64 range_lo, range_hi; /* the module (or the gap between two) last found */
    u32 range_page;         /* the module's first page (NO_TABLE: no table there) */
    u32 modules;
    u32 generation;         /* of the tables (unwind_head) */
    u32 pc_after_call;      /* pc is a return address: its call is at pc - 1 */
    u32 depth;              /* frames found (the next goes to ip[depth + 1]) */
    u64 caller;             /* at_entry: the return address at entry_sp */
    u64 sender_sp;          /* w->pc's frame is interpreted Java: its caller's sp (0: not) */
    struct py_walk py;      /* a CPython process's Python frames (python.bpf.c) */
    struct go_walk go;      /* a Go program's cgo crossing (go.bpf.c) */
};
BPF_PERCPU_ARRAY(walk_state, struct frame_walk, 1);

/* The module holding pc, or the gap between the two around it, into
 * w->range_*: consecutive frames are mostly in one module, so the search
 * is rare. */
static __always_inline void find_range(struct frame_walk *w, u64 pc)
{
    u32 lo = 0, hi = w->modules, page = NO_TABLE;
    u64 gap_lo = 0, gap_hi = ~0ULL, mod_lo = 0;
    for (int k = 0; k < MODULE_SEARCH_STEPS; k++) {
        if (lo >= hi)
            break;
        u32 mid = (lo + hi) / 2;
        struct unwind_module *m = unwind_modules.lookup(&mid);
        if (!m)
            break;
        if (m->lo <= pc) {
            lo = mid + 1;
            mod_lo = m->lo;
            gap_lo = m->hi;
            page = m->first_page;
        } else {
            hi = mid;
            gap_hi = m->lo;
        }
    }
    if (page != NO_TABLE && pc < gap_lo) {
        w->range_lo = mod_lo;
        w->range_hi = gap_lo;
        w->range_page = page;
    } else {
        w->range_lo = gap_lo;
        w->range_hi = gap_hi;
        w->range_page = NO_TABLE;
    }
}

/* The unwind row that holds at pc, 0 where there is none (no table, or
 * code without CFI): the frame-pointer step then. */
static __always_inline struct unwind_row *unwind_row_at(struct frame_walk *w, u64 pc)
{
    if (pc - w->range_lo >= w->range_hi - w->range_lo)
        find_range(w, pc);
    if (w->range_page == NO_TABLE)
        return 0;
    u64 x = pc - w->range_lo;
    u32 p = w->range_page + (u32)(x >> 12);
    u32 *first = unwind_pages.lookup(&p);
    p++;
    u32 *last = unwind_pages.lookup(&p);
    if (!first || !last)
        return 0;
    u32 a = *first, b = *last;
    for (int k = 0; k < ROW_SEARCH_STEPS; k++) {
        if (a >= b)
            break;
        u32 mid = a + (b - a + 1) / 2;
        struct unwind_row *r = unwind_rows.lookup(&mid);
        if (!r)
            return 0;
        if (r->pc <= x)
            a = mid;
        else
            b = mid - 1;
    }
    struct unwind_row *r = unwind_rows.lookup(&a);
    return r && r->pc <= x ? r : 0;
}

/* The bound checked at the very access: the compiler otherwise checks
 * one copy of the index and indexes with another. */
static __always_inline void put_frame(struct stack_frames *frames, u64 slot, u64 value)
{
    asm volatile("" : "+r"(slot));
    if (slot < MAX_STACK_DEPTH)
        frames->ip[slot] = value;
}

/* One frame of the walk: 1 ends it. The frame's CFA comes from its
 * module's unwind row, else from its size for compiled Java code
 * (jvm.bpf.c), else from the frame pointer (code built with them, or
 * without CFI: other JIT code). (bpf_loop would verify it once, but
 * bcc 0.26 leaves its callback pointer unrelocated.) */
static __always_inline long walk_step(struct frame_walk *w, struct stack_frames *frames,
                                      struct stack_chunk *chunk)
{
    u32 slot = w->depth + 1; /* ip[0] is the probed instruction */
    if (slot >= MAX_STACK_DEPTH)
        return 1;
    if (w->py.pending) { /* one Python frame a step, the native walk waits */
        u64 python = py_step(&w->py);
        if (python) {
            put_frame(frames, slot, python);
            w->hash = (w->hash ^ python) * 0x100000001b3ULL;
            w->depth = slot;
        }
        return 0;
    }
    if (w->pc_after_call && go_cgocall_frame(&w->go, w->pc)) {
        /* From the system stack to the goroutine's (go.bpf.c); the frame
         * pointer is runtime.cgocall's still (asmcgocall leaves it). */
        u64 gsp = go_caller_sp(w->sp), ret = 0;
        if (!gsp || bpf_probe_read_user(&ret, 8, (void *)gsp) != 0 || !ret)
            return 1;
        put_frame(frames, slot, ret);
        w->hash = (w->hash ^ ret) * 0x100000001b3ULL;
        w->depth = slot;
        w->sp = gsp + 8;
        w->pc = ret;
        w->have = 0; /* another stack: read afresh */
        w->sender_sp = 0;
        return 0;
    }
    u64 at = w->pc - w->pc_after_call;
    u32 slot_in_cache = (u32)((at * 0x9E3779B97F4A7C15ULL) >> (64 - UNWIND_CACHE_BITS));
    struct unwind_cached *cached = unwind_cache.lookup(&slot_in_cache);
    if (!cached)
        return 1;
    if (cached->pc != at || cached->generation != w->generation) {
        struct unwind_row *found = unwind_row_at(w, at);
        struct unwind_row none = {};
        cached->row = found ? *found : none;
        cached->pc = at;
        cached->generation = w->generation;
    }
    u32 rule = cached->row.rule;
    u64 cfa_off = cached->row.cfa_off, rbp_slot = cached->row.rbp_slot;
    u64 cfa, fp_at = 0;
    if (rule == UNWIND_END)
        return 1; /* the outermost frame (_start, clone) */
    if (rule == UNWIND_RSP || rule == UNWIND_RBP) {
        cfa = (rule == UNWIND_RBP ? w->fp : w->sp) + cfa_off;
        if (rbp_slot)
            fp_at = cfa - 8 * rbp_slot;
    } else if ((cfa = jvm_compiled_frame_bytes(at)) != 0) {
        cfa += w->sp; /* compiled Java code (jvm.bpf.c) */
        fp_at = cfa - 16;
    } else {
        cfa = w->fp + 16; /* the frame-pointer step */
        fp_at = w->fp;
    }
    /* A caller's frame lies above its callee's, within the thread's
     * stack: a CFA that cannot be one ends the walk. */
    u64 lowest = fp_at && fp_at < cfa - 8 ? fp_at : cfa - 8;
    if (lowest < w->sp || cfa - w->sp > STACK_SPAN || cfa - lowest > STACK_CHUNK)
        return 1;
    if (lowest < w->base || cfa - w->base > w->have) {
        w->base = lowest;
        w->have = STACK_CHUNK;
        if (bpf_probe_read_user(chunk->b, STACK_CHUNK, (void *)lowest) != 0) {
            /* within STACK_CHUNK of the end of the stack's mapping */
            w->have = 64;
            if (cfa - lowest > 64 || bpf_probe_read_user(chunk->b, 64, (void *)lowest) != 0)
                return 1;
        }
    }
    u64 ra_off = cfa - 8 - w->base;
    if (ra_off > STACK_CHUNK - 8) /* for the verifier: checked above */
        return 1;
    u64 ret = *(u64 *)&chunk->b[ra_off];
    u64 next_fp = w->fp;
    if (fp_at) {
        u64 fp_off = fp_at - w->base;
        if (fp_off > STACK_CHUNK - 8)
            return 1;
        next_fp = *(u64 *)&chunk->b[fp_off];
    }
    if (!ret)
        return 1;
    /* The frame of w->pc is whole here: its CFA (cfa) and its frame
     * pointer (w->fp). A layer that reads more of a frame does it at this
     * point: an interpreted Java frame is stored as its method (jvm.bpf.c),
     * a CPython interpreter loop as the Python frames it runs, from the next
     * steps on (python.bpf.c), while the walk goes on from the return
     * address. */
    u64 sender_sp;
    u64 shown = jvm_frame(ret, next_fp, &sender_sp);
    if (!py_loop_frame(&w->py, ret)) {
        put_frame(frames, slot, shown);
        w->hash = (w->hash ^ shown) * 0x100000001b3ULL;
        w->depth = slot;
    }
    /* An interpreted frame's caller starts at its sender sp, above the
     * CFA when a compiled caller's arguments were spread for it. */
    w->sp = w->sender_sp > cfa && w->sender_sp - cfa < STACK_CHUNK ? w->sender_sp : cfa;
    w->sender_sp = sender_sp;
    w->fp = next_fp;
    w->pc = ret;
    w->pc_after_call = 1;
    return 0;
}

#ifndef WALK_STEPS
/* Frames per run of a walk program, which tail-calls itself for more (at
 * most 32 times in a chain: 8 x 33 runs hold MAX_STACK_DEPTH). The
 * verifier's work is linear in the steps: the rows come from the cache in
 * a map, so one step's bounds do not reach the next. Each step grew with
 * the Python and Go frames: at 32 steps every load of the object spent
 * 2.2 s in the verifier (every trace's start), at 8 0.5 s, while a walk of
 * 24 frames (three runs, not one) costs the same within 1 %: a tail call
 * is cheap beside a step (bench/README.md, fixed cost). */
#define WALK_STEPS 8
#endif

/* The key of the current user stack (0: none), in the layout of
 * user_stack (ip[0] the probed instruction, then one return address per
 * frame), in three parts: walk_begin, walk_steps until it says the walk
 * ended (the walk program tail-calling itself in between), walk_end.
 * at_entry: the probe is at a function's entry, whose return address is
 * at entry_sp: it goes to w->caller, not into the frames (the heap key
 * keeps it apart), and the walk starts at the caller's frame; else (a
 * syscall) the walk starts at the instruction.
 *
 * Our own walk, where bpf_get_stack cost ~0.7 us even for one frame and
 * follows only frame pointers. Each frame's CFA comes from the .eh_frame
 * rules of its module (unwind_row_at), or from the frame pointer where the
 * module keeps them or has no CFI; a CFA that cannot be one (not above the
 * previous frame, or beyond STACK_SPAN) ends the walk. The stack is read
 * STACK_CHUNK bytes at a time. Every frame read goes into the hash, so
 * distinct walks never share a key; it stops only where no real frame can
 * be, or at MAX_STACK_DEPTH as bpf_get_stack does. */
static __always_inline struct frame_walk *walk_begin(struct pt_regs *regs, u64 entry_sp, int at_entry)
{
    u32 zero = 0;
    struct stack_chunk *chunk = chunk_scratch.lookup(&zero);
    struct stack_frames *frames = stack_scratch.lookup(&zero);
    struct frame_walk *w = walk_state.lookup(&zero);
    struct unwind_head *head = unwind_head.lookup(&zero);
    if (!chunk || !frames || !w || !head)
        return 0;
    u64 ip = PT_REGS_IP(regs);
    w->base = entry_sp;
    w->have = 0;
    if (bpf_probe_read_user(chunk->b, STACK_CHUNK, (void *)entry_sp) == 0)
        w->have = STACK_CHUNK; /* the caller and the first frames in one read */
    else if (bpf_probe_read_user(chunk->b, 64, (void *)entry_sp) == 0)
        w->have = 64;
    w->caller = w->have && at_entry ? *(u64 *)chunk->b : 0;
    frames->ip[0] = ip;
    w->depth = 0;
    w->sp = at_entry ? entry_sp + 8 : PT_REGS_SP(regs);
    w->fp = PT_REGS_FP(regs);
    w->pc = at_entry ? w->caller : ip;
    w->pc_after_call = at_entry ? 1 : 0;
    w->sender_sp = 0;
    w->hash = (0xcbf29ce484222325ULL ^ ip) * 0x100000001b3ULL; /* as in user_stack */
    w->range_lo = w->range_hi = 0;
    w->modules = head->modules;
    w->generation = head->generation;
    py_walk_begin(&w->py, bpf_get_current_pid_tgid());
    go_walk_begin(&w->go, bpf_get_current_pid_tgid());
#ifdef NO_STACKS /* benchmarks only: what the stack walk costs */
    w->depth = MAX_STACK_DEPTH;
#endif
    return w;
}

/* Up to WALK_STEPS frames; 1: the walk ended. */
static __always_inline int walk_steps(struct frame_walk *w)
{
    u32 zero = 0;
    struct stack_chunk *chunk = chunk_scratch.lookup(&zero);
    struct stack_frames *frames = stack_scratch.lookup(&zero);
    if (!chunk || !frames)
        return 1;
    for (int i = 0; i < WALK_STEPS; i++)
        if (walk_step(w, frames, chunk))
            return 1;
    return 0;
}

/* The walk's key, its stack stored once. *last_stored: the key this
 * thread stored last, not looked up again; updated. */
static __always_inline u64 walk_end(struct frame_walk *w, u64 *last_stored)
{
#ifdef NO_STACKS
    return 0;
#endif
    u32 zero = 0;
    struct stack_frames *frames = stack_scratch.lookup(&zero);
    if (!frames)
        return 0;
    put_frame(frames, w->depth + 1, 0); /* the end mark */
    u64 hash = w->hash;
    /* The thread stored this very stack last time: it is in the map. */
    if ((hash | 1) == *last_stored)
        return *last_stored;
    /* A new stack with Python frames is announced (python.bpf.c). */
    u64 key = hash | 1;
    int announce = py_walk_stored(&w->py) && !stacks.lookup(&key);
    /* What lies past the end mark is stale and never read. */
    *last_stored = store_stack(frames, hash);
    if (announce)
        py_announce(*last_stored);
    return *last_stored;
}
