/* vsock-e2e: the inner guest's side of the vsock checks (busybox has no AF_VSOCK).
 *
 *   vsock-e2e connect CID PORT MESSAGE   connect, send "MESSAGE\n", print the reply line
 *   vsock-e2e echo PORT                  accept one connection, print "got:<line>", reply "echo:<line>\n"
 *   vsock-e2e send CID PORT BYTES        connect, send BYTES zeros, close, wait for the peer's close
 *   vsock-e2e sink PORT                  accept one connection, read to its end, print "bytes=<n>"
 *   vsock-e2e stream CID PORT BYTES      connect, send BYTES of the pattern (byte o is o % 251),
 *                                        half-close, read the host's pattern until it closes;
 *                                        print "stream sent=N received=M bad=K"
 *   vsock-e2e hold CID PORT              connect, send "hold\n", print the reply line, then keep the
 *                                        connection until it ends; print "closed 0" (the peer
 *                                        closed) or "closed -<errno>" (e.g. -104: reset)
 *
 * Freestanding (no libc, raw system calls), built by tests/e2e/environment.py with
 * gcc -static -nostdlib. Exit status 0 on success; on failure it prints
 * "error <step> <errno>" and exits 1.
 */

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_bind 49
#define SYS_listen 50
#define SYS_shutdown 48
#define SYS_exit 60

#define AF_VSOCK 40
#define SOCK_STREAM 1
#define VMADDR_CID_ANY 0xffffffffu

struct sockaddr_vm {
    unsigned short svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_zero[4];
};

static long sys3(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static unsigned long len(const char *s) {
    unsigned long n = 0;
    while (s[n]) n++;
    return n;
}

static void out(const char *s) { sys3(SYS_write, 1, (long)s, (long)len(s)); }

static unsigned int number(const char *s) {
    unsigned int v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (unsigned int)(*s++ - '0');
    return v;
}

static int fail(const char *step, long ret) {
    char digits[24];
    int i = 23;
    unsigned long e = (unsigned long)(-ret);
    digits[i] = 0;
    do {
        digits[--i] = (char)('0' + e % 10);
        e /= 10;
    } while (e && i > 0);
    out("error ");
    out(step);
    out(" ");
    out(digits + i);
    out("\n");
    return 1;
}

/* Read up to a newline (not kept) or until the peer closes; returns the length or < 0. */
static long read_line(long fd, char *buf, long size) {
    long n = 0;
    while (n < size - 1) {
        long r = sys3(SYS_read, fd, (long)(buf + n), 1);
        if (r < 0) return r;
        if (r == 0 || buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return n;
}

static long send_all(long fd, const char *s, unsigned long n) {
    while (n) {
        long w = sys3(SYS_write, fd, (long)s, (long)n);
        if (w <= 0) return w ? w : -1;
        s += w;
        n -= (unsigned long)w;
    }
    return 0;
}

static int do_connect(unsigned int cid, unsigned int port, const char *message) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, cid, {0}};
    char buf[256];
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_connect, fd, (long)&addr, sizeof addr)) < 0) return fail("connect", r);
    if ((r = send_all(fd, message, len(message))) < 0 || (r = send_all(fd, "\n", 1)) < 0) return fail("write", r);
    if ((r = read_line(fd, buf, sizeof buf)) < 0) return fail("read", r);
    out(buf);
    out("\n");
    sys3(SYS_close, fd, 0, 0);
    return 0;
}

static int do_echo(unsigned int port) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, VMADDR_CID_ANY, {0}};
    char buf[256];
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), conn, r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_bind, fd, (long)&addr, sizeof addr)) < 0) return fail("bind", r);
    if ((r = sys3(SYS_listen, fd, 1, 0)) < 0) return fail("listen", r);
    if ((conn = sys3(SYS_accept, fd, 0, 0)) < 0) return fail("accept", conn);
    if ((r = read_line(conn, buf, sizeof buf)) < 0) return fail("read", r);
    out("got:");
    out(buf);
    out("\n");
    if ((r = send_all(conn, "echo:", 5)) < 0 || (r = send_all(conn, buf, len(buf))) < 0 ||
        (r = send_all(conn, "\n", 1)) < 0)
        return fail("write", r);
    sys3(SYS_close, conn, 0, 0);
    sys3(SYS_close, fd, 0, 0);
    return 0;
}

static char bulk[65536];

