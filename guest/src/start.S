/*
 * Entry code of the embervm test guest.
 *
 * The image is linked at physical 1 MiB (see linker.ld):
 *   0x100000  32-bit stub: the bzImage "code32_start" entry; we only run in
 *             64-bit mode, so it just halts.
 *   0x100100  kernel_info ("LToP"), pointed to by the bzImage header.
 *   0x100200  _start64: the 64-bit boot protocol entry (ELF e_entry too).
 *
 * Entry state (Linux 64-bit boot protocol): long mode, identity map of at
 * least the first 1 GiB, interrupts off, RSI = &boot_params.
 *
 * Only plain integer instructions are used: the kvm_pvm emulator that runs
 * guest supervisor code rejects iretq, int n, fxsave/xsave and friends.
 */

#define PTE_P   0x001
#define PTE_W   0x002
#define PTE_PWT 0x008
#define PTE_PCD 0x010
#define PTE_PS  0x080

/* Start of the 32-bit MMIO gap: mapped uncached from here to 4 GiB. */
#define MMIO_GAP_START 0xd0000000

	.section .stub32, "ax"
	.code32
	.globl _start32
_start32:
	cli
1:	hlt
	jmp 1b
	ud2

	.section .kinfo, "a"
	.globl kernel_info
kernel_info:
	.ascii "LToP"			/* header */
	.long kernel_info_end - kernel_info	/* size */
	.long kernel_info_end - kernel_info	/* size_total */
	.long 0				/* setup_type_max: no setup_data used */
kernel_info_end:

	.section .text.start64, "ax"
	.code64
	.globl _start64
_start64:
	cli
	cld
	/* boot_params pointer survives in a callee-saved register. */
	movq %rsi, %rbx

	/* Our own identity map of 0..4 GiB, so MMIO in the 32-bit gap is reachable. */
	movq $boot_pml4, %rax
	movq %rax, %cr3

	movq $__stack_top, %rsp
	xorl %ebp, %ebp

	/* Zero .bss (the loader does too; be safe). The stack is not in it. */
	movq $__bss_start, %rdi
	movq $__bss_end, %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq

	movq %rbx, %rdi
	call guest_main

	/* guest_main does not return; if it does, power off. */
	call poweroff
2:	cli
	hlt
	jmp 2b

/*
 * Identity-mapping page tables, built by the assembler: 4 page directories of
 * 2 MiB pages cover 0..4 GiB. Everything from MMIO_GAP_START up is uncached.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl boot_pml4
boot_pml4:
	.quad boot_pdpt + (PTE_P | PTE_W)
	.fill 511, 8, 0

	.balign 4096
boot_pdpt:
	.quad boot_pd + 0x0000 + (PTE_P | PTE_W)
	.quad boot_pd + 0x1000 + (PTE_P | PTE_W)
	.quad boot_pd + 0x2000 + (PTE_P | PTE_W)
	.quad boot_pd + 0x3000 + (PTE_P | PTE_W)
	.fill 508, 8, 0

	.balign 4096
boot_pd:
	.set pd_addr, 0
	.rept 2048
	.if pd_addr >= MMIO_GAP_START
	.quad pd_addr + (PTE_P | PTE_W | PTE_PS | PTE_PWT | PTE_PCD)
	.else
	.quad pd_addr + (PTE_P | PTE_W | PTE_PS)
	.endif
	.set pd_addr, pd_addr + 0x200000
	.endr

	.section .note.GNU-stack, "", @progbits
