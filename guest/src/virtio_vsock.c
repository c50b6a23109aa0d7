/* virtio-vsock driver (see virtio_vsock.h) and test=vsock. */
#include "virtio_vsock.h"

#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0

#include "alloc.h"
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "tests.h"

#define HDR_SIZE ((u32)sizeof(struct virtio_vsock_hdr))
#define BUF_SIZE (HDR_SIZE + VSOCK_PKT_DATA)
#define EVENT_BUFS 4
#define TX_WAIT_SPINS 2000000

static u32 min_u32(u32 a, u32 b) { return a < b ? a : b; }

/* --- set-up ---------------------------------------------------------------------------------------- */

static void post_rx(struct vsock_dev *v, u8 *buf)
{
	struct virtio_sg sg = {buf, BUF_SIZE};
	virtq_add(&v->vdev->vqs[VSOCK_RX], &sg, 0, 1, buf);
}

static void post_event(struct vsock_dev *v, u8 *buf)
{
	struct virtio_sg sg = {buf, 4};
	virtq_add(&v->vdev->vqs[VSOCK_EVQ], &sg, 0, 1, buf);
}

const char *vsock_init(struct vsock_dev *v, struct virtio_dev *d, u32 buf_alloc)
{
	memset(v, 0, sizeof(*v));
	v->vdev = d;
	v->buf_alloc = buf_alloc;
	if (d->device_id != VIRTIO_ID_VSOCK)
		return "not a vsock device";
	const char *err = virtio_negotiate(d, 0);
	for (u16 q = 0; !err && q < 3; q++)
		err = virtio_setup_queue(d, q, q == VSOCK_EVQ ? EVENT_BUFS : VSOCK_RX_BUFS);
	if (err) {
		virtio_fail(d);
		return err;
	}
	v->guest_cid = virtio_config_read64(d, 0);
	for (u32 i = 0; i < VSOCK_RX_BUFS; i++) {
		v->rx_bufs[i] = alloc(BUF_SIZE, 64);
		post_rx(v, v->rx_bufs[i]);
	}
	for (u32 i = 0; i < VSOCK_TX_BUFS; i++) {
		v->tx_bufs[i] = alloc(BUF_SIZE, 64);
		v->tx_free[v->n_tx_free++] = i;
	}
	for (u32 i = 0; i < EVENT_BUFS; i++)
		post_event(v, alloc(4, 4));
	err = virtio_driver_ok(d, false);
	if (err)
		return err;
	virtq_kick(&d->vqs[VSOCK_RX]);
	virtq_kick(&d->vqs[VSOCK_EVQ]);
	return NULL;
}

/* --- sending ---------------------------------------------------------------------------------------- */

static void reclaim_tx(struct vsock_dev *v)
{
	u8 *buf;
	while ((buf = virtq_get_used(&v->vdev->vqs[VSOCK_TX], NULL))) {
		for (u32 i = 0; i < VSOCK_TX_BUFS; i++)
			if (v->tx_bufs[i] == buf)
				v->tx_free[v->n_tx_free++] = i;
	}
}

