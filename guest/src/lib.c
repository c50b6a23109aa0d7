/* Tiny runtime of the test guest: serial console, printf, strings, cmdline. */
#include "lib.h"

#include "io.h"

/* ------------------------------------------------------------------ serial */

#define UART_LSR 5
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY 0x20

void serial_putc(char c)
{
	while (!(inb(COM1 + UART_LSR) & LSR_THR_EMPTY))
		cpu_relax();
	outb(COM1, (u8)c);
}

int serial_trygetc(void)
{
	if (!(inb(COM1 + UART_LSR) & LSR_DATA_READY))
		return -1;
	return inb(COM1);
}

int serial_getc(void)
{
	int c;

	while ((c = serial_trygetc()) < 0)
		cpu_relax();
	return c;
}

void puts_raw(const char *s)
{
	while (*s)
		serial_putc(*s++);
}

void println(const char *s)
{
	puts_raw(s);
	serial_putc('\n');
}

/* ------------------------------------------------------------------ printf */

struct sink {
	char *buf;  /* NULL: write to the serial port */
	size_t size;
	size_t len; /* characters produced, even those that did not fit */
};

static void sink_put(struct sink *s, char c)
{
	if (!s->buf)
		serial_putc(c);
	else if (s->len + 1 < s->size)
		s->buf[s->len] = c;
	s->len++;
}

static void sink_pad(struct sink *s, char c, int n)
{
	while (n-- > 0)
		sink_put(s, c);
}

static void format_num(struct sink *s, u64 v, bool neg, unsigned base, bool upper, int width, bool zero,
		       bool left)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);

	int len = n + (neg ? 1 : 0);
	if (!left && !zero)
		sink_pad(s, ' ', width - len);
	if (neg)
		sink_put(s, '-');
	if (!left && zero)
		sink_pad(s, '0', width - len);
	while (n)
		sink_put(s, tmp[--n]);
	if (left)
		sink_pad(s, ' ', width - len);
}

static void do_format(struct sink *s, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			sink_put(s, *fmt);
			continue;
		}
		fmt++;
		bool zero = false, left = false;
		for (;; fmt++) {
			if (*fmt == '0')
				zero = true;
			else if (*fmt == '-')
				left = true;
			else
				break;
		}
		int width = 0;
		if (*fmt == '*') {
			width = va_arg(ap, int);
			fmt++;
		} else {
			while (*fmt >= '0' && *fmt <= '9')
				width = width * 10 + (*fmt++ - '0');
		}
		int longs = 0;
		while (*fmt == 'l') {
			longs++;
			fmt++;
		}
		if (*fmt == 'z') {
			longs = 1;
			fmt++;
		}

		switch (*fmt) {
		case 'd':
		case 'i': {
			s64 v = longs ? va_arg(ap, s64) : va_arg(ap, int);
			u64 mag = v < 0 ? (u64)0 - (u64)v : (u64)v;
			format_num(s, mag, v < 0, 10, false, width, zero, left);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			u64 v = longs ? va_arg(ap, u64) : va_arg(ap, unsigned);
			format_num(s, v, false, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, zero, left);
			break;
		}
		case 'p':
			sink_put(s, '0');
			sink_put(s, 'x');
			format_num(s, (u64)(uintptr_t)va_arg(ap, void *), false, 16, false, width, zero, left);
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);
			if (!left)
				sink_pad(s, ' ', width - 1);
			sink_put(s, c);
			if (left)
				sink_pad(s, ' ', width - 1);
			break;
		}
		case 's': {
			const char *str = va_arg(ap, const char *);
			if (!str)
				str = "(null)";
			int len = (int)strlen(str);
			if (!left)
				sink_pad(s, ' ', width - len);
			while (*str)
				sink_put(s, *str++);
			if (left)
				sink_pad(s, ' ', width - len);
			break;
		}
		case '%':
			sink_put(s, '%');
			break;
		case '\0':
			return;
		default: /* unknown conversion: print it as is */
			sink_put(s, '%');
			sink_put(s, *fmt);
			break;
		}
	}
}

int vprintf(const char *fmt, va_list ap)
{
	struct sink s = {NULL, 0, 0};

	do_format(&s, fmt, ap);
	return (int)s.len;
}

int printf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink s = {buf, size, 0};

	do_format(&s, fmt, ap);
	if (size)
		buf[s.len < size ? s.len : size - 1] = '\0';
	return (int)s.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/* ----------------------------------------------------------------- strings */

size_t strlen(const char *s)
{
	const char *p = s;

	while (*p)
		p++;
	return (size_t)(p - s);
}

size_t strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b || !*a)
			return (u8)*a - (u8)*b;
	}
	return 0;
}

