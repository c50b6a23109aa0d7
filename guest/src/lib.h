/* Tiny runtime of the test guest: serial console, printf, strings, cmdline. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include "types.h"

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

/* --- serial console (8250 at COM1, polled) --- */
#define COM1 0x3f8
void serial_putc(char c);
int serial_getc(void);	   /* blocks until a byte arrives */
int serial_trygetc(void); /* -1 when nothing is pending */
void puts_raw(const char *s);	  /* no newline added */
void println(const char *s);	  /* s + "\n" */

/*
 * printf subset: %s %c %d %i %u %x %X %p %%, length modifiers l / ll / z,
 * flags '0' and '-', a field width (digits or *). Newlines are sent as "\n"
 * only (no "\r").
 */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* --- strings / memory (gcc may emit calls to mem* itself) --- */
size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
/* Parse decimal or 0x-hex; returns false on junk or an empty string. */
bool parse_u64(const char *s, u64 *out);

/* --- kernel command line: space-separated key=value tokens --- */
void cmdline_init(const char *cmdline);
const char *cmdline_raw(void);			/* the string as given */
const char *cmdline_get(const char *key);	/* value, "" for a bare key, NULL if absent */
u64 cmdline_get_u64(const char *key, u64 dflt); /* dflt when absent or not a number */
/* The n-th (from 0, in command-line order) value of a key given several times, or NULL. */
const char *cmdline_get_nth(const char *key, unsigned n);

/* --- machine control --- */
NORETURN void poweroff(void);	  /* i8042 reset (0x64 <- 0xfe); the VMM exits with 0 */
NORETURN void triple_fault(void); /* empty IDT + ud2 */
NORETURN void panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The boot_params pointer the VMM passed in RSI. */
extern const void *boot_params;

#endif
