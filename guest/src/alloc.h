/*
 * A bump allocator for buffers devices see (virtqueues, request buffers):
 * zeroed memory from the RAM after the image, identity-mapped, so a pointer
 * is also the guest-physical address a device is given. Nothing is freed.
 */
#ifndef GUEST_ALLOC_H
#define GUEST_ALLOC_H

#include "types.h"

#define PAGE_SIZE 4096

/* `size` zeroed bytes aligned to `align` (a power of two); panics when RAM runs out. */
void *alloc(size_t size, size_t align);
static inline void *alloc_pages(size_t size) { return alloc(size, PAGE_SIZE); }

/* Guest-physical address of a pointer (identity map). */
static inline u64 virt_to_phys(const volatile void *p) { return (u64)(uintptr_t)p; }

#endif
