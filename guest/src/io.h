/* Port I/O and MMIO accessors. Each access is a VM exit (or an emulated insn). */
#ifndef GUEST_IO_H
#define GUEST_IO_H

#include "types.h"

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }

static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* Compiler barrier; x86 keeps stores/loads to uncached MMIO in order. */
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
/*
 * Full fence (store then load), e.g. publishing the avail index and then
 * reading the device's avail_event. A locked add to the stack, as Linux's
 * smp_mb on x86-64: plain integer code the emulator runs like any other.
 */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc"); }

static inline u8 mmio_read8(uintptr_t addr) { return *(volatile u8 *)addr; }
static inline u16 mmio_read16(uintptr_t addr) { return *(volatile u16 *)addr; }
static inline u32 mmio_read32(uintptr_t addr) { return *(volatile u32 *)addr; }
static inline u64 mmio_read64(uintptr_t addr) { return *(volatile u64 *)addr; }
static inline void mmio_write8(uintptr_t addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void mmio_write16(uintptr_t addr, u16 v) { *(volatile u16 *)addr = v; }
static inline void mmio_write32(uintptr_t addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void mmio_write64(uintptr_t addr, u64 v) { *(volatile u64 *)addr = v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void cli(void) { __asm__ volatile("cli" : : : "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" : : : "memory"); }

#endif
