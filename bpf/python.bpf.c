/* Python frames of a CPython 3.11 process. Since 3.11 one C call of the
 * interpreter loop (_PyEval_EvalFrameDefault) runs a chain of Python
 * frames: the thread's innermost _PyInterpreterFrame (its thread state's
 * cframe->current_frame) and those it links by `previous`, up to the one
 * marked is_entry, where that C call began; the next frame belongs to the
 * next interpreter loop call outwards. So the walk (common.bpf.c), at each
 * return address into the loop, stores the Python frames instead, reading
 * one per step, and goes on natively from the loop's caller.
 * The thread state is the GIL holder's (_PyRuntime.gilstate.tstate_current)
 * when the current thread holds the GIL (its native_thread_id is ours), and
 * is then kept per thread (py_tstates); a thread that released the GIL
 * around C work (sqlite3_step, opendir, an SSL handshake, which allocate)
 * still has its own thread state, whose current frame is the one that
 * called that C function: it is read from there, never another thread's.
 * Joined before common.bpf.c: its walk state holds a struct py_walk. */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

#ifndef PY_MAX_FRAMES
/* Python frames read per stack, at most (one user-memory read each):
 * deeper ones keep their native interpreter-loop frames. */
#define PY_MAX_FRAMES 64
#endif
#define PY_NO_FRAME 1 /* no (more) Python frames to show in this walk */

BPF_ARRAY(py_runtime, struct py_runtime, 1);
/* The keys of new stacks that hold Python frames: Python names their code
 * objects at its next look (every 0.1 s), while they and the process live,
 * where a script shorter than one interval would be gone by the snapshot
 * that names its stacks. */
#ifndef PY_RINGBUF_PAGES
#define PY_RINGBUF_PAGES 16
#endif
BPF_RINGBUF_OUTPUT(py_new_stacks, PY_RINGBUF_PAGES);
#ifndef PY_MAX_THREADS
/* Threads whose thread state is kept: an LRU, as threads come and go
 * without telling; one that fell out is found again when it next holds
 * the GIL, which Python code does between any two C calls. */
#define PY_MAX_THREADS 4096
#endif
BPF_TABLE("lru_hash", u32, u64, py_tstates, PY_MAX_THREADS);

struct py_walk {
    u64 eval_lo, eval_hi; /* 0, 0: not the Python process */
    u64 tstate_at;
    u64 frame;  /* the next _PyInterpreterFrame (0: not read yet; PY_NO_FRAME) */
    u64 native; /* the loop's return address: shown if none of its frames reads */
    u32 pending; /* the frames of a loop call are being shown */
    u32 shown;   /* of them, so far */
    u32 budget;  /* frames that may still be read */
    u32 unused;
};

/* _PyInterpreterFrame from f_code to owner. */
struct py_frame_fields {
    u64 code;
    u64 frame_obj;
    u64 previous;
    u64 prev_instr;
    s32 stacktop;
    u8 is_entry;
    u8 owner;
    u16 unused;
};
_Static_assert(sizeof(struct py_frame_fields) == 40, "_PyInterpreterFrame from f_code");

/* At the start of a walk of process `id` (bpf_get_current_pid_tgid): a
 * process that is not the Python one pays this lookup and a compare per
 * frame. */
static __always_inline void py_walk_begin(struct py_walk *p, u64 id)
{
    u32 zero = 0;
    struct py_runtime *rt = py_runtime.lookup(&zero);
    p->pending = 0;
    if (rt && rt->tgid && rt->tgid == id >> 32) {
        p->eval_lo = rt->eval_lo;
        p->eval_hi = rt->eval_hi;
        p->tstate_at = rt->tstate_at;
        p->frame = 0;
        p->budget = PY_MAX_FRAMES;
    } else {
        p->eval_lo = p->eval_hi = 0; /* no return address is in this range */
    }
}

/* Whether return address `ret` is into the interpreter loop, whose Python
 * frames are then shown (py_step) in its place. */
