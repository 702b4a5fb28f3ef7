/* Synthetic function prologues for probe-site selection, one per case that
 * tests/unit/test_probesite.py asserts a choice for. Each pro_* function
 * returns its first argument plus one (zero for a zero argument where it
 * tests for it; pro_loop_back plus two) and keeps the ABI, so it can
 * really be called.
 *
 * Each call_* function calls its pro_* with the argument 0x5eed00NN from a
 * known place: the return address is the ret_* label right after the call.
 * tests/integration/test_probesite.py probes the chosen sites and checks
 * that the argument and the return address read there are these. */
	.text

#define FUNC(name) .globl name; .type name, @function; .p2align 4; name:
#define END(name) .size name, . - name

/* Ubuntu-style CET entry: endbr64 is single-stepped; the push after it is
 * emulated.  Site +4, sp_adjust 0. */
FUNC(pro_endbr_first)
	endbr64
	push %rbx
	lea 1(%rdi), %rbx
	mov %rbx, %rax
	pop %rbx
	ret
END(pro_endbr_first)

/* glibc free: test is single-stepped, the je after it is emulated and is
 * the first branch.  Site +3, sp_adjust 0. */
FUNC(pro_test_first)
	test %rdi, %rdi
	je 1f
	lea 1(%rdi), %rax
	ret
1:	xor %eax, %eax
	ret
END(pro_test_first)

/* glibc malloc: the entry itself is emulated.  Site +0. */
FUNC(pro_push_first)
	push %r12
	push %rbx
	mov %rdi, %rbx
	lea 1(%rbx), %rax
	pop %rbx
	pop %r12
	ret
END(pro_push_first)

/* A move that writes no argument register may be skipped: mov %rdi,%rbx
 * (rbx saved in r11 first) before a push.  Site +6, sp_adjust 0. */
FUNC(pro_mov_before_push)
	mov %rbx, %r11
	mov %rdi, %rbx
	push %r12
	lea 1(%rbx), %rax
	pop %r12
	mov %r11, %rbx
	ret
END(pro_mov_before_push)

/* A move that writes the argument register must not be skipped: a probe
 * after it would read the wrong value.  Site +0, single-stepped. */
FUNC(pro_clobber_before_push)
	mov %rdi, %rax
	mov %eax, %edi
	push %rbx
	lea 1(%rdi), %rax
	pop %rbx
	ret
END(pro_clobber_before_push)

/* An indirect branch (not emulated) before the first emulated instruction:
 * the push is not reached on every path.  Site +0, single-stepped. */
FUNC(pro_branch_before_push)
	lea 1f(%rip), %rax
	jmp *%rax
1:	push %rbx
	lea 1(%rdi), %rax
	pop %rbx
	ret
END(pro_branch_before_push)

/* Stack moves of skipped instructions add up: a REX.W push (single-stepped)
 * and sub $16,%rsp before the emulated push.  Site +10, sp_adjust 24. */
FUNC(pro_sub_rsp)
	endbr64
	.byte 0x48, 0x55	/* rex.W push %rbp */
	sub $16, %rsp
	push %rbx
	lea 1(%rdi), %rax
	pop %rbx
	add $16, %rsp
	pop %rbp
	ret
END(pro_sub_rsp)

/* A loop branches back into the prologue, before the first emulated
 * instruction: a probe there would fire once per iteration (twice per
 * call here).  Site +0. */
FUNC(pro_loop_back)
	xor %eax, %eax
1:	add $1, %rax
	push %rbx
	pop %rbx
	cmp $2, %rax
	jb 1b
	add %rdi, %rax
	ret
END(pro_loop_back)

#define CALLER(n, what)			\
FUNC(call_##what)			\
	sub $8, %rsp;			\
	mov $0x5eed0000 + n, %edi;	\
	call pro_##what;		\
	.globl ret_##what;		\
ret_##what:				\
	add $8, %rsp;			\
	ret;				\
END(call_##what)

CALLER(1, endbr_first)
CALLER(2, test_first)
CALLER(3, push_first)
CALLER(4, mov_before_push)
CALLER(5, clobber_before_push)
CALLER(6, branch_before_push)
CALLER(7, sub_rsp)
CALLER(8, loop_back)

	.section .note.GNU-stack,"",@progbits
