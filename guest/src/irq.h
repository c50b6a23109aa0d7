/*
 * Interrupts for the test guest: IDT, local APIC, IOAPIC, a handler table.
 *
 * kvm_pvm cannot run iretq or int n, so every vector's stub (irq.S) returns
 * by hand: it rebuilds RFLAGS and RIP on the interrupted stack and ends with
 * `popfq; ret`. Exceptions (vectors 0..31) print a line and triple-fault.
 *
 * Vectors: ISA/GSI n (= IOAPIC pin n, edge, active high) arrives on vector
 * IRQ_VECTOR_BASE + n; the LAPIC timer (deadlines) on TIMER_VECTOR; 0xff is
 * the spurious vector. The 8259 PICs and LINT0 are masked.
 *
 * Everything runs with interrupts off (cli) except inside
 * wait_for_interrupt() (and between irq_sti()/cli() pairs a test opens).
 */
#ifndef GUEST_IRQ_H
#define GUEST_IRQ_H

#include "types.h"

#define IRQ_VECTOR_BASE 0x30
#define IRQ_MAX_GSI 23
#define TIMER_VECTOR 0xef
#define SPURIOUS_VECTOR 0xff

#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL

/* Called with interrupts off, before the EOI; `arg` as given to irq_enable. */
typedef void (*irq_handler_t)(u32 gsi, void *arg);

/* IDT, PIC mask, LAPIC on. Idempotent; every irq_* call does it first. */
void irq_init(void);

/* Route GSI `gsi` (IOAPIC pin, edge, active high) to `handler` on the boot CPU, unmasked. */
void irq_enable(u32 gsi, irq_handler_t handler, void *arg);
/* Mask the pin again and forget the handler. */
void irq_disable(u32 gsi);

/* sti; hlt; cli: sleep until an interrupt (any) has been handled. */
void wait_for_interrupt(void);

/* Interrupts delivered per vector since boot (exceptions excluded). */
u64 irq_count(u32 vector);

/*
 * Deadlines on the LAPIC timer (one-shot; one deadline at a time): start one,
 * then poll deadline_passed(). While a deadline runs, its expiry also wakes
 * wait_for_interrupt(), so `while (!cond && !deadline_passed())
 * wait_for_interrupt();` never sleeps forever.
 */
void deadline_start(u32 ms);
bool deadline_passed(void);
void deadline_stop(void);

#endif
