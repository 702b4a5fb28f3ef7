/* Java frames of a HotSpot JVM. The template interpreter keeps frame
 * pointers, so the frame walk (common.bpf.c) passes through it; a return
 * address into it says only "the interpreter", the method is in the frame.
 * Compiled code (JIT-compiled methods, native wrappers, runtime stubs)
 * keeps no frame pointer unless -XX:+PreserveFramePointer, but its frames
 * have a fixed size per code blob, which the walk reads in the JVM's code
 * heaps (where they are: Python, jvm/codecache.py).
 * Joined before common.bpf.c: the walk calls jvm_frame and
 * jvm_compiled_frame_bytes. */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

BPF_ARRAY(jvm_interpreter, struct jvm_interpreter, 1);
BPF_ARRAY(jvm_code_head, struct jvm_code_head, 1);

/* What the walk found for a pc, per CPU, by pc: a hot stack's compiled
 * frames are found again in one lookup, where the code heap takes a few
 * reads of the JVM's memory. An entry of an older generation is stale. */
#define JVM_PC_CACHE_BITS 10
struct jvm_pc_cached {
    u64 pc;
    u32 generation;
    u32 frame_bytes;
};
BPF_PERCPU_ARRAY(jvm_pc_cache, struct jvm_pc_cached, 1 << JVM_PC_CACHE_BITS);

/* The interpreter's frame, below its frame pointer: Method*, last sp,
 * sender sp. */
struct jvm_interpreter_slots {
    u64 method;
    u64 last_sp;
    u64 sender_sp;
};
_Static_assert(JVM_METHOD_SLOT - __builtin_offsetof(struct jvm_interpreter_slots, sender_sp) ==
               JVM_SENDER_SP_SLOT, "the interpreter's frame slots");

/* What the walk stores for return address `ret` whose caller's frame
 * pointer is `fp`: the caller's Method*, tagged, when `ret` is in the
 * interpreter and the slot reads; else `ret`. *sender_sp: the interpreted
 * frame's caller's stack pointer (0: not an interpreted frame). A program
 * that is no JVM pays one array lookup per frame. */
static __always_inline u64 jvm_frame(u64 ret, u64 fp, u64 *sender_sp)
{
    u32 zero = 0;
    *sender_sp = 0;
    struct jvm_interpreter *code = jvm_interpreter.lookup(&zero);
    if (!code || ret - code->start >= code->end - code->start)
        return ret;
    struct jvm_interpreter_slots slots = {};
    if (bpf_probe_read_user(&slots, sizeof(slots), (void *)(fp - JVM_METHOD_SLOT)) != 0 ||
        !slots.method || (slots.method >> JVM_METHOD_TAG_BIT))
        return ret;
    *sender_sp = slots.sender_sp;
    return slots.method | (1ULL << JVM_METHOD_TAG_BIT);
}

/* The frame size of the code blob holding pc, read from the code heap
 * (code compiled since Python's last refresh); 0: none. */
static __always_inline u64 jvm_heap_frame_bytes(struct jvm_code_head *head, u64 pc)
{
    struct jvm_code_heap *h = 0;
#pragma unroll
    for (int i = 0; i < MAX_JVM_CODE_HEAPS; i++)
        if (pc - head->heaps[i].lo < head->heaps[i].hi - head->heaps[i].lo)
            h = &head->heaps[i];
    if (!h)
        return 0;
    u32 log2 = h->log2_segment & 31;
    u64 segment = (pc - h->lo) >> log2;
    u8 hop = 0;
    for (int k = 0; k < JVM_SEGMAP_HOPS; k++) {
        if (bpf_probe_read_user(&hop, 1, (void *)(h->segmap + segment)) != 0 || hop == 0xFF)
            return 0; /* unreadable, or free */
        if (hop == 0)
            break;
        if (hop > segment)
            return 0;
        segment -= hop;
    }
    if (hop)
        return 0; /* farther than JVM_SEGMAP_HOPS hops */
    u64 block = h->lo + (segment << log2), blob = block + head->block_header;
    u8 used = 0;
    s32 words = 0, data_offset = 0;
    u64 content = 0;
    if (bpf_probe_read_user(&used, 1, (void *)(block + head->used_at)) != 0 || !used ||
        bpf_probe_read_user(&words, 4, (void *)(blob + head->frame_size_at)) != 0 ||
        bpf_probe_read_user(&data_offset, 4, (void *)(blob + head->data_offset_at)) != 0 ||
        bpf_probe_read_user(&content, 8, (void *)(blob + head->content_begin_at)) != 0)
        return 0;
    if (words <= 0 || words >= JVM_MAX_FRAME_WORDS || data_offset <= 0 ||
        pc < content || pc >= blob + data_offset)
        return 0;
    return (u64)words * 8;
}

/* The size of the compiled frame whose code holds pc (its CFA is its
 * stack pointer + that), 0 where pc is in no such code or in the
 * interpreter (walked by its frame pointer). Called for frames with no
 * unwind row: a program that is no JVM pays one array lookup for each.
 * Code freed and reused since an entry was cached gives a wrong size until
 * the next generation: a CFA the walk's own checks reject, or a wrong
 * frame, never a loop. The result is read back from the cache entry: one
 * unknown value to the verifier whichever path made it, so the rest of the
 * walk is verified once, not once per path. */
static __always_inline u64 jvm_compiled_frame_bytes(u64 pc)
{
    u32 zero = 0;
    struct jvm_interpreter *interpreter = jvm_interpreter.lookup(&zero);
    if (!interpreter || pc - interpreter->start < interpreter->end - interpreter->start ||
        !interpreter->start)
        return 0;
    struct jvm_code_head *head = jvm_code_head.lookup(&zero);
    u32 slot = (u32)((pc * 0x9E3779B97F4A7C15ULL) >> (64 - JVM_PC_CACHE_BITS));
    struct jvm_pc_cached *cached = jvm_pc_cache.lookup(&slot);
    if (!head || !cached)
        return 0;
    if (cached->pc != pc || cached->generation != head->generation) {
        cached->frame_bytes = jvm_heap_frame_bytes(head, pc);
        cached->pc = pc;
        cached->generation = head->generation;
    }
    asm volatile("" ::: "memory");
    return *(volatile u32 *)&cached->frame_bytes;
}
