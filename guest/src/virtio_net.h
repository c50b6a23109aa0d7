/*
 * virtio-net driver for the test guest (polled, one rx/tx queue pair, no
 * offloads, no mergeable buffers) and the tests test=net and test=net.mmds.
 */
#ifndef GUEST_VIRTIO_NET_H
#define GUEST_VIRTIO_NET_H

#include "types.h"
#include "virtio.h"

#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_HDR_SIZE 12 /* virtio 1.0: num_buffers included */
#define NET_RX_BUFFERS 8
#define NET_BUF_SIZE 2048

struct net_dev {
	struct virtio_dev *vdev;
	u8 mac[6];
	u8 *rx_bufs[NET_RX_BUFFERS];
	u8 *tx_buf;
	u32 timeout_ms;
};

const char *net_init(struct net_dev *n, struct virtio_dev *d);
/* Send one Ethernet frame (the header is added); NULL or an error. */
const char *net_send(struct net_dev *n, const void *frame, u32 len);
/* The next received frame (header stripped) copied into buf, its length, or 0 when none is there. */
u32 net_poll(struct net_dev *n, u8 *buf, u32 size);

#endif
