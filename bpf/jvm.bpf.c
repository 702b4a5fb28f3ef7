/* Interpreted Java frames of a HotSpot JVM. The template interpreter
 * keeps frame pointers, so the frame walk (common.bpf.c) passes through
 * it; a return address into it says only "the interpreter", the method is
 * in the frame. Joined before common.bpf.c: the walk calls jvm_frame. */
#include <uapi/linux/ptrace.h>
#include "memtrace.h"

BPF_ARRAY(jvm_interpreter, struct jvm_interpreter, 1);

/* What the walk stores for return address `ret` whose caller's frame
 * pointer is `fp`: the caller's Method*, tagged, when `ret` is in the
 * interpreter and the slot reads; else `ret`. A program that is no JVM
 * pays one array lookup per frame. */
static __always_inline u64 jvm_frame(u64 ret, u64 fp)
{
    u32 zero = 0;
    struct jvm_interpreter *code = jvm_interpreter.lookup(&zero);
    if (!code || ret - code->start >= code->end - code->start)
        return ret;
    u64 method = 0;
    if (bpf_probe_read_user(&method, sizeof(method), (void *)(fp - JVM_METHOD_SLOT)) != 0 ||
        !method || (method >> JVM_METHOD_TAG_BIT))
        return ret;
    return method | (1ULL << JVM_METHOD_TAG_BIT);
}
