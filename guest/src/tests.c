/* The built-in tests: boot, echo, loop, triple, portio. */
#include "io.h"
#include "lib.h"
#include "tests.h"

extern const struct guest_test __guest_tests_start[], __guest_tests_end[];

const struct guest_test *find_test(const char *name)
{
	for (const struct guest_test *t = __guest_tests_start; t < __guest_tests_end; t++) {
		if (!strcmp(t->name, name))
			return t;
	}
	return NULL;
}

/* boot: the guest came up and read its boot_params. */
static void test_boot(void) { println("embervm-guest: ok"); }
GUEST_TEST("boot", test_boot);

/* boottimer: signal "boot complete" to Firecracker's boot timer device (--boot-timer), as a
 * guest's init does: one byte, 123, at the first MMIO window. */
static void test_boottimer(void)
{
	mmio_write8(0xd0000000UL, 123);
	println("embervm-guest: boot timer signalled");
}
GUEST_TEST("boottimer", test_boottimer);

/* echo: echo serial input lines as "echo: <line>" until a line "quit". */
#define ECHO_LINE_MAX 256

static void test_echo(void)
{
	char line[ECHO_LINE_MAX];
	size_t len = 0;
	bool after_cr = false;

	println("embervm-guest: echo ready");
	for (;;) {
		char c = (char)serial_getc();
		if (c == '\n' && after_cr) { /* the \n of a \r\n pair */
			after_cr = false;
			continue;
		}
		after_cr = c == '\r';
		if (c != '\r' && c != '\n') {
			if (len < ECHO_LINE_MAX - 1)
				line[len++] = c;
			continue;
		}
		line[len] = '\0';
		if (!strcmp(line, "quit"))
			return;
		printf("echo: %s\n", line);
		len = 0;
	}
}
GUEST_TEST("echo", test_echo);

/* loop: "tick N" every ticks_every busy iterations, forever. */
#define TICKS_EVERY_DEFAULT 200000

static void test_loop(void)
{
	u64 every = cmdline_get_u64("ticks_every", TICKS_EVERY_DEFAULT);

	for (u64 tick = 0;; tick++) {
		printf("tick %llu\n", tick);
		for (u64 i = 0; i < every; i++)
			barrier();
	}
}
GUEST_TEST("loop", test_loop);

/* triple: announce, then triple-fault (the VMM sees a shutdown). */
static void test_triple(void)
{
	println("embervm-guest: triple-faulting");
	triple_fault();
}
GUEST_TEST("triple", test_triple);

/* portio: read a port no device claims; the VMM answers 0xff. */
#define UNUSED_PORT 0x510

static void test_portio(void) { printf("portio: 0x%02x\n", inb(UNUSED_PORT)); }
GUEST_TEST("portio", test_portio);
