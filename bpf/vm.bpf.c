/* Address-space layer: what the process asks of the kernel's memory map.
 *
 * Syscall tracepoints, not kprobes: they are a stable interface and exist
 * where kprobes do not. Arguments are kept at entry and the event is sent
 * at exit, with the result, through a ring buffer: these calls are rare
 * next to malloc (thousands a second at most, during malloc_trim), and the
 * address-space model needs each one in order. */

#ifndef VM_RINGBUF_PAGES
/* 16 MiB (--event-buffer): ~150,000 events of 112 B. glibc grows a thread
 * heap with one mprotect every few pages: 8 threads filling 100 MiB each
 * made ~100,000 events in under a second, a burst that 4 MiB lost. */
#define VM_RINGBUF_PAGES 4096
#endif

#ifndef VM_WAKE_EVERY
/* Waking the reader at each event cost ~15 us per event in a VM guest (the
 * ring buffer's wakeup is an interrupt, and the guest's self-IPI exits to
 * the host): 16 us added to every madvise glibc makes when a thread heap
 * shrinks. The reader is woken once per VM_WAKE_EVERY events of a CPU
 * (~110 KiB) and otherwise reads every 100 ms. */
#define VM_WAKE_EVERY 1024
#endif

struct vm_call {
    u32 kind;
    u32 active; /* task storage keeps the slot between calls */
    u64 a0, a1, a2, a3, a4;
};

BPF_RINGBUF_OUTPUT(vm_events, VM_RINGBUF_PAGES);
/* Never written: gives Python the layout of struct vm_event (bcc decodes
 * map values, nested structs included, but not ring buffer records). */
BPF_ARRAY(vm_event_layout, struct vm_event, 1);
BPF_ARRAY(vm_scan_layout, struct vm_scan, 1);

/* The syscall each thread is in, from its entry to its exit, where the
 * result is known. Task storage where the kernel allows it, as for the
 * heap layer's calls: a hash map's update and delete were most of the
 * cost of an event. */
#ifdef CALLS_IN_TASK_STORAGE
BPF_TASK_STORAGE(vm_calls_by_task, struct vm_call);

static __always_inline struct vm_call *vm_call_slot(u32 tid, int create)
{
    return vm_calls_by_task.task_storage_get((struct task_struct *)bpf_get_current_task_btf(), 0,
                                             create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline void vm_call_done(u32 tid, struct vm_call *call)
{
    call->active = 0;
}
#else
BPF_HASH(vm_calls, u32, struct vm_call, MAX_THREADS);

static __always_inline struct vm_call *vm_call_slot(u32 tid, int create)
{
    struct vm_call *call = vm_calls.lookup(&tid);
    if (call || !create)
        return call;
    struct vm_call fresh = {};
    vm_calls.insert(&tid, &fresh);
    return vm_calls.lookup(&tid);
}

static __always_inline void vm_call_done(u32 tid, struct vm_call *call)
{
    vm_calls.delete(&tid);
}
#endif

/* The target's RSS counters (its target_state's rss), as kmem:rss_stat
 * last reported them: read at malloc_trim's entry and exit to measure what
 * the trim gave back, and by Python for the process as it was at its exit. */
static __always_inline s64 current_rss_anon(void)
{
    struct target_state *t = target_state(bpf_get_current_pid_tgid());
    return t ? t->rss.bytes[RSS_ANON] : 0;
}

/* The flag for ringbuf_submit: see VM_WAKE_EVERY. */
static __always_inline u64 wake_flag(void)
{
    u32 which = CNT_VM_SENT;
    u64 *sent = counters.lookup(&which);
    if (!sent)
        return 0;
    u64 n = ++*sent;
    return n % VM_WAKE_EVERY ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}

static __always_inline int vm_enter(u32 kind, u64 a0, u64 a1, u64 a2, u64 a3, u64 a4)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    struct vm_call *call = vm_call_slot(id, 1);
    if (!call)
        return 0;
    call->kind = kind;
    call->a0 = a0;
    call->a1 = a1;
    call->a2 = a2;
    call->a3 = a3;
    call->a4 = a4;
    call->active = 1;
    return 0;
}


/* An event waiting for its stack: the walk program (walk_vm_stack) sends it. */
BPF_PERCPU_ARRAY(vm_unsent, struct vm_scan, 1);

static __always_inline void send_unsent(struct vm_scan *e, u32 scan, u64 wake)
{
    if (scan)
        vm_events.ringbuf_output(e, sizeof(struct vm_scan), wake);
    else
        vm_events.ringbuf_output(e, sizeof(struct vm_event), wake);
}

/* A file mapped executable: a library whose unwind table Python must
 * load (collect/unwind.py) before its frames can be walked. */
static __always_inline int maps_code(struct vm_call *call)
{
    return call->kind == VM_MMAP && (call->a2 & 0x4 /* PROT_EXEC */) &&
           !(call->a3 & 0x20 /* MAP_ANONYMOUS */);
}

/* Into walk_vm_stack, by the prog array of this layer's program type;
 * returns only where the walk program is missing. */
static __always_inline void walk_vm(void *ctx)
{
#ifdef VM_KPROBES
    walk_kprobe.call(ctx, WALK_VM);
#else
    walk_tracepoint.call(ctx, WALK_VM);
#endif
}

/* with_stack: a constant per program, so that programs without the walk
 * (munmap, madvise) do not tail-call it. */
static __always_inline int vm_exit(void *ctx, s64 ret, int with_stack)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!traced(id))
        return 0;
    u32 tid = id;
    struct vm_call *call = vm_call_slot(tid, 0);
    if (!call || !call->active)
        return 0;
    u32 zero = 0;
    struct vm_scan *unsent = vm_unsent.lookup(&zero);
    struct walk_request *req = walk_requests.lookup(&zero);
    if (!unsent || !req) {
        count(CNT_VM_LOST);
        vm_call_done(tid, call);
        return 0;
    }
    struct vm_event *e = &unsent->event;
    u32 scan = 0;
