/*
 * PVH entry, so that other VMMs (QEMU's `-M microvm -kernel`, used by bench/boot.py
 * to compare boot times) can boot the very same ELF. embervm itself uses e_entry
 * (the 64-bit Linux boot protocol) and ignores this note.
 *
 * PVH starts us in 32-bit protected mode, paging off, %ebx = &hvm_start_info.
 * We enter long mode with the image's own page tables (boot_pml4), then turn the
 * start info into a boot_params page (pvh.c) and join the normal 64-bit entry.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define X86_CR0_PE 0x00000001
#define X86_CR0_PG 0x80000000
#define X86_CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x00000100

	.section .note.Xen, "a"
	.balign 4
	.long 4				/* namesz: "Xen\0" */
	.long 4				/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY
	.asciz "Xen"
	.long _start_pvh

	.section .text.pvh, "ax"
	.code32
	.globl _start_pvh
_start_pvh:
	cli
	cld
	movl %ebx, %esi			/* hvm_start_info, kept across the mode switch */
	lgdt pvh_gdt_desc
	movl %cr4, %eax
	orl $X86_CR4_PAE, %eax
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(X86_CR0_PG | X86_CR0_PE), %eax
	movl %eax, %cr0
	ljmp $0x10, $pvh_long_mode

	.code64
pvh_long_mode:
	movl $0x18, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq $__stack_top, %rsp
	movl %esi, %edi			/* zero-extended hvm_start_info address */
	call pvh_boot_params
	movq %rax, %rsi
	jmp _start64

	.section .rodata.pvh, "a"
	.balign 8
pvh_gdt:				/* same selectors as the Linux boot protocol's */
	.quad 0				/* 0x00 null */
	.quad 0				/* 0x08 unused */
	.quad 0x00af9b000000ffff	/* 0x10 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x18 data */
pvh_gdt_desc:
	.word pvh_gdt_desc - pvh_gdt - 1
	.long pvh_gdt

	.section .note.GNU-stack, "", @progbits
