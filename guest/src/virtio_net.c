/*
 * virtio-net driver (see virtio_net.h) and its tests:
 *
 *   test=net        ARP for the host, a UDP datagram to it, then answer ARP and
 *                   ICMP echo for our address until a UDP "quit" arrives.
 *   test=net.mmds   ARP for the MMDS address, then over one TCP connection to
 *                   port 80: PUT /latest/api/token, GET in JSON and IMDS
 *                   format with the token, GET without it (401), FIN.
 *
 * Addresses come from the command line: net.ip, net.host (dotted quads),
 * net.port (the host's UDP port), mmds.ip (default 169.254.169.254),
 * net.timeout_ms (per wait, default 5000), net.serve_ms (default 20000).
 */
#include "virtio_net.h"

#include "alloc.h"
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "tests.h"

const char *net_init(struct net_dev *n, struct virtio_dev *d)
{
	memset(n, 0, sizeof(*n));
	n->vdev = d;
	n->timeout_ms = (u32)cmdline_get_u64("net.timeout_ms", 5000);
	if (d->device_id != VIRTIO_ID_NET)
		return "not a network device";
	const char *err = virtio_negotiate(d, VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(VIRTIO_NET_F_MAC));
	if (!err)
		err = virtio_setup_queue(d, 0, 16);
	if (!err)
		err = virtio_setup_queue(d, 1, 16);
	if (err) {
		virtio_fail(d);
		return err;
	}
	if (!virtio_has(d, VIRTIO_NET_F_MAC))
		return "the device offers no MAC";
	for (u32 i = 0; i < 6; i++)
		n->mac[i] = virtio_config_read8(d, i);
	err = virtio_driver_ok(d, false);
	if (err)
		return err;
	struct virtq *rx = &d->vqs[0];
	for (u32 i = 0; i < NET_RX_BUFFERS; i++) {
		n->rx_bufs[i] = alloc(NET_BUF_SIZE, 64);
		struct virtio_sg sg = {n->rx_bufs[i], NET_BUF_SIZE};
		if (virtq_add(rx, &sg, 0, 1, n->rx_bufs[i]) < 0)
			return "rx queue full";
	}
	virtq_kick(rx);
	n->tx_buf = alloc(NET_BUF_SIZE, 64);
	return NULL;
}

const char *net_send(struct net_dev *n, const void *frame, u32 len)
{
	struct virtq *tx = &n->vdev->vqs[1];
	if (len + VIRTIO_NET_HDR_SIZE > NET_BUF_SIZE)
		return "frame too long";
	memset(n->tx_buf, 0, VIRTIO_NET_HDR_SIZE);
	memcpy(n->tx_buf + VIRTIO_NET_HDR_SIZE, frame, len);
	struct virtio_sg sg = {n->tx_buf, VIRTIO_NET_HDR_SIZE + len};
	if (virtq_add(tx, &sg, 1, 0, n->tx_buf) < 0)
		return "tx queue full";
	virtq_kick(tx);
	u32 used;
	if (!virtq_wait_used(tx, &used, n->timeout_ms))
		return tx->error ? tx->error : "timeout waiting for the frame to be sent";
	return NULL;
}

u32 net_poll(struct net_dev *n, u8 *buf, u32 size)
{
	struct virtq *rx = &n->vdev->vqs[0];
	u32 len = 0;
	u8 *b = virtq_get_used(rx, &len);
	if (!b)
		return 0;
	u32 frame = len > VIRTIO_NET_HDR_SIZE ? len - VIRTIO_NET_HDR_SIZE : 0;
	if (frame > size)
		frame = size;
	memcpy(buf, b + VIRTIO_NET_HDR_SIZE, frame);
	struct virtio_sg sg = {b, NET_BUF_SIZE};
	virtq_add(rx, &sg, 0, 1, b);
	virtq_kick(rx);
	return frame ? frame : 0;
}

/* ------------------------------------------------------------------ packets */

#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8), p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)), put16(p + 2, (u16)v); }

