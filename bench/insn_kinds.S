/* One tiny function per instruction kind: the kind under test is the first
 * instruction, so a uprobe at the function's entry lands on it.
 * bench/uprobe_emulation.py times calls with and without such a probe to
 * tell which kinds this kernel emulates and which it single-steps.
 * Each function leaves every callee-saved register and the stack as it
 * found them. */
	.text

#define KIND(name) .globl kind_##name; .type kind_##name, @function; .p2align 4; kind_##name:

KIND(push_rbx)		push %rbx; pop %rbx; ret
KIND(push_rbp)		push %rbp; pop %rbp; ret
KIND(push_r12)		push %r12; pop %r12; ret
KIND(push_rdi)		push %rdi; pop %rdi; ret
KIND(rexw_push_rbx)	.byte 0x48, 0x53; pop %rbx; ret
KIND(nop1)		nop; ret
KIND(nop2_66_90)	.byte 0x66, 0x90; ret
KIND(nop3)		.byte 0x0f, 0x1f, 0x00; ret
KIND(nop4)		.byte 0x0f, 0x1f, 0x40, 0x00; ret
KIND(nop5)		.byte 0x0f, 0x1f, 0x44, 0x00, 0x00; ret
KIND(nop6_66)		.byte 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00; ret
KIND(pause)		pause; ret
KIND(endbr64)		endbr64; ret
KIND(jmp8)		jmp 1f; 1: ret
KIND(jmp32)		.byte 0xe9; .long 0; ret
KIND(je8)		je 1f; 1: ret
KIND(je32)		.byte 0x0f, 0x84; .long 0; ret
KIND(call32)		call 1f; ret; 1: ret
KIND(mov_rdi_rax)	mov %rdi, %rax; ret
KIND(mov_rdi_rdi)	.byte 0x48, 0x89, 0xff; ret
KIND(lea0_rdi)		.byte 0x48, 0x8d, 0x7f, 0x00; ret
KIND(sub_rsp)		sub $8, %rsp; add $8, %rsp; ret
KIND(test_rdi)		test %rdi, %rdi; ret
KIND(cmpb_rip)		cmpb $0, kind_data(%rip); ret
KIND(xor_eax)		xor %eax, %eax; ret

	.data
kind_data:	.byte 0
	.section .note.GNU-stack,"",@progbits
