/* Turn a PVH hvm_start_info into the boot_params page the rest of the guest reads. */

#include "bootparams.h"
#include "types.h"

#define HVM_START_MAGIC 0x336ec578

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr; /* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* In .data, not .bss: _start64 zeroes .bss after we have filled this. */
static u8 pvh_zero_page[4096] __attribute__((aligned(4096), section(".data.pvh")));

void *pvh_boot_params(const struct hvm_start_info *info);

void *pvh_boot_params(const struct hvm_start_info *info)
{
	u8 *bp = pvh_zero_page;
	if (info->magic != HVM_START_MAGIC)
		return bp; /* no command line, no e820: the guest still prints its banner */
	*(u32 *)(bp + BP_CMD_LINE_PTR) = (u32)info->cmdline_paddr;
	*(u32 *)(bp + BP_EXT_CMD_LINE_PTR) = (u32)(info->cmdline_paddr >> 32);
	u32 count = info->version >= 1 ? info->memmap_entries : 0;
	if (count > E820_MAX_ENTRIES)
		count = E820_MAX_ENTRIES;
	const struct hvm_memmap_entry *map = (const struct hvm_memmap_entry *)info->memmap_paddr;
	struct e820_entry *e820 = (struct e820_entry *)(bp + BP_E820_TABLE);
	for (u32 i = 0; i < count; i++) {
		e820[i].addr = map[i].addr;
		e820[i].size = map[i].size;
		e820[i].type = map[i].type;
	}
	bp[BP_E820_ENTRIES] = (u8)count;
	return bp;
}