static u32 sum16(const u8 *p, u32 len, u32 sum)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += be16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	return sum;
}

static u16 fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static bool parse_ip(const char *s, u8 out[4])
{
	for (u32 i = 0; i < 4; i++) {
		u32 v = 0, digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 3)
			v = v * 10 + (u32)(*s++ - '0'), digits++;
		if (!digits || v > 255 || (i < 3 && *s++ != '.'))
			return false;
		out[i] = (u8)v;
	}
	return *s == 0 || *s == ' ';
}

static bool ip_option(const char *key, const char *dflt, u8 out[4])
{
	const char *v = cmdline_get(key);
	return parse_ip(v ? v : dflt, out);
}

struct stack {
	struct net_dev *dev;
	u8 ip[4];
	u8 frame[NET_BUF_SIZE];
	u8 out[NET_BUF_SIZE];
	u16 ident;
	u32 pings;
};

static u8 *eth(struct stack *s, const u8 *dst, u16 type)
{
	memcpy(s->out, dst, 6);
	memcpy(s->out + 6, s->dev->mac, 6);
	put16(s->out + 12, type);
	return s->out + 14;
}

static const char *send_arp(struct stack *s, u16 op, const u8 *tha, const u8 *tpa, const u8 *dst)
{
	u8 *a = eth(s, dst, ETH_ARP);
	put16(a, 1), put16(a + 2, ETH_IP), a[4] = 6, a[5] = 4, put16(a + 6, op);
	memcpy(a + 8, s->dev->mac, 6), memcpy(a + 14, s->ip, 4);
	memcpy(a + 18, tha, 6), memcpy(a + 24, tpa, 4);
	return net_send(s->dev, s->out, 14 + 28);
}

/* IPv4 header at `ip` for `payload` bytes after it; returns the payload pointer. */
static u8 *ipv4(struct stack *s, u8 *ip, const u8 *dst, u8 proto, u32 payload)
{
	memset(ip, 0, 20);
	ip[0] = 0x45, put16(ip + 2, (u16)(20 + payload)), put16(ip + 4, ++s->ident);
	ip[6] = 0x40, ip[8] = 64, ip[9] = proto;
	memcpy(ip + 12, s->ip, 4), memcpy(ip + 16, dst, 4);
	put16(ip + 10, fold(sum16(ip, 20, 0)));
	return ip + 20;
}

static u16 l4_checksum(const u8 *src, const u8 *dst, u8 proto, const u8 *seg, u32 len)
{
	u32 sum = sum16(src, 4, 0);
	sum = sum16(dst, 4, sum);
	sum += proto + len;
	return fold(sum16(seg, len, sum));
}

/*
 * Answer ARP requests for our address and ICMP echo requests; returns true
 * when the frame in s->frame (len bytes) was one of those.
 */
static bool answer(struct stack *s, u32 len)
{
	u8 *f = s->frame;
	if (len >= 42 && be16(f + 12) == ETH_ARP && be16(f + 20) == 1 && !memcmp(f + 38, s->ip, 4)) {
		u8 sha[6], spa[4];
		memcpy(sha, f + 22, 6), memcpy(spa, f + 28, 4);
		const char *err = send_arp(s, 2, sha, spa, sha);
		if (err)
			printf("net0: FAIL arp reply: %s\n", err);
		return true;
	}
	if (len >= 42 && be16(f + 12) == ETH_IP && f[23] == 1 && !memcmp(f + 30, s->ip, 4) && f[34] == 8) {
		u32 ihl = (f[14] & 0xf) * 4, total = be16(f + 16);
		if (total > len - 14 || total < ihl + 8)
			return true;
		u32 icmp_len = total - ihl;
		u8 *icmp = ipv4(s, eth(s, f + 6, ETH_IP), f + 26, 1, icmp_len);
		memcpy(icmp, f + 14 + ihl, icmp_len);
		icmp[0] = 0, icmp[2] = icmp[3] = 0;
		put16(icmp + 2, fold(sum16(icmp, icmp_len, 0)));
		const char *err = net_send(s->dev, s->out, 14 + 20 + icmp_len);
		if (err)
			printf("net0: FAIL echo reply: %s\n", err);
		s->pings++;
		return true;
	}
	return false;
}