#if defined(LIGHT_SCAN) && defined(CALLS_IN_TASK_STORAGE)
    scan = with_stack && call->kind == VM_MMAP;
    if (scan) {
        struct pt_regs *regs =
            (struct pt_regs *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
        if (bpf_probe_read_user(unsent->words, sizeof(unsent->words), (void *)PT_REGS_SP(regs)) != 0)
            __builtin_memset(unsent->words, 0, sizeof(unsent->words));
    }
#endif
    e->ts_ns = bpf_ktime_get_ns();
    e->tid = tid;
    e->tgid = id >> 32;
    e->kind = call->kind;
    e->result = ret;
    e->addr = call->a0;
    e->len = call->a1;
    e->prot = call->a2;
    e->flags = call->a3;
    e->new_len = 0;
    e->new_addr = 0;
    if (call->kind == VM_MREMAP) {
        /* (addr, old_len, new_len, flags, new_addr) */
        e->prot = 0;
        e->new_len = call->a2;
        e->flags = call->a3;
        e->new_addr = call->a4;
    }
    e->stack = 0;
    struct pending_call *open = open_call(tid);
    e->in_malloc = open != 0;
    if (open) {
        e->malloc_key = open->key;
        if (!open->key.caller) {
            e->in_malloc = IN_MALLOC_CALLER_FOLLOWS;
            open->caller_follows = 1;
        }
    } else {
        __builtin_memset(&e->malloc_key, 0, sizeof(e->malloc_key));
    }
    /* Woken now for new code, else paced (wake_flag). */
    req->wake = wake_flag();
    if (maps_code(call))
        req->wake = BPF_RB_FORCE_WAKEUP;
    vm_call_done(tid, call);
    /* Who made a region matters; who unmapped or advised it does not,
     * and a stack walk is most of an event's cost. */
    if (with_stack) {
        req->scan = scan;
        req->continuing = 0;
        walk_vm(ctx);
        /* reached only without the walk program */
    }
    send_unsent(unsent, scan, req->wake);
    return 0;
}

/* The walk for an address-space event, reached by tail call from vm_exit
 * and from itself (loaded by Python into walk_kprobe or walk_tracepoint).
 * Where the kernel gives a task's user registers to BPF (with task
 * storage: the same kernels), our own walk, which does not fault on
 * glibc's frame-pointer-less code as the kernel's walk does (~0.7 us per
 * mmap otherwise, in light mode the whole cost). */
