/*
 * virtio-vsock driver (spec 5.10) on top of virtio.h: three queues (rx, tx,
 * event), stream connections with credit accounting, polled. Enough of a
 * vsock stack for test=vsock: an echo server on a guest port and a client
 * of a host port.
 */
#ifndef GUEST_VIRTIO_VSOCK_H
#define GUEST_VIRTIO_VSOCK_H

#include "types.h"
#include "virtio.h"

#define VSOCK_HOST_CID 2
#define VSOCK_TYPE_STREAM 1

#define VSOCK_OP_REQUEST 1
#define VSOCK_OP_RESPONSE 2
#define VSOCK_OP_RST 3
#define VSOCK_OP_SHUTDOWN 4
#define VSOCK_OP_RW 5
#define VSOCK_OP_CREDIT_UPDATE 6
#define VSOCK_OP_CREDIT_REQUEST 7

#define VSOCK_SHUTDOWN_RCV 1
#define VSOCK_SHUTDOWN_SEND 2

#define VSOCK_RX 0
#define VSOCK_TX 1
#define VSOCK_EVQ 2

#define VSOCK_PKT_DATA 4096 /* payload per rx buffer and per sent packet */
#define VSOCK_RX_BUFS 32
#define VSOCK_TX_BUFS 32
#define VSOCK_MAX_CONNS 4

struct virtio_vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} PACKED;

enum vconn_state { VC_FREE, VC_CONNECTING, VC_ESTABLISHED, VC_CLOSING, VC_REFUSED };

/* One stream. Received bytes wait in `buf` (buf_alloc bytes, our advertised credit) until consumed. */
struct vconn {
	enum vconn_state state;
	u32 local_port, peer_port;
	u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt; /* credit the peer gave us */
	u32 fwd_cnt, last_fwd_sent;		    /* bytes our side consumed */
	u8 *buf;
	u32 buf_size, head, len;
	u64 rx_total;	   /* payload bytes received */
	u32 full_events;   /* times buf was full right after data arrived */
	bool peer_shut_send; /* the peer sends no more */
	bool accepted;	   /* created by a REQUEST from the host */
};

struct vsock_dev {
	struct virtio_dev *vdev;
	u64 guest_cid;
	u32 buf_alloc;
	u32 listen_port; /* 0: not listening */
	struct vconn conns[VSOCK_MAX_CONNS];
	u8 *rx_bufs[VSOCK_RX_BUFS];
	u8 *tx_bufs[VSOCK_TX_BUFS];
	u32 tx_free[VSOCK_TX_BUFS];
	u32 n_tx_free;
	u32 refused; /* REQUESTs to a port nobody listens on (answered RST) */
	u64 events;  /* event-queue entries (TRANSPORT_RESET) */
	const char *error;
};

/* Negotiate, set up the three queues, post rx and event buffers, read guest_cid, DRIVER_OK. */
const char *vsock_init(struct vsock_dev *v, struct virtio_dev *d, u32 buf_alloc);
/* Handle every packet the device delivered and reclaim sent buffers; false once v->error is set. */
bool vsock_poll(struct vsock_dev *v);
/* Send one packet on `c` (payload `len` bytes from `data`); false when v->error is set. */
bool vsock_send(struct vsock_dev *v, struct vconn *c, u16 op, u32 flags, const void *data, u32 len);
/* Bytes the peer can take now. */
u32 vsock_peer_credit(const struct vconn *c);
/* Take up to `max` received bytes out of c->buf into `out` (consumed: fwd_cnt grows). */
u32 vsock_consume(struct vsock_dev *v, struct vconn *c, u8 *out, u32 max);

#endif