/* Wait for a frame `want` accepts (answering ARP/ICMP meanwhile); its length or 0 on timeout. */
static u32 wait_frame(struct stack *s, bool (*want)(struct stack *, u32, const void *), const void *arg, u32 ms)
{
	u32 len = 0;
	deadline_start(ms);
	while (!deadline_passed()) {
		len = net_poll(s->dev, s->frame, sizeof(s->frame));
		if (!len) {
			for (u32 i = 0; i < 64; i++)
				cpu_relax();
			continue;
		}
		if (want(s, len, arg))
			break;
		if (!answer(s, len))
			continue;
		len = 0;
		/* answer() sent a frame, and a send waits on its own deadline (there is one LAPIC
		 * deadline at a time): start ours again; each restart needs a frame from the host. */
		deadline_start(ms);
	}
	if (deadline_passed() && len && !want(s, len, arg))
		len = 0;
	deadline_stop();
	return len;
}

static bool is_arp_reply_from(struct stack *s, u32 len, const void *ip)
{
	const u8 *f = s->frame;
	return len >= 42 && be16(f + 12) == ETH_ARP && be16(f + 20) == 2 && !memcmp(f + 28, ip, 4);
}

static bool arp_resolve(struct stack *s, const u8 ip[4], u8 mac[6], const char *who)
{
	static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, zero[6] = {0};
	const char *err = send_arp(s, 1, zero, ip, bcast);
	if (err) {
		printf("%s: FAIL arp request: %s\n", who, err);
		return false;
	}
	if (!wait_frame(s, is_arp_reply_from, ip, s->dev->timeout_ms)) {
		printf("%s: FAIL arp: no reply\n", who);
		return false;
	}
	memcpy(mac, s->frame + 22, 6);
	printf("%s: arp reply %02x:%02x:%02x:%02x:%02x:%02x\n", who, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
	return true;
}

static bool setup(struct stack *s, struct net_dev *n, const char *who)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	u32 count = virtio_discover(devs, VIRTIO_MAX_DEVICES);
	struct virtio_dev *d = NULL;
	for (u32 i = 0; i < count && !d; i++)
		if (devs[i].device_id == VIRTIO_ID_NET)
			d = &devs[i];
	if (!d) {
		printf("%s: no devices\n", who);
		return false;
	}
	const char *err = net_init(n, d);
	if (err) {
		printf("%s: FAIL init: %s\n", who, err);
		return false;
	}
	memset(s, 0, sizeof(*s));
	s->dev = n;
	if (!ip_option("net.ip", "169.254.10.2", s->ip)) {
		printf("%s: FAIL bad net.ip\n", who);
		return false;
	}
	printf("%s: mac %02x:%02x:%02x:%02x:%02x:%02x\n", who, n->mac[0], n->mac[1], n->mac[2], n->mac[3], n->mac[4],
	       n->mac[5]);
	return true;
}

/* ------------------------------------------------------------------ test=net */

static struct stack stk;
static struct net_dev ndev;

static bool is_udp_quit(struct stack *s, u32 len, const void *arg)
{
	(void)arg;
	const u8 *f = s->frame;
	if (len < 42 || be16(f + 12) != ETH_IP || f[23] != 17 || memcmp(f + 30, s->ip, 4))
		return false;
	u32 ihl = (f[14] & 0xf) * 4;
	const u8 *udp = f + 14 + ihl;
	u32 ulen = be16(udp + 4);
	return ulen >= 12 && 14 + ihl + ulen <= len && !memcmp(udp + 8, "quit", 4);
}

