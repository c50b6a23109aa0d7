/* IDT, local APIC, IOAPIC and the handler table (see irq.h); test=irq. */
#include "irq.h"

#include "io.h"
#include "lib.h"
#include "tests.h"

/* --- IDT -------------------------------------------------------------------------- */

struct idt_gate {
	u16 offset_lo;
	u16 selector;
	u8 ist;
	u8 type_attr; /* P=1, DPL=0, type 0xe: 64-bit interrupt gate (IF cleared on entry) */
	u16 offset_mid;
	u32 offset_hi;
	u32 reserved;
} PACKED;

_Static_assert(sizeof(struct idt_gate) == 16, "64-bit IDT gates are 16 bytes");

/* What irq_common (irq.S) leaves on the stack. */
struct irq_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

_Static_assert(sizeof(struct irq_frame) == 176, "irq.S frame offsets");

extern const u8 irq_stubs[];
void irq_dispatch(struct irq_frame *f);

static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct {
	irq_handler_t fn;
	void *arg;
} handlers[IRQ_MAX_GSI + 1];
static u64 counts[256];
static bool initialized;

/* --- local APIC (xAPIC, MMIO) -------------------------------------------------------- */

#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_TMICT 0x380
#define LAPIC_TMCCT 0x390
#define LAPIC_TDCR 0x3e0

#define SVR_ENABLE 0x100
#define LVT_MASKED 0x10000
#define TDCR_DIV16 0x3
/* KVM's APIC bus runs at 1 GHz: divided by 16, 62500 ticks a millisecond. */
#define TIMER_TICKS_PER_MS 62500u

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE 0x800

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;

	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (u64)hi << 32 | lo;
}

static void wrmsr(u32 msr, u64 v) { __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }

/* --- IOAPIC ---------------------------------------------------------------------------- */

#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define REDTBL_MASKED 0x10000 /* fixed delivery, physical, active high, edge: all zero */

static void ioapic_write(u32 reg, u32 v)
{
	mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
	mmio_write32(IOAPIC_BASE + IOAPIC_WIN, v);
}

/* --- set-up ---------------------------------------------------------------------------- */

static void set_gate(u32 vector, u16 cs)
{
	u64 addr = (u64)(uintptr_t)(irq_stubs + 16 * vector);
	struct idt_gate *g = &idt[vector];

	g->offset_lo = (u16)addr;
	g->selector = cs;
	g->ist = 0;
	g->type_attr = 0x8e;
	g->offset_mid = (u16)(addr >> 16);
	g->offset_hi = (u32)(addr >> 32);
	g->reserved = 0;
}