static void out_number(unsigned long v) {
    char digits[24];
    int i = 23;
    digits[i] = 0;
    do {
        digits[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    out(digits + i);
}

static int do_send(unsigned int cid, unsigned int port, unsigned long bytes) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, cid, {0}};
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_connect, fd, (long)&addr, sizeof addr)) < 0) return fail("connect", r);
    while (bytes) {
        unsigned long n = bytes < sizeof bulk ? bytes : sizeof bulk;
        if ((r = send_all(fd, bulk, n)) < 0) return fail("write", r);
        bytes -= n;
    }
    if ((r = sys3(SYS_shutdown, fd, 1, 0)) < 0) return fail("shutdown", r);
    while ((r = sys3(SYS_read, fd, (long)bulk, sizeof bulk)) > 0) {
    }
    if (r < 0) return fail("read", r);
    sys3(SYS_close, fd, 0, 0);
    out("sent\n");
    return 0;
}

static int do_sink(unsigned int port) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, VMADDR_CID_ANY, {0}};
    unsigned long total = 0;
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), conn, r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_bind, fd, (long)&addr, sizeof addr)) < 0) return fail("bind", r);
    if ((r = sys3(SYS_listen, fd, 1, 0)) < 0) return fail("listen", r);
    if ((conn = sys3(SYS_accept, fd, 0, 0)) < 0) return fail("accept", conn);
    while ((r = sys3(SYS_read, conn, (long)bulk, sizeof bulk)) > 0) total += (unsigned long)r;
    if (r < 0) return fail("read", r);
    sys3(SYS_close, conn, 0, 0);
    sys3(SYS_close, fd, 0, 0);
    out("bytes=");
    out_number(total);
    out("\n");
    return 0;
}

static int do_stream(unsigned int cid, unsigned int port, unsigned long total) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, cid, {0}};
    unsigned long sent = 0, received = 0, bad = 0;
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_connect, fd, (long)&addr, sizeof addr)) < 0) return fail("connect", r);
    while (sent < total) {
        unsigned long n = total - sent < sizeof bulk ? total - sent : sizeof bulk;
        for (unsigned long i = 0; i < n; i++) bulk[i] = (char)((sent + i) % 251);
        if ((r = send_all(fd, bulk, n)) < 0) return fail("write", r);
        sent += n;
    }
    if ((r = sys3(SYS_shutdown, fd, 1, 0)) < 0) return fail("shutdown", r);
    for (;;) {
        long got = sys3(SYS_read, fd, (long)bulk, sizeof bulk);
        if (got < 0) return fail("read", got);
        if (got == 0) break;
        for (long i = 0; i < got; i++)
            if ((unsigned char)bulk[i] != (received + (unsigned long)i) % 251) bad++;
        received += (unsigned long)got;
    }
    sys3(SYS_close, fd, 0, 0);
    out("stream sent=");
    out_number(sent);
    out(" received=");
    out_number(received);
    out(" bad=");
    out_number(bad);
    out("\n");
    return 0;
}

static int do_hold(unsigned int cid, unsigned int port) {
    struct sockaddr_vm addr = {AF_VSOCK, 0, port, cid, {0}};
    char buf[256];
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0), r;
    if (fd < 0) return fail("socket", fd);
    if ((r = sys3(SYS_connect, fd, (long)&addr, sizeof addr)) < 0) return fail("connect", r);
    if ((r = send_all(fd, "hold\n", 5)) < 0) return fail("write", r);
    if ((r = read_line(fd, buf, sizeof buf)) < 0) return fail("read", r);
    out(buf);
    out("\n");
    while ((r = sys3(SYS_read, fd, (long)buf, sizeof buf)) > 0) {
    }
    out("closed ");
    if (r < 0) out("-");
    out_number((unsigned long)(r < 0 ? -r : r));
    out("\n");
    sys3(SYS_close, fd, 0, 0);
    return 0;
}

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

int cmain(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    if (argc == 5 && streq(argv[1], "connect")) return do_connect(number(argv[2]), number(argv[3]), argv[4]);
    if (argc == 3 && streq(argv[1], "echo")) return do_echo(number(argv[2]));
    if (argc == 5 && streq(argv[1], "send")) return do_send(number(argv[2]), number(argv[3]), number(argv[4]));
    if (argc == 3 && streq(argv[1], "sink")) return do_sink(number(argv[2]));
    if (argc == 5 && streq(argv[1], "stream")) return do_stream(number(argv[2]), number(argv[3]), number(argv[4]));
    if (argc == 4 && streq(argv[1], "hold")) return do_hold(number(argv[2]), number(argv[3]));
    out("usage: vsock-e2e connect CID PORT MESSAGE | echo PORT | send CID PORT BYTES | sink PORT | stream CID PORT BYTES"
        " | hold CID PORT\n");
    return 2;
}

__asm__(
    ".global _start\n"
    "_start:\n"
    "    mov %rsp, %rdi\n"
    "    and $-16, %rsp\n"
    "    call cmain\n"
    "    mov %eax, %edi\n"
    "    mov $60, %eax\n"
    "    syscall\n");
