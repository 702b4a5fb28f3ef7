/* Structs and constants shared by the BPF programs and the Python side.
 * Only what crosses the boundary lives here; bcc reads the layouts from the
 * compiled program, so Python never redeclares them. */
#ifndef MEMTRACE_H
#define MEMTRACE_H

/* Key of the heap aggregates: one row per thread and user call stack.
 * stack_id comes from the frame-pointer walk, which at a malloc entry
 * skips the immediate caller; caller is the return address read at the
 * stack pointer, so the pair names the caller even without frame pointers. */
struct heap_key {
    u32 tid;
    s32 stack_id; /* negative: the walk failed (counted in CNT_STACK_LOST) */
    u64 caller;
};

struct heap_counts {
    u64 alloc_bytes;
    u64 free_bytes;
    u64 alloc_count;
    u64 free_count;
};

/* One live allocation, so that a free from any thread is charged back to
 * the thread and stack that allocated. */
struct alloc_info {
    u64 size;
    struct heap_key key;
};

struct thread_name {
    char comm[16];
};

/* Per-CPU counters, summed by Python. */
enum counter {
    CNT_UNTRACKED_FREE = 0, /* free of a block allocated before the trace */
    CNT_DROP_ALLOCS,        /* allocs map full: allocation not tracked */
    CNT_DROP_STATS,         /* heap_stats map full: allocation not tracked */
    CNT_DROP_PENDING,       /* pending map full: call not tracked */
    CNT_STACK_LOST,         /* stack map full or hash collision */
    CNT_TRIM_CALLS,
    CNT_TRIM_RELEASED,      /* malloc_trim calls that returned 1 */
    CNT_MAX,
};

#endif
