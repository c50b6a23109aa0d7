/*
 * kbd: the i8042 keyboard interrupt. Waits for IRQ 1 and prints the bytes the
 * controller delivers, so the host can check the API's SendCtrlAltDel end to end.
 *
 *   test=kbd [kbd.count=4] [kbd.timeout_ms=10000]
 *   -> "kbd: waiting", then "kbd: scancodes 14 11 e0 71" (or "kbd: FAIL ...")
 */
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "tests.h"

#define I8042_DATA 0x60
#define I8042_STATUS 0x64
#define I8042_OBF 0x01
#define I8042_IRQ 1
#define KBD_MAX 16

static u8 kbd_buf[KBD_MAX];
static volatile u32 kbd_len;

static void kbd_irq(u32 gsi, void *arg)
{
	(void)gsi;
	(void)arg;
	while (inb(I8042_STATUS) & I8042_OBF) {
		u8 byte = inb(I8042_DATA);
		if (kbd_len < KBD_MAX)
			kbd_buf[kbd_len++] = byte;
	}
}

static void test_kbd(void)
{
	u32 want = (u32)cmdline_get_u64("kbd.count", 4);
	if (want > KBD_MAX)
		want = KBD_MAX;
	irq_enable(I8042_IRQ, kbd_irq, NULL);
	println("kbd: waiting");
	deadline_start((u32)cmdline_get_u64("kbd.timeout_ms", 10000));
	while (kbd_len < want && !deadline_passed())
		wait_for_interrupt();
	deadline_stop();
	irq_disable(I8042_IRQ);
	if (kbd_len < want) {
		printf("kbd: FAIL %u of %u bytes\n", kbd_len, want);
		return;
	}
	printf("kbd: scancodes");
	for (u32 i = 0; i < kbd_len; i++)
		printf(" %02x", kbd_buf[i]);
	printf("\n");
}
GUEST_TEST("kbd", test_kbd);