static void test_net(void)
{
	struct stack *s = &stk;
	u8 host[4], host_mac[6];
	if (!setup(s, &ndev, "net0"))
		return;
	if (!ip_option("net.host", "169.254.10.1", host)) {
		println("net0: FAIL bad net.host");
		return;
	}
	if (!arp_resolve(s, host, host_mac, "net0"))
		return;
	static const char msg[] = "hello from the guest";
	u32 plen = sizeof(msg) - 1;
	u8 *udp = ipv4(s, eth(s, host_mac, ETH_IP), host, 17, 8 + plen);
	put16(udp, 5000), put16(udp + 2, (u16)cmdline_get_u64("net.port", 6000));
	put16(udp + 4, (u16)(8 + plen)), put16(udp + 6, 0);
	memcpy(udp + 8, msg, plen);
	const char *err = net_send(s->dev, s->out, 14 + 20 + 8 + plen);
	if (err) {
		printf("net0: FAIL udp: %s\n", err);
		return;
	}
	println("net0: udp sent");
	println("net0: serving");
	if (!wait_frame(s, is_udp_quit, NULL, (u32)cmdline_get_u64("net.serve_ms", 20000)))
		println("net0: FAIL no quit datagram");
	printf("net0: pings %u\n", s->pings);
	println("net: done");
}
GUEST_TEST("net", test_net);

/* ------------------------------------------------------------- test=net.mmds */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10

struct tcp {
	struct stack *s;
	u8 ip[4], mac[6];
	u16 port;
	u32 snd_nxt, rcv_nxt;
	bool fin;
	char data[1024]; /* the current response */
	u32 have;
};

static const char *tcp_send(struct tcp *t, u8 flags, const char *payload, u32 len)
{
	struct stack *s = t->s;
	u32 opt = flags & TCP_SYN ? 4 : 0;
	u8 *seg = ipv4(s, eth(s, t->mac, ETH_IP), t->ip, 6, 20 + opt + len);
	memset(seg, 0, 20 + opt);
	put16(seg, t->port), put16(seg + 2, 80), put32(seg + 4, t->snd_nxt), put32(seg + 8, t->rcv_nxt);
	seg[12] = (u8)((20 + opt) / 4 << 4), seg[13] = flags, put16(seg + 14, sizeof(t->data));
	if (opt)
		seg[20] = 2, seg[21] = 4, put16(seg + 22, 1460);
	memcpy(seg + 20 + opt, payload, len);
	put16(seg + 16, l4_checksum(s->ip, t->ip, 6, seg, 20 + opt + len));
	t->snd_nxt += len + (flags & (TCP_SYN | TCP_FIN) ? 1 : 0);
	return net_send(s->dev, s->out, 14 + 20 + 20 + opt + len);
}

static bool is_tcp_from(struct stack *s, u32 len, const void *arg)
{
	const struct tcp *t = arg;
	const u8 *f = s->frame;
	if (len < 54 || be16(f + 12) != ETH_IP || f[23] != 6 || memcmp(f + 26, t->ip, 4))
		return false;
	const u8 *seg = f + 14 + (f[14] & 0xf) * 4;
	return be16(seg) == 80 && be16(seg + 2) == t->port;
}

/* The next segment of our connection: its flags (data appended to t->data), or -1 on timeout. */
static int tcp_recv(struct tcp *t)
{
	struct stack *s = t->s;
	u32 len = wait_frame(s, is_tcp_from, t, s->dev->timeout_ms);
	if (!len)
		return -1;
	const u8 *f = s->frame;
	u32 ihl = (f[14] & 0xf) * 4, total = be16(f + 16);
	const u8 *seg = f + 14 + ihl;
	u32 hlen = (seg[12] >> 4) * 4;
	u32 dlen = total - ihl - hlen;
	u8 flags = seg[13];
	u32 seq = be32(seg + 4);
	if (flags & TCP_SYN)
		t->rcv_nxt = seq + 1;
	else if (seq == t->rcv_nxt) {
		u32 room = sizeof(t->data) - 1 - t->have;
		u32 take = dlen < room ? dlen : room;
		memcpy(t->data + t->have, seg + hlen, take);
		t->have += take;
		t->data[t->have] = 0;
		t->rcv_nxt += dlen;
		if (flags & TCP_FIN)
			t->rcv_nxt++, t->fin = true;
	}
	return flags;
}