int walk_vm_stack(void *ctx)
{
    u32 zero = 0;
    struct vm_scan *unsent = vm_unsent.lookup(&zero);
    struct walk_request *req = walk_requests.lookup(&zero);
    if (!unsent || !req)
        return 0;
#ifdef CALLS_IN_TASK_STORAGE
    struct frame_walk *w;
    if (req->continuing) {
        w = walk_state.lookup(&zero);
    } else {
        struct pt_regs *regs =
            (struct pt_regs *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
        w = walk_begin(regs, PT_REGS_SP(regs), 0);
    }
    if (w && !walk_steps(w)) {
        req->continuing = 1;
        walk_vm(ctx);
    }
    req->continuing = 0;
    u64 stored = 0;
    unsent->event.stack = w ? walk_end(w, &stored) : 0;
#else
    unsent->event.stack = user_stack(ctx);
#endif
    send_unsent(unsent, req->scan, req->wake);
    return 0;
}

#ifdef VM_KPROBES
/* The alternative for kernels with kprobes (--vm-probes kprobe): the same
 * calls caught on the syscall functions; bcc maps the arguments of
 * syscall__ functions through the syscall wrapper. */
int syscall__mmap(struct pt_regs *ctx, unsigned long addr, unsigned long len, unsigned long prot,
                  unsigned long flags, unsigned long fd)
{
    return vm_enter(VM_MMAP, addr, len, prot, flags, fd);
}
int syscall__munmap(struct pt_regs *ctx, unsigned long addr, size_t len)
{
    return vm_enter(VM_MUNMAP, addr, len, 0, 0, 0);
}
int syscall__brk(struct pt_regs *ctx, unsigned long brk)
{
    return vm_enter(VM_BRK, brk, 0, 0, 0, 0);
}
int syscall__mprotect(struct pt_regs *ctx, unsigned long start, size_t len, unsigned long prot)
{
    return vm_enter(VM_MPROTECT, start, len, prot, 0, 0);
}
int syscall__mremap(struct pt_regs *ctx, unsigned long addr, unsigned long old_len,
                    unsigned long new_len, unsigned long flags, unsigned long new_addr)
{
    return vm_enter(VM_MREMAP, addr, old_len, new_len, flags, new_addr);
}
int syscall__madvise(struct pt_regs *ctx, unsigned long start, size_t len, int behavior)
{
    return vm_enter(VM_MADVISE, start, len, behavior, 0, 0);
}
int vm_syscall_return(struct pt_regs *ctx)
{
    return vm_exit(ctx, PT_REGS_RC(ctx), 1);
}
#else
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    return vm_enter(VM_MMAP, args->addr, args->len, args->prot, args->flags, args->fd);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mmap) { return vm_exit(args, args->ret, 1); }

TRACEPOINT_PROBE(syscalls, sys_enter_munmap)
{
    return vm_enter(VM_MUNMAP, args->addr, args->len, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_munmap) { return vm_exit(args, args->ret, 0); }

TRACEPOINT_PROBE(syscalls, sys_enter_brk)
{
    return vm_enter(VM_BRK, args->brk, 0, 0, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_brk) { return vm_exit(args, args->ret, 1); }

TRACEPOINT_PROBE(syscalls, sys_enter_mprotect)
{
    return vm_enter(VM_MPROTECT, args->start, args->len, args->prot, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mprotect) { return vm_exit(args, args->ret, 1); }

TRACEPOINT_PROBE(syscalls, sys_enter_mremap)
{
    return vm_enter(VM_MREMAP, args->addr, args->old_len, args->new_len, args->flags,
                    args->new_addr);
}
TRACEPOINT_PROBE(syscalls, sys_exit_mremap) { return vm_exit(args, args->ret, 1); }

TRACEPOINT_PROBE(syscalls, sys_enter_madvise)
{
    return vm_enter(VM_MADVISE, args->start, args->len_in, args->behavior, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_madvise) { return vm_exit(args, args->ret, 0); }
#endif

/* Fires on every change of an RSS counter: keep only the target's own
 * counts, one store, no event. Only while its mm is current (curr): at
 * exit the task lets go of its mm before tearing it down, so the values
 * kept are those of the process's last moment. */
TRACEPOINT_PROBE(kmem, rss_stat)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!args->curr || !traced(id))
        return 0;
    struct target_state *t = target_state(id);
    u32 member = args->member;
    if (!t || member >= RSS_MEMBERS)
        return 0;
    struct rss_now *v = &t->rss;
    v->bytes[member] = args->size;
    v->seen |= 1ULL << member;
    v->ts_ns = bpf_ktime_get_ns();
    return 0;
}

/* A zeroed event of the heap layer's, about a call with this key; 0 when
 * the buffer is full (counted). */
static __always_inline struct vm_event *call_event(u32 tid, u32 kind, struct heap_key *key)
{
    struct vm_event *e = vm_events.ringbuf_reserve(sizeof(struct vm_event));
    if (!e) {
        count(CNT_VM_LOST);
        return 0;
    }
    __builtin_memset(e, 0, sizeof(*e));
    e->ts_ns = bpf_ktime_get_ns();
    e->tid = tid;
    e->tgid = bpf_get_current_pid_tgid() >> 32;
    e->kind = kind;
    e->in_malloc = 1;
    e->malloc_key = *key;
    return e;
}

/* Called by the heap layer when malloc_trim returns. */
static __always_inline void emit_trim(struct pending_call *call, s64 ret)
{
    struct vm_event *e = call_event(bpf_get_current_pid_tgid(), VM_TRIM, &call->key);
    if (!e)
        return;
    e->result = ret;
    e->new_len = call->rss_anon_before;
    e->new_addr = current_rss_anon();
    e->stack = call->key.stack;
    vm_events.ringbuf_submit(e, wake_flag());
}

/* Called by the heap layer when a call that sent events without its
 * caller returns, the caller known at last. */
static __always_inline void emit_caller(u32 tid, struct heap_key *key)
{
    struct vm_event *e = call_event(tid, VM_CALLER, key);
    if (e)
        vm_events.ringbuf_submit(e, wake_flag());
}
