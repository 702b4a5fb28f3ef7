/* Structs and constants shared by the BPF programs and the Python side.
 * Only what crosses the boundary lives here; bcc reads the layouts from the
 * compiled program, so Python never redeclares them. */
#ifndef MEMTRACE_H
#define MEMTRACE_H

#ifndef MAX_STACK_DEPTH
/* Frames kept per stack: perf's own default limit (kernel.perf_event_max_stack). */
#define MAX_STACK_DEPTH 127
#endif

/* Key of the heap aggregates: one row per thread, user call stack and
 * 64 MiB bucket of the address space.
 *
 * stack is a hash of the frame-pointer walk (0: no stack), which at a malloc
 * entry skips the immediate caller; caller is the return address read at
 * the stack pointer, so the pair names the caller even without frame
 * pointers. A glibc thread-arena heap fills exactly one bucket, so the
 * buckets give per-arena live bytes without walking the allocs map. */
struct heap_key {
    u64 stack;
    u64 caller;
    u32 tid;
    u32 bucket;     /* block address >> BUCKET_SHIFT */
    u32 generation; /* execs of the target before the allocation: an exec
                     * drops the old image's blocks, and Python tells them
                     * apart by this */
    u32 unused;
};

/* The allocator probed (-DALLOCATOR_KIND): how a block's size is rounded
 * to what the allocator holds for it (heap_counts' *_chunk_bytes). */
#define ALLOCATOR_GLIBC 0
#define ALLOCATOR_JEMALLOC 1
#define ALLOCATOR_TCMALLOC 2
#define ALLOCATOR_MIMALLOC 3

/* A HotSpot JVM's template interpreter: its code range, set by Python
 * once the JVM generated it (0, 0: none). A return address into it is
 * stored in the stack as the frame's Method* with JVM_METHOD_TAG set (user
 * addresses never have bit 63), which Python names Class.method. */
struct jvm_interpreter {
    u64 start;
    u64 end;
};
#define JVM_METHOD_TAG_BIT 63
/* The interpreter's frame holds its Method* this many bytes below its
 * frame pointer (x86-64: frame::interpreter_frame_method_offset, -3 words). */
#define JVM_METHOD_SLOT 24
/* ... and its caller's stack pointer one word below it
 * (interpreter_frame_sender_sp_offset): a compiled caller's frame starts
 * there, past the arguments the c2i adapter spread for the interpreter. */
#define JVM_SENDER_SP_SLOT 8

/* A CPython 3.11 process: where its interpreter loop's code is and where
 * the GIL holder's thread state is kept, set by Python (python/runtime.py)
 * for one traced process (tgid; 0: none). The walk stores the Python frames
 * each _PyEval_EvalFrameDefault frame runs in its place, innermost first:
 * the code object (PyCodeObject*) with PY_FRAME_TAG set and its instruction
 * index (in code units, for the line) above PY_CODE_BITS. */
/* A command memtrace launched, held once at startup (launch.bpf.c): where
 * ld.so's _r_debug.r_state is in it, and the signal that makes the kernel
 * stop it for memtrace, its tracer (0: not armed). */
struct launch_hold {
    u64 r_state_at;
    u32 signal;
    u32 unused;
};
/* A Go program with cgo (go.bpf.c): where runtime.asmcgocall's code is,
 * the function through which Go calls C on the system stack. */
struct go_runtime {
    u64 cgocall_lo, cgocall_hi;
    u32 tgid;
    u32 unused;
};
/* What asmcgocall keeps below its C call on the system stack (Go's
 * runtime/asm_amd64.s, the same since Go 1.5): the goroutine's g, 0 when it
 * did not switch stacks, and the goroutine's stack depth below g.stack.hi,
 * or its stack pointer itself when it did not switch. */
#define GO_CGOCALL_DEPTH 40
#define GO_CGOCALL_G 48
#define GO_G_STACK_HI 8 /* g.stack.hi, after g.stack.lo */