/* Send a request and read one complete response into t->data; its status or -1. */
static int http(struct tcp *t, const char *request, const char **body)
{
	t->have = 0;
	const char *err = tcp_send(t, TCP_ACK | TCP_PSH, request, strlen(request));
	if (err) {
		printf("mmds: FAIL send: %s\n", err);
		return -1;
	}
	for (;;) {
		int flags = tcp_recv(t);
		if (flags < 0 || flags & TCP_RST)
			return -1;
		char *end = NULL;
		for (u32 i = 0; i + 3 < t->have && !end; i++)
			if (!memcmp(t->data + i, "\r\n\r\n", 4))
				end = t->data + i + 4;
		if (!end) {
			tcp_send(t, TCP_ACK, "", 0);
			continue;
		}
		u64 clen = 0;
		for (char *h = t->data; h < end; h++)
			if (!strncmp(h, "Content-Length: ", 16)) {
				char num[16];
				u32 k = 0;
				for (h += 16; *h >= '0' && *h <= '9' && k < 15; h++)
					num[k++] = *h;
				num[k] = 0;
				parse_u64(num, &clen);
				break;
			}
		tcp_send(t, TCP_ACK, "", 0);
		if ((u32)(t->data + t->have - end) >= clen) {
			end[clen] = 0;
			*body = end;
			u64 status = 0;
			char code[4] = {t->data[9], t->data[10], t->data[11], 0};
			parse_u64(code, &status);
			return (int)status;
		}
	}
}

static void one_line(char *text)
{
	for (char *c = text; *c; c++)
		if (*c == '\n')
			*c = ',';
}

static void test_net_mmds(void)
{
	struct stack *s = &stk;
	static struct tcp conn;
	struct tcp *t = &conn;
	if (!setup(s, &ndev, "mmds"))
		return;
	memset(t, 0, sizeof(*t));
	t->s = s, t->port = 41000, t->snd_nxt = 0x1000;
	if (!ip_option("mmds.ip", "169.254.169.254", t->ip) || !arp_resolve(s, t->ip, t->mac, "mmds"))
		return;
	const char *err = tcp_send(t, TCP_SYN, "", 0);
	int flags = err ? -1 : tcp_recv(t);
	if (flags != (TCP_SYN | TCP_ACK)) {
		printf("mmds: FAIL connect: %s\n", err ? err : "no SYN-ACK");
		return;
	}
	tcp_send(t, TCP_ACK, "", 0);
	println("mmds: connected");

	const char *body;
	int status = http(t, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n", &body);
	if (status != 200) {
		printf("mmds: FAIL token: status %d\n", status);
		return;
	}
	static char token[128], request[256];
	snprintf(token, sizeof(token), "%s", body);
	println("mmds: token ok");

	snprintf(request, sizeof(request),
		 "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\nX-metadata-token: %s\r\n\r\n", token);
	status = http(t, request, &body);
	printf("mmds: json %d %s\n", status, status > 0 ? body : "");

	snprintf(request, sizeof(request), "GET /latest/meta-data HTTP/1.1\r\nX-metadata-token: %s\r\n\r\n", token);
	status = http(t, request, &body);
	if (status > 0)
		one_line((char *)body);
	printf("mmds: imds %d %s\n", status, status > 0 ? body : "");

	status = http(t, "GET /latest/meta-data HTTP/1.1\r\n\r\n", &body);
	printf("mmds: no token %d\n", status);

	tcp_send(t, TCP_FIN | TCP_ACK, "", 0);
	while (!t->fin && (flags = tcp_recv(t)) >= 0 && !(flags & TCP_RST))
		;
	if (t->fin)
		tcp_send(t, TCP_ACK, "", 0);
	println(t->fin ? "mmds: closed" : "mmds: FAIL no FIN");
	println("mmds: done");
}
GUEST_TEST("net.mmds", test_net_mmds);
