/* A library whose allocating functions are static: in a stripped copy only
 * .eh_frame knows where they start, and a debug file knows their names.
 * Built by names_build.py in every way a library can lose its names. */
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) static void *names_static_grow(size_t n)
{
    void *p = malloc(n);
    if (p)
        memset(p, 1, n);
    return p;
}

__attribute__((noinline)) static void *names_static_outer(size_t n)
{
    void *p = names_static_grow(n);
    __asm__ volatile("" ::: "memory"); /* not a tail call: keeps this frame */
    return p;
}

void *names_exported(size_t n)
{
    void *p = names_static_outer(n);
    __asm__ volatile("" ::: "memory");
    return p;
}

/* Hand-written, as assembly often is: a symbol without a size, whose extent
 * only its FDE (.cfi_startproc) gives. */
__asm__(".text\n"
        ".globl names_asm_sizeless\n"
        ".type names_asm_sizeless, @function\n"
        "names_asm_sizeless:\n"
        ".cfi_startproc\n"
        "nop\nnop\nnop\nnop\nnop\nnop\nnop\nnop\n"
        "ret\n"
        ".cfi_endproc\n");
