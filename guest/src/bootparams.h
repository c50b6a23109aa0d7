/*
 * The parts of Linux's boot_params ("zero page") the guest reads.
 * Offsets are from Documentation/arch/x86/zero-page.rst and boot.rst.
 */
#ifndef GUEST_BOOTPARAMS_H
#define GUEST_BOOTPARAMS_H

#include "types.h"

#define BP_EXT_CMD_LINE_PTR 0x0c8 /* u32: high 32 bits of cmd_line_ptr */
#define BP_E820_ENTRIES 0x1e8	  /* u8 */
#define BP_SETUP_HEADER 0x1f1
#define BP_CMD_LINE_PTR 0x228 /* u32 */
#define BP_CMDLINE_SIZE 0x238 /* u32, written by the kernel image, not the loader */
#define BP_E820_TABLE 0x2d0   /* struct e820_entry[E820_MAX_ENTRIES] */

#define E820_MAX_ENTRIES 128
#define E820_TYPE_RAM 1
#define E820_TYPE_RESERVED 2

struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} PACKED;

_Static_assert(sizeof(struct e820_entry) == 20, "e820 entries are 20 bytes");

static inline u8 bp_read8(const void *bp, u32 off) { return *((const volatile u8 *)bp + off); }

static inline u32 bp_read32(const void *bp, u32 off)
{
	return *(const volatile u32 *)((const u8 *)bp + off);
}

/* Physical (= virtual, identity map) address of the command line, or 0. */
static inline u64 bp_cmdline_addr(const void *bp)
{
	return (u64)bp_read32(bp, BP_CMD_LINE_PTR) | ((u64)bp_read32(bp, BP_EXT_CMD_LINE_PTR) << 32);
}

static inline u32 bp_e820_count(const void *bp)
{
	u32 n = bp_read8(bp, BP_E820_ENTRIES);
	return n > E820_MAX_ENTRIES ? E820_MAX_ENTRIES : n;
}

static inline const struct e820_entry *bp_e820(const void *bp, u32 i)
{
	return (const struct e820_entry *)((const u8 *)bp + BP_E820_TABLE) + i;
}

#endif