static __always_inline int py_loop_frame(struct py_walk *p, u64 ret)
{
    if (ret - 1 - p->eval_lo >= p->eval_hi - p->eval_lo || p->frame == PY_NO_FRAME || !p->budget)
        return 0;
    p->pending = 1;
    p->shown = 0;
    p->native = ret;
    return 1;
}

/* Whether the walk stored Python frames (budget is set only for the Python
 * process). */
static __always_inline int py_walk_stored(struct py_walk *p)
{
    return p->eval_hi && p->budget < PY_MAX_FRAMES;
}

static __always_inline void py_announce(u64 stack)
{
    py_new_stacks.ringbuf_output(&stack, sizeof(stack), BPF_RB_NO_WAKEUP);
}

/* PyThreadState from cframe to native_thread_id. */
struct py_tstate_words {
    u64 w[(PY_TSTATE_NATIVE_THREAD_ID - PY_TSTATE_CFRAME) / 8 + 1];
};

/* Its cframe, when tstate is thread `tid`'s; 0 otherwise or on a failed read. */
static __always_inline u64 py_cframe_of(u64 tstate, u32 tid)
{
    struct py_tstate_words t = {};
    if (!tstate || bpf_probe_read_user(&t, sizeof(t), (void *)(tstate + PY_TSTATE_CFRAME)) != 0 ||
        t.w[(PY_TSTATE_NATIVE_THREAD_ID - PY_TSTATE_CFRAME) / 8] != tid)
        return 0;
    return t.w[0];
}

/* The current thread's innermost Python frame: from the GIL holder's
 * thread state when that is ours (kept for this thread), else from the one
 * kept; 0 when neither is this thread's or a read fails. */
static __always_inline u64 py_current_frame(struct py_walk *p)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 holder = 0, frame = 0;
    bpf_probe_read_user(&holder, 8, (void *)p->tstate_at);
    u64 cframe = py_cframe_of(holder, tid);
    if (cframe) {
        u64 *known = py_tstates.lookup(&tid);
        if (!known || *known != holder)
            py_tstates.update(&tid, &holder);
    } else {
        u64 *known = py_tstates.lookup(&tid);
        /* Checked again: a thread gone, its tid reused by a new thread. */
        if (known)
            cframe = py_cframe_of(*known, tid);
    }
    if (!cframe || bpf_probe_read_user(&frame, 8, (void *)(cframe + PY_CFRAME_CURRENT_FRAME)) != 0)
        return 0;
    return frame;
}

/* The next Python frame of the loop call being shown, as the walk stores
 * it; 0: none to store this step. The last one (is_entry) ends the call's
 * frames; a failed read ends every Python frame of the walk, and the loop's
 * native frame is stored if none of its own was. */
static __always_inline u64 py_step(struct py_walk *p)
{
    if (!p->frame) {
        p->frame = py_current_frame(p);
        if (!p->frame)
            p->frame = PY_NO_FRAME;
    }
    struct py_frame_fields f = {};
    if (p->frame == PY_NO_FRAME || !p->budget ||
        bpf_probe_read_user(&f, sizeof(f), (void *)(p->frame + PY_FRAME_CODE)) != 0 ||
        !f.code || (f.code >> PY_CODE_BITS)) {
        p->frame = PY_NO_FRAME;
        p->pending = 0;
        return p->shown ? 0 : p->native;
    }
    p->budget--;
    p->shown++;
    p->frame = f.previous ? f.previous : PY_NO_FRAME;
    if (f.is_entry || p->frame == PY_NO_FRAME)
        p->pending = 0;
    /* Where the frame is in its bytecode, for the line: prev_instr is the
     * instruction running (a call), in co_code_adaptive. */
    u64 index = (f.prev_instr - f.code - PY_CODE_CODE_ADAPTIVE) >> 1;
    if (index > PY_INSTR_MAX)
        index = PY_INSTR_MAX;
    return f.code | index << PY_CODE_BITS | 1ULL << PY_FRAME_TAG_BIT;
}