struct py_runtime {
    u64 eval_lo, eval_hi; /* _PyEval_EvalFrameDefault */
    u64 tstate_at;        /* &_PyRuntime.gilstate.tstate_current */
    u32 tgid;
    u32 unused;
};
#define PY_FRAME_TAG_BIT 62
#define PY_CODE_BITS 47
#define PY_INSTR_MAX 0x7FFF /* the index did not fit, or was not one */
/* CPython 3.11's layout (release builds on x86-64): PyThreadState, its
 * _PyCFrame, _PyInterpreterFrame, PyCodeObject. */
#define PY_TSTATE_CFRAME 56
#define PY_TSTATE_NATIVE_THREAD_ID 160
#define PY_CFRAME_CURRENT_FRAME 8
#define PY_FRAME_CODE 32
#define PY_CODE_CODE_ADAPTIVE 184

/* Compiled Java code (JIT-compiled methods, native wrappers, runtime
 * stubs) has a fixed frame size per code blob (CodeBlob::_frame_size, in
 * words; 0: none, as in the call stub, which keeps a frame pointer). At any
 * call in it the frame is whole: its CFA is the stack pointer + that size,
 * the return address below the CFA and the caller's rbp below that, whether
 * the code keeps frame pointers or not. The walk finds a pc's blob as the
 * JVM does, in its code heaps: a heap's segment map holds, per segment of
 * 1 << log2_segment bytes, how many segments to go back towards its
 * block's first (0 there, 0xFF: free); the block is a HeapBlock header
 * (block_header bytes, its used flag at used_at) and its CodeBlob, whose
 * fields are at the offsets below. Python (jvm/codecache.py) sets them once
 * the JVM made its code heaps, and moves generation on every second: what
 * the walk found for a pc is kept per CPU until then (code is freed and
 * reused). */
#define MAX_JVM_CODE_HEAPS 4
#define JVM_SEGMAP_HOPS 16
#define JVM_MAX_FRAME_WORDS 65536 /* a larger "frame size" is not one */
struct jvm_code_heap {
    u64 lo, hi;  /* reserved: [low_boundary, high_boundary) */
    u64 segmap;  /* the segment map's low_boundary */
    u32 log2_segment;
    u32 unused;
};
struct jvm_code_head {
    struct jvm_code_heap heaps[MAX_JVM_CODE_HEAPS]; /* lo == hi: none */
    u16 block_header, used_at;           /* HeapBlock */
    u16 frame_size_at, data_offset_at;   /* CodeBlob: int _frame_size (words), int _data_offset */
    u16 content_begin_at, unused;        /* CodeBlob: address _content_begin */
    u32 generation;
};

/* One user stack, innermost first, zero-padded. */
struct stack_frames {
    u64 ip[MAX_STACK_DEPTH];
};

/* One unwind rule of the stack walk (ehframe.unwind_rows): from pc (an
 * offset in its module) to the next row's, the CFA is rsp or rbp (rule)
 * + cfa_off, the return address is at CFA - 8, and the caller's rbp at
 * CFA - 8 * rbp_slot (0: rbp still holds it). */
enum unwind_rule { UNWIND_NONE = 0, UNWIND_RSP, UNWIND_RBP, UNWIND_END, UNWIND_UNKNOWN };
struct unwind_row {
    u32 pc;
    u16 cfa_off;
    u8 rule;
    u8 rbp_slot;
};

/* A module with an unwind table: [lo, hi) in the process; its pages from
 * first_page in unwind_pages. */
#define MAX_UNWIND_MODULES 256
struct unwind_module {
    u64 lo;
    u64 hi;
    u32 first_page;
    u32 unused;
};

/* How many modules have tables, and the tables' generation (it moves on
 * at every change). */
struct unwind_head {
    u32 modules;
    u32 generation;
};

/* 64 bytes, a cache line of the mmapable (page-aligned) array: the rows
 * of two threads get neighbouring indexes, and both add to theirs on every
 * malloc and free. */
struct heap_counts {
    u64 alloc_bytes;
    u64 free_bytes;
    u64 alloc_count;
    u64 free_count;
    /* The same blocks as the allocator holds them (glibc: chunks, header
     * and rounding included, what the arenas' own books count, so that
     * Python can tell the blocks allocated before an attach from those it
     * traced; jemalloc, mimalloc, tcmalloc: size classes). */
    u64 alloc_chunk_bytes;
    u64 free_chunk_bytes;
    /* The reader's epoch (heap_epoch) at the row's last change: the reader
     * finds the rows that changed since its last read by this mark, where
     * comparing the bytes of every row was a pass over all of them (100,000
     * rows: a tenth of its work). In this cache line, which the change
     * writes anyway. */
    u64 mark;
    u64 unused;
};

