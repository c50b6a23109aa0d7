/* Bump allocator over the RAM that follows the image (see alloc.h). */
#include "alloc.h"

#include "bootparams.h"
#include "lib.h"

extern u8 __image_end[];

static uintptr_t next, limit;

/* The end of the e820 RAM entry that holds the image. */
static uintptr_t ram_end_after(uintptr_t addr)
{
	for (u32 i = 0; i < bp_e820_count(boot_params); i++) {
		const struct e820_entry *e = bp_e820(boot_params, i);
		if (e->type == E820_TYPE_RAM && e->addr <= addr && addr < e->addr + e->size)
			return (uintptr_t)(e->addr + e->size);
	}
	return addr;
}

void *alloc(size_t size, size_t align)
{
	if (!limit) {
		next = ((uintptr_t)__image_end + PAGE_SIZE - 1) & ~(uintptr_t)(PAGE_SIZE - 1);
		limit = ram_end_after(next);
	}
	uintptr_t p = (next + align - 1) & ~(uintptr_t)(align - 1);
	if (p + size > limit || p + size < p)
		panic("alloc: out of memory (%zu bytes wanted, %zu left)", size, (size_t)(limit - next));
	next = p + size;
	memset((void *)p, 0, size);
	return (void *)p;
}