void irq_init(void)
{
	if (initialized)
		return;
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	for (u32 v = 0; v < 256; v++)
		set_gate(v, cs);
	struct {
		u16 limit;
		u64 base;
	} PACKED idtr = {sizeof(idt) - 1, (u64)(uintptr_t)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");

	/* Both 8259s fully masked: the PIT's IRQ 0 would otherwise arrive via ExtINT. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);

	u64 base = rdmsr(MSR_APIC_BASE);
	if (!(base & APIC_BASE_ENABLE))
		wrmsr(MSR_APIC_BASE, base | APIC_BASE_ENABLE);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
	lapic_write(LAPIC_TDCR, TDCR_DIV16);
	lapic_write(LAPIC_TPR, 0);
	lapic_write(LAPIC_SVR, SVR_ENABLE | SPURIOUS_VECTOR);
	initialized = true;
}

void irq_enable(u32 gsi, irq_handler_t handler, void *arg)
{
	if (gsi > IRQ_MAX_GSI)
		panic("irq_enable: GSI %u is not an IOAPIC pin", gsi);
	irq_init();
	handlers[gsi].fn = handler;
	handlers[gsi].arg = arg;
	u32 dest = lapic_read(LAPIC_ID) >> 24;
	ioapic_write(IOAPIC_REDTBL(gsi) + 1, dest << 24);
	ioapic_write(IOAPIC_REDTBL(gsi), IRQ_VECTOR_BASE + gsi);
}

void irq_disable(u32 gsi)
{
	if (gsi > IRQ_MAX_GSI)
		return;
	irq_init();
	ioapic_write(IOAPIC_REDTBL(gsi), REDTBL_MASKED | (IRQ_VECTOR_BASE + gsi));
	handlers[gsi].fn = NULL;
	handlers[gsi].arg = NULL;
}

void wait_for_interrupt(void)
{
	/* sti's one-instruction shadow makes "sti; hlt" atomic: no wake-up is lost. */
	__asm__ volatile("sti; hlt; cli" : : : "memory");
}

u64 irq_count(u32 vector) { return vector < 256 ? counts[vector] : 0; }

/* --- deadlines ------------------------------------------------------------------------- */

void deadline_start(u32 ms)
{
	irq_init();
	u64 ticks = (u64)ms * TIMER_TICKS_PER_MS;
	if (ticks > 0xffffffffu)
		ticks = 0xffffffffu;
	if (!ticks)
		ticks = 1;
	lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot, unmasked */
	lapic_write(LAPIC_TMICT, (u32)ticks);
}

bool deadline_passed(void) { return lapic_read(LAPIC_TMCCT) == 0; }

void deadline_stop(void)
{
	lapic_write(LAPIC_TMICT, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
}

/* --- dispatch (called from irq.S with interrupts off) ---------------------------------- */

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "15",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "22",  "23",  "24",  "25",  "26",  "27",  "28",  "#VC", "#SX", "31",
};

void irq_dispatch(struct irq_frame *f)
{
	u32 vector = (u32)f->vector;

	if (vector < 32) {
		u64 cr2;
		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		panic("exception %s (vector %u) at rip 0x%llx error 0x%llx cr2 0x%llx rsp 0x%llx", exception_names[vector],
		      vector, f->rip, f->error, cr2, f->rsp);
	}
	if (vector == SPURIOUS_VECTOR) /* no EOI for a spurious interrupt */
		return;
	counts[vector]++;
	if (vector >= IRQ_VECTOR_BASE && vector <= IRQ_VECTOR_BASE + IRQ_MAX_GSI) {
		u32 gsi = vector - IRQ_VECTOR_BASE;
		if (handlers[gsi].fn)
			handlers[gsi].fn(gsi, handlers[gsi].arg);
	}
	/* TIMER_VECTOR: nothing to do, it only ends a wait_for_interrupt(). */
	lapic_write(LAPIC_EOI, 0);
}

/* --- test=irq: the UART's THRE interrupt on IRQ 4 --------------------------------------- */

#define SERIAL_IRQ 4
#define UART_IER 1
#define UART_IIR 2
#define IER_THRE 0x02
#define IIR_NO_INTERRUPT 0x01

static volatile u32 serial_irqs;

static void serial_irq(u32 gsi, void *arg)
{
	/* Reading IIR acknowledges a THRE interrupt. */
	(void)inb(COM1 + UART_IIR);
	serial_irqs = serial_irqs + 1;
}

static void test_irq(void)
{
	u32 timeout_ms = (u32)cmdline_get_u64("irq.timeout_ms", 5000);

	irq_enable(SERIAL_IRQ, serial_irq, NULL);
	/* Enabling THRE while the holding register is empty raises the interrupt at once. */
	outb(COM1 + UART_IER, IER_THRE);
	deadline_start(timeout_ms);
	while (!serial_irqs && !deadline_passed())
		wait_for_interrupt();
	bool first = serial_irqs != 0;
	/* Every byte written with THRE enabled raises another one; take them as they come. */
	__asm__ volatile("sti" : : : "memory");
	puts_raw("irq: printing with THRE enabled\n");
	cli();
	while (serial_irqs < 2 && !deadline_passed())
		wait_for_interrupt();
	deadline_stop();
	outb(COM1 + UART_IER, 0);
	irq_disable(SERIAL_IRQ);

	if (!first)
		println("irq: FAIL no serial interrupt after enabling THRE");
	printf("irq: serial interrupts %u\n", serial_irqs);

	/* The LAPIC timer behind deadlines: a short one must wake a halted CPU. */
	u32 timer_ms = (u32)cmdline_get_u64("irq.timer_ms", 10);
	u64 before = irq_count(TIMER_VECTOR);
	deadline_start(timer_ms);
	while (!deadline_passed())
		wait_for_interrupt();
	deadline_stop();
	if (irq_count(TIMER_VECTOR) == before + 1)
		println("irq: timer ok");
	else
		printf("irq: FAIL timer interrupts %llu\n", irq_count(TIMER_VECTOR) - before);
}
GUEST_TEST("irq", test_irq);

/*
 * uartirq: serial input taken by interrupt only, as Linux's 8250 driver takes it: IER enables
 * the received-data interrupt once, then the CPU halts until IRQ 4; the handler drains the
 * receive FIFO. Prints "uartirq: ready", then "uartirq: got <line> irqs <n>" per line, for
 * ever (snapshot tests: a restored UART must keep IER, or no line ever arrives).
 */
#define IER_RDA 0x01
#define UARTIRQ_LSR 5
#define UART_LSR_DR 0x01
#define UARTIRQ_LINE_MAX 128

static char uartirq_line[UARTIRQ_LINE_MAX];
static volatile u32 uartirq_len;
static volatile bool uartirq_done;

static void uartirq_handler(u32 gsi, void *arg)
{
	while (inb(COM1 + UARTIRQ_LSR) & UART_LSR_DR) {
		char c = (char)inb(COM1);
		serial_irqs = serial_irqs + 1;
		if (uartirq_done)
			continue; /* the main loop has not printed the last line yet: drop */
		if (c == '\n' || c == '\r') {
			uartirq_done = uartirq_len > 0;
			continue;
		}
		if (uartirq_len < UARTIRQ_LINE_MAX - 1) {
			uartirq_line[uartirq_len] = c;
			uartirq_len = uartirq_len + 1;
		}
	}
}

static void test_uartirq(void)
{
	irq_enable(SERIAL_IRQ, uartirq_handler, NULL);
	outb(COM1 + UART_IER, IER_RDA);
	println("uartirq: ready");
	for (;;) {
		while (!uartirq_done)
			wait_for_interrupt();
		uartirq_line[uartirq_len] = '\0';
		printf("uartirq: got %s irqs %u\n", uartirq_line, serial_irqs);
		uartirq_len = 0;
		uartirq_done = false;
	}
}
GUEST_TEST("uartirq", test_uartirq);
