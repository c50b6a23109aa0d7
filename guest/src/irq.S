/*
 * Interrupt entry stubs, one per vector, 16 bytes apart from irq_stubs.
 *
 * The CPU (64-bit mode, same privilege level) aligns RSP down to 16 and
 * pushes SS, RSP, RFLAGS, CS, RIP and, for some exceptions, an error code.
 * A stub pushes a dummy error code when the CPU does not, then the vector,
 * and jumps to irq_common, which saves the general registers and calls
 * irq_dispatch(struct irq_frame *).
 *
 * Return without iretq (the kvm_pvm emulator cannot run it): write RFLAGS and
 * RIP just below the interrupted RSP, restore the registers, switch to that
 * stack, `popfq; ret`. The interrupted code was compiled with -mno-red-zone,
 * so the 16 bytes below its RSP are free. Those 16 bytes may overlap the
 * frame's SS/RSP slots (when the interrupted RSP was 16-aligned), so every
 * frame value is read before anything is written.
 */

/* Offsets in the frame once irq_common has pushed the 15 registers. */
#define F_VECTOR 120
#define F_ERROR 128
#define F_RIP 136
#define F_CS 144
#define F_RFLAGS 152
#define F_RSP 160
#define F_SS 168

	.text
	.balign 16
	.globl irq_stubs
irq_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	/* Vectors where the CPU pushes an error code: #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX. */
	.if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
	.else
	pushq $0
	.endif
	pushq $vec
	jmp irq_common
	.set vec, vec + 1
	.endr

	.balign 16
irq_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rbx
	pushq %rbp
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	/* 15 registers + vector + error + 5 CPU words = 176 bytes: RSP is 16-aligned here. */
	cld
	movq %rsp, %rdi
	call irq_dispatch

	/* Build the return on the interrupted stack: [rsp_int-16] = RFLAGS, [rsp_int-8] = RIP. */
	movq F_RSP(%rsp), %rax
	movq F_RIP(%rsp), %rcx
	movq F_RFLAGS(%rsp), %rdx
	subq $16, %rax
	movq %rdx, 0(%rax)
	movq %rcx, 8(%rax)
	/* The error-code slot lies below both written words: keep the target there. */
	movq %rax, F_ERROR(%rsp)

	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rbp
	popq %rbx
	popq %rdx
	popq %rcx
	popq %rax
	/* RSP now points at the vector slot; the target is one slot up. */
	movq 8(%rsp), %rsp
	popfq
	ret

	.section .note.GNU-stack, "", @progbits