/* The traced heap's live bytes as a whole, and their high-water mark, kept
 * at every call: a peak between two snapshots is not lost. */
struct heap_peak {
    s64 live_bytes;
    s64 peak_bytes;
    u64 peak_ns; /* bpf_ktime_get_ns() when the peak was reached */
};

/* The kernel's RSS counters (kmem:rss_stat's member), in bytes, as last
 * reported while the target's mm was current: its last values before the
 * address space is torn down at exit. */
enum rss_member { RSS_FILE = 0, RSS_ANON, RSS_SWAP, RSS_SHMEM, RSS_MEMBERS };
struct rss_now {
    s64 bytes[RSS_MEMBERS];
    u64 seen;   /* bit i: member i reported since the attach */
    u64 ts_ns;  /* the last report */
};

/* Tgids are below the kernel's PID_MAX_LIMIT (the traced_tgids bitmap). */
#define TGID_LIMIT 4194304

/* What the kernel keeps per traced process (the targets map). */
struct target_state {
    struct rss_now rss;
    u64 trim_calls;
    u64 trim_released_calls; /* malloc_trim calls that returned 1 */
};

struct thread_name {
    char comm[16];
};

enum vm_kind {
    VM_MMAP = 1, VM_MUNMAP, VM_BRK, VM_MPROTECT, VM_MREMAP, VM_MADVISE, VM_TRIM, VM_CALLER
};

/* in_malloc of an event made inside a malloc-family call whose caller is
 * not known yet: a VM_CALLER event with the caller follows when the call
 * returns (see alloc_return). */
#define IN_MALLOC_CALLER_FOLLOWS 2

/* One address-space syscall, sent at its exit with its result. VM_TRIM
 * marks the end of a malloc_trim call with the anonymous RSS around it;
 * VM_CALLER the return of a malloc-family call that made syscalls, with
 * its caller in malloc_key. */
struct vm_event {
    u64 ts_ns;
    u32 tid;
    u32 kind;
    u64 addr;      /* munmap/mprotect/madvise start, mmap hint, mremap old */
    u64 len;       /* mremap: old length */
    u64 prot;      /* mmap/mprotect protection, madvise advice */
    u64 flags;     /* mmap/mremap flags */
    u64 new_len;   /* mremap new length; trim: anon RSS before */
    u64 new_addr;  /* mremap requested new address; trim: anon RSS after */
    s64 result;    /* the syscall's return (brk: the new break) */
    u64 stack;     /* the syscall's own user stack (hash; 0: none) */
    u32 in_malloc; /* inside a malloc-family call: then malloc_key is its caller
                    * (or IN_MALLOC_CALLER_FOLLOWS) */
    u32 tgid;      /* the process: one loaded object may trace several */
    struct heap_key malloc_key;
};

#define STACK_SCAN_WORDS 64

/* Light mode's mmap events carry the top of the user stack: without malloc
 * probes, and with glibc built without frame pointers, a scan for return
 * addresses (checked against call instructions by the collector) is how
 * the malloc caller of a new arena heap is found. */
struct vm_scan {
    struct vm_event event;
    u64 words[STACK_SCAN_WORDS];
};

/* Per-CPU counters, summed by Python. */
enum counter {
    CNT_UNTRACKED_FREE = 0, /* free of a block allocated before the trace */
    CNT_DROP_ALLOCS,        /* allocs map full: allocation not tracked */
    CNT_DROP_STATS,         /* heap_stats map full: allocation not tracked */
    CNT_DROP_PENDING,       /* pending map full: call not tracked */
    CNT_STACK_LOST,         /* stack map full: frames past the caller lost */
    CNT_VM_LOST,            /* ring buffer full: address-space events lost */
    CNT_VM_SENT,            /* address-space events sent (paces the reader's wakeups) */
    CNT_MAX,
};

#endif