u32 vsock_peer_credit(const struct vconn *c)
{
	u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

static bool send_raw(struct vsock_dev *v, u32 src_port, u32 dst_port, u16 op, u32 flags, u32 fwd_cnt,
		     const void *data, u32 len)
{
	struct virtq *vq = &v->vdev->vqs[VSOCK_TX];

	for (u32 spins = 0; !v->n_tx_free; spins++) {
		reclaim_tx(v);
		if (vq->error || spins > TX_WAIT_SPINS) {
			v->error = vq->error ? vq->error : "tx ring stuck (no used buffers)";
			return false;
		}
		cpu_relax();
	}
	u8 *buf = v->tx_bufs[v->tx_free[--v->n_tx_free]];
	struct virtio_vsock_hdr *h = (struct virtio_vsock_hdr *)buf;
	h->src_cid = v->guest_cid;
	h->dst_cid = VSOCK_HOST_CID;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = VSOCK_TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = v->buf_alloc;
	h->fwd_cnt = fwd_cnt;
	if (len)
		memcpy(buf + HDR_SIZE, data, len);
	struct virtio_sg sg = {buf, HDR_SIZE + len};
	if (virtq_add(vq, &sg, 1, 0, buf) < 0) {
		v->error = "tx ring full";
		return false;
	}
	virtq_kick(vq);
	return true;
}

bool vsock_send(struct vsock_dev *v, struct vconn *c, u16 op, u32 flags, const void *data, u32 len)
{
	if (!send_raw(v, c->local_port, c->peer_port, op, flags, c->fwd_cnt, data, len))
		return false;
	c->last_fwd_sent = c->fwd_cnt;
	c->tx_cnt += len;
	return true;
}

u32 vsock_consume(struct vsock_dev *v, struct vconn *c, u8 *out, u32 max)
{
	u32 n = min_u32(c->len, max);
	u32 first = min_u32(n, c->buf_size - c->head);

	memcpy(out, c->buf + c->head, first);
	memcpy(out + first, c->buf, n - first);
	c->head = (c->head + n) % c->buf_size;
	c->len -= n;
	c->fwd_cnt += n;
	return n;
}

/* --- receiving -------------------------------------------------------------------------------------- */

static struct vconn *find_conn(struct vsock_dev *v, u32 local, u32 peer)
{
	for (u32 i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vconn *c = &v->conns[i];
		if (c->state != VC_FREE && c->local_port == local && c->peer_port == peer)
			return c;
	}
	return NULL;
}

static struct vconn *new_conn(struct vsock_dev *v, u32 local, u32 peer)
{
	for (u32 i = 0; i < VSOCK_MAX_CONNS; i++) {
		struct vconn *c = &v->conns[i];
		if (c->state == VC_FREE) {
			u8 *buf = c->buf;
			memset(c, 0, sizeof(*c));
			c->buf = buf ? buf : alloc(v->buf_alloc, 64);
			c->buf_size = v->buf_alloc;
			c->local_port = local;
			c->peer_port = peer;
			return c;
		}
	}
	return NULL;
}

static void on_request(struct vsock_dev *v, const struct virtio_vsock_hdr *h)
{
	struct vconn *c = NULL;

	if (v->listen_port && h->dst_port == v->listen_port && !find_conn(v, h->dst_port, h->src_port))
		c = new_conn(v, h->dst_port, h->src_port);
	if (!c) {
		v->refused++;
		printf("vsock: refused port %u\n", h->dst_port);
		send_raw(v, h->dst_port, h->src_port, VSOCK_OP_RST, 0, 0, NULL, 0);
		return;
	}
	c->state = VC_ESTABLISHED;
	c->accepted = true;
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	printf("vsock: accepted port %u from host port %u\n", h->dst_port, h->src_port);
	vsock_send(v, c, VSOCK_OP_RESPONSE, 0, NULL, 0);
}

static void on_packet(struct vsock_dev *v, const struct virtio_vsock_hdr *h, const u8 *data, u32 used)
{
	if (h->dst_cid != v->guest_cid || h->src_cid != VSOCK_HOST_CID || h->type != VSOCK_TYPE_STREAM) {
		v->error = "packet with a wrong CID or type";
		return;
	}
	if (HDR_SIZE + h->len > used) {
		v->error = "packet longer than the used length";
		return;
	}
	struct vconn *c = find_conn(v, h->dst_port, h->src_port);
	if (!c) {
		if (h->op == VSOCK_OP_REQUEST)
			on_request(v, h);
		else if (h->op != VSOCK_OP_RST)
			send_raw(v, h->dst_port, h->src_port, VSOCK_OP_RST, 0, 0, NULL, 0);
		return;
	}
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case VSOCK_OP_RESPONSE:
		if (c->state == VC_CONNECTING)
			c->state = VC_ESTABLISHED;
		break;
	case VSOCK_OP_RST:
		c->state = c->state == VC_CONNECTING ? VC_REFUSED : VC_FREE;
		if (c->state == VC_FREE && c->accepted)
			printf("vsock: echo done bytes %llu full %u\n", c->rx_total, c->full_events);
		break;
	case VSOCK_OP_SHUTDOWN:
		if (h->flags & VSOCK_SHUTDOWN_SEND)
			c->peer_shut_send = true;
		if ((h->flags & (VSOCK_SHUTDOWN_SEND | VSOCK_SHUTDOWN_RCV)) == (VSOCK_SHUTDOWN_SEND | VSOCK_SHUTDOWN_RCV) &&
		    !c->len && !c->accepted) {
			vsock_send(v, c, VSOCK_OP_RST, 0, NULL, 0); /* as Linux: the peer closed, confirm */
			c->state = VC_FREE;
		}
		break;
	case VSOCK_OP_RW:
		if (h->len > c->buf_size - c->len) {
			v->error = "the device sent more than our credit (buf_alloc)";
			return;
		}
		for (u32 off = 0; off < h->len;) {
			u32 tail = (c->head + c->len) % c->buf_size;
			u32 part = min_u32(h->len - off, c->buf_size - tail);
			memcpy(c->buf + tail, data + off, part);
			c->len += part;
			off += part;
		}
		c->rx_total += h->len;
		if (c->len == c->buf_size)
			c->full_events++;
		break;
	case VSOCK_OP_CREDIT_REQUEST:
		vsock_send(v, c, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
		break;
	default: /* CREDIT_UPDATE: the header said it all */
		break;
	}
}

bool vsock_poll(struct vsock_dev *v)
{
	struct virtq *rx = &v->vdev->vqs[VSOCK_RX], *evq = &v->vdev->vqs[VSOCK_EVQ];
	u8 *buf;
	u32 len, reposted = 0;

	reclaim_tx(v);
	while (!v->error && (buf = virtq_get_used(rx, &len))) {
		if (len < HDR_SIZE)
			v->error = "rx buffer used with less than a header";
		else
			on_packet(v, (const struct virtio_vsock_hdr *)buf, buf + HDR_SIZE, len);
		post_rx(v, buf);
		reposted++;
	}
	if (reposted)
		virtq_kick(rx);
	while ((buf = virtq_get_used(evq, &len))) {
		u32 event = *(volatile u32 *)buf;
		v->events++;
		printf("vsock: event %u\n", event);
		if (event == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
			/* As Linux: the device forgot every connection, so do we. */
			for (u32 i = 0; i < VSOCK_MAX_CONNS; i++)
				v->conns[i].state = VC_FREE;
		}
		post_event(v, buf);
		virtq_kick(evq);
	}
	if (!v->error && (rx->error || v->vdev->vqs[VSOCK_TX].error))
		v->error = rx->error ? rx->error : v->vdev->vqs[VSOCK_TX].error;
	return !v->error;
}

/* ------------------------------------------------------------------------------ test=vsock */

/* Stream byte at offset o is o % 251: a window of this table is any run of the stream. */
static u8 ramp251[251 + VSOCK_PKT_DATA];

static const u8 *pattern_at(u64 offset)
{
	if (!ramp251[1])
		for (u32 j = 0; j < sizeof(ramp251); j++)
			ramp251[j] = (u8)(j % 251);
	return ramp251 + offset % 251;
}

static bool failed(struct vsock_dev *v, const char *what)
{
	printf("vsock: FAIL %s: %s\n", what, v->error ? v->error : "timeout");
	return false;
}

/* Echo what each accepted connection sends, `chunk` bytes at a time (a slow reader), until
 * `count` connections have been closed by their host. */
static bool echo_server(struct vsock_dev *v, u32 count, u32 chunk, u8 *tmp)
{
	u32 done = 0;
	bool live[VSOCK_MAX_CONNS] = {0};

	while (done < count) {
		if (!vsock_poll(v) || deadline_passed())
			return failed(v, "echo");
		for (u32 i = 0; i < VSOCK_MAX_CONNS; i++) {
			struct vconn *c = &v->conns[i];
			if (c->state == VC_FREE) {
				if (live[i])
					done++;
				live[i] = false;
				continue;
			}
			if (!c->accepted)
				continue;
			live[i] = true;
			u32 n = min_u32(min_u32(c->len, chunk), vsock_peer_credit(c));
			if (n && c->state == VC_ESTABLISHED) {
				vsock_consume(v, c, tmp, n);
				if (!vsock_send(v, c, VSOCK_OP_RW, 0, tmp, n))
					return failed(v, "echo send");
			}
			if (c->peer_shut_send && !c->len && c->state == VC_ESTABLISHED) {
				vsock_send(v, c, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_SEND | VSOCK_SHUTDOWN_RCV, NULL, 0);
				c->state = VC_CLOSING; /* the device confirms with RST */
			}
		}
	}
	return true;
}

static struct vconn *connect_to(struct vsock_dev *v, u32 port, u32 local)
{
	struct vconn *c = new_conn(v, local, port);

	if (!c) {
		v->error = "no free connection slot";
		return NULL;
	}
	c->state = VC_CONNECTING;
	if (!vsock_send(v, c, VSOCK_OP_REQUEST, 0, NULL, 0))
		return NULL;
	while (c->state == VC_CONNECTING) {
		if (!vsock_poll(v) || deadline_passed())
			return NULL;
	}
	return c;
}

/* Connect to host port `port`, send `send_bytes` of the pattern (waiting for credit as the host
 * reads), half-close, then read and check `reply_bytes` of the pattern until the connection ends. */
static bool client(struct vsock_dev *v, u32 port, u64 send_bytes, u64 reply_bytes, u8 *tmp)
{
	struct vconn *c = connect_to(v, port, 2000);
	if (!c)
		return failed(v, "client connect");
	if (c->state != VC_ESTABLISHED) {
		printf("vsock: FAIL client connect: refused\n");
		c->state = VC_FREE;
		return false;
	}
	u64 sent = 0, got = 0;
	bool said_waiting = false;
	while (sent < send_bytes) {
		u32 n = (u32)min_u32((u32)min_u32(VSOCK_PKT_DATA, vsock_peer_credit(c)),
				     send_bytes - sent > VSOCK_PKT_DATA ? VSOCK_PKT_DATA : (u32)(send_bytes - sent));
		if (!n) {
			if (!said_waiting)
				println("vsock: client waiting for credit");
			said_waiting = true;
			if (!vsock_poll(v) || deadline_passed() || c->state != VC_ESTABLISHED)
				return failed(v, "client send");
			continue;
		}
		if (!vsock_send(v, c, VSOCK_OP_RW, 0, pattern_at(sent), n))
			return failed(v, "client send");
		sent += n;
	}
	vsock_send(v, c, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_SEND, NULL, 0);
	for (bool open = true; open;) {
		if (!vsock_poll(v) || deadline_passed())
			return failed(v, "client receive");
		open = c->state != VC_FREE; /* data that came with the RST is still consumed below */
		u32 n;
		while ((n = vsock_consume(v, c, tmp, VSOCK_PKT_DATA))) {
			if (memcmp(tmp, pattern_at(got), n)) {
				printf("vsock: FAIL client receive: MISMATCH at byte %llu\n", got);
				return false;
			}
			got += n;
		}
		if (c->fwd_cnt - c->last_fwd_sent >= c->buf_size / 2 && c->state == VC_ESTABLISHED)
			vsock_send(v, c, VSOCK_OP_CREDIT_UPDATE, 0, NULL, 0);
	}
	if (got != reply_bytes) {
		printf("vsock: FAIL client receive: %llu bytes, expected %llu\n", got, reply_bytes);
		return false;
	}
	printf("vsock: client ok sent %llu received %llu\n", sent, got);
	return true;
}

static void test_vsock(void)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	static struct vsock_dev v;
	u32 ndev = virtio_discover(devs, VIRTIO_MAX_DEVICES);
	struct virtio_dev *d = NULL;

	for (u32 i = 0; i < ndev && !d; i++)
		if (devs[i].device_id == VIRTIO_ID_VSOCK)
			d = &devs[i];
	if (!d) {
		println("vsock: no device");
		return;
	}
	const char *err = vsock_init(&v, d, (u32)cmdline_get_u64("vsock.buf_alloc", 4096));
	if (err) {
		printf("vsock: FAIL init: %s\n", err);
		return;
	}
	printf("vsock: cid %llu\n", v.guest_cid);
	u8 *tmp = alloc(VSOCK_PKT_DATA, 64);
	u32 timeout_ms = (u32)cmdline_get_u64("vsock.timeout_ms", 60000);

	v.listen_port = (u32)cmdline_get_u64("vsock.port", 52);
	u32 echo_conns = (u32)cmdline_get_u64("vsock.echo_conns", 1);
	if (echo_conns) {
		printf("vsock: listening on port %u\n", v.listen_port);
		deadline_start(timeout_ms);
		bool ok = echo_server(&v, echo_conns, (u32)cmdline_get_u64("vsock.chunk", 1024), tmp);
		deadline_stop();
		if (!ok)
			return;
	}
	v.listen_port = 0;

	u32 host_port = (u32)cmdline_get_u64("vsock.host_port", 53);
	if (host_port) {
		u32 refused_port = (u32)cmdline_get_u64("vsock.refused_port", 54);
		deadline_start(timeout_ms);
		struct vconn *c = connect_to(&v, refused_port, 1999);
		if (!c) {
			failed(&v, "connect to a port nobody listens on");
			deadline_stop();
			return;
		}
		printf(c->state == VC_REFUSED ? "vsock: connect %u refused\n" : "vsock: FAIL connect %u accepted\n",
		       refused_port);
		c->state = VC_FREE;
		bool ok = client(&v, host_port, cmdline_get_u64("vsock.send_bytes", 1 << 20),
				 cmdline_get_u64("vsock.reply_bytes", 16384), tmp);
		deadline_stop();
		if (!ok)
			return;
	}
	if (cmdline_get_u64("vsock.wait_event", 0)) {
		println("vsock: waiting for an event");
		deadline_start(timeout_ms);
		while (!v.events && vsock_poll(&v) && !deadline_passed())
			;
		deadline_stop();
		if (!v.events) {
			failed(&v, "event");
			return;
		}
	}
	println("vsock: done");
}
GUEST_TEST("vsock", test_vsock);
