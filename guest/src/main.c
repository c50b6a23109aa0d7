/* The test guest's C entry: banner, boot_params dump, then the chosen test. */
#include "bootparams.h"
#include "lib.h"
#include "tests.h"

const void *boot_params;

static const char *e820_type_name(u32 type, char *buf, size_t size)
{
	if (type == E820_TYPE_RAM)
		return "usable";
	if (type == E820_TYPE_RESERVED)
		return "reserved";
	snprintf(buf, size, "type %u", type);
	return buf;
}

static void print_e820(void)
{
	u32 n = bp_e820_count(boot_params);

	for (u32 i = 0; i < n; i++) {
		const struct e820_entry *e = bp_e820(boot_params, i);
		u64 addr = e->addr, size = e->size;
		char buf[16];

		/* Linux's format: inclusive end. */
		printf("BIOS-e820: [mem 0x%016llx-0x%016llx] %s\n", addr, addr + size - 1,
		       e820_type_name(e->type, buf, sizeof(buf)));
	}
}

NORETURN void guest_main(const void *bp);

void guest_main(const void *bp)
{
	boot_params = bp;
	u64 cmdline_addr = bp_cmdline_addr(bp);
	cmdline_init(cmdline_addr ? (const char *)(uintptr_t)cmdline_addr : "");

	println("embervm-guest: hello");
	printf("cmdline: %s\n", cmdline_raw());
	print_e820();

	const char *name = cmdline_get("test");
	if (!name || !*name)
		name = "boot";
	const struct guest_test *t = find_test(name);
	if (t)
		t->run();
	else
		printf("embervm-guest: unknown test %s\n", name);
	poweroff();
}