char *strchr(const char *s, int c)
{
	for (;; s++) {
		if (*s == (char)c)
			return (char *)s;
		if (!*s)
			return NULL;
	}
}

/* rep stos/movs: one instruction for the emulator, however long the run. */
void *memset(void *d, int c, size_t n)
{
	void *ret = d;

	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *ret = d;

	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return ret;
}

void *memmove(void *d, const void *s, size_t n)
{
	if ((uintptr_t)d <= (uintptr_t)s || (uintptr_t)d >= (uintptr_t)s + n)
		return memcpy(d, s, n);
	/* Overlapping, destination above source: copy backwards. */
	u8 *dp = (u8 *)d + n;
	const u8 *sp = (const u8 *)s + n;
	while (n--)
		*--dp = *--sp;
	return d;
}

/* repe cmpsb: one instruction for the emulator, however long the run. */
int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	bool differ;

	if (!n)
		return 0;
	__asm__ volatile("repe cmpsb" : "+S"(x), "+D"(y), "+c"(n), "=@ccnz"(differ) : : "memory");
	/* Both pointers stopped one past the first differing byte. */
	return differ ? x[-1] - y[-1] : 0;
}

bool parse_u64(const char *s, u64 *out)
{
	unsigned base = 10;
	u64 v = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return false;
	for (; *s; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = (unsigned)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (unsigned)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (unsigned)(*s - 'A' + 10);
		else
			return false;
		v = v * base + d;
	}
	*out = v;
	return true;
}

/* ----------------------------------------------------------------- cmdline */

#define CMDLINE_MAX 2048
#define CMDLINE_MAX_ARGS 64

static char cmdline_copy[CMDLINE_MAX];
static char cmdline_words[CMDLINE_MAX];
static struct {
	const char *key;
	const char *value;
} cmdline_args[CMDLINE_MAX_ARGS];
static unsigned cmdline_nargs;

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/*
 * Split into tokens at unquoted whitespace; double quotes group and are
 * dropped (as Linux does: key="a b" gives the value a b). Each token is
 * split at its first '='.
 */
void cmdline_init(const char *cmdline)
{
	size_t len = cmdline ? strnlen(cmdline, CMDLINE_MAX - 1) : 0;

	memcpy(cmdline_copy, cmdline, len);
	cmdline_copy[len] = '\0';
	cmdline_nargs = 0;

	const char *p = cmdline_copy;
	char *w = cmdline_words;
	while (*p && cmdline_nargs < CMDLINE_MAX_ARGS) {
		while (is_space(*p))
			p++;
		if (!*p)
			break;
		char *word = w;
		char *eq = NULL;
		bool quoted = false;
		for (; *p && (quoted || !is_space(*p)); p++) {
			if (*p == '"') {
				quoted = !quoted;
				continue;
			}
			if (*p == '=' && !eq) {
				eq = w;
				*w++ = '\0';
				continue;
			}
			*w++ = *p;
		}
		*w++ = '\0';
		cmdline_args[cmdline_nargs].key = word;
		cmdline_args[cmdline_nargs].value = eq ? eq + 1 : "";
		cmdline_nargs++;
	}
}

const char *cmdline_raw(void) { return cmdline_copy; }

const char *cmdline_get(const char *key)
{
	/* Last occurrence wins. */
	for (unsigned i = cmdline_nargs; i-- > 0;) {
		if (!strcmp(cmdline_args[i].key, key))
			return cmdline_args[i].value;
	}
	return NULL;
}

const char *cmdline_get_nth(const char *key, unsigned n)
{
	for (unsigned i = 0; i < cmdline_nargs; i++) {
		if (!strcmp(cmdline_args[i].key, key) && n-- == 0)
			return cmdline_args[i].value;
	}
	return NULL;
}

u64 cmdline_get_u64(const char *key, u64 dflt)
{
	const char *v = cmdline_get(key);
	u64 out;

	if (v && parse_u64(v, &out))
		return out;
	return dflt;
}

/* --------------------------------------------------------- machine control */

void triple_fault(void)
{
	static const struct {
		u16 limit;
		u64 base;
	} PACKED empty_idt = {0, 0};

	for (;;)
		__asm__ volatile("cli; lidt %0; ud2" : : "m"(empty_idt) : "memory");
}

void poweroff(void)
{
	outb(0x64, 0xfe);
	/* The VMM should have stopped us at the outb. Do not hang a test run. */
	for (volatile int i = 0; i < 1000; i++)
		cpu_relax();
	println("embervm-guest: poweroff did not stop the VM, triple-faulting");
	triple_fault();
}

void panic(const char *fmt, ...)
{
	va_list ap;

	puts_raw("embervm-guest: panic: ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	serial_putc('\n');
	triple_fault();
}
