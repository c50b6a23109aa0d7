/* virtio-blk driver (spec 5.2) on top of virtio.h: one request queue, synchronous requests. */
#ifndef GUEST_VIRTIO_BLK_H
#define GUEST_VIRTIO_BLK_H

#include "types.h"
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR_SIZE 512

/* Config space offsets. */
#define VIRTIO_BLK_CFG_CAPACITY 0
#define VIRTIO_BLK_CFG_SEG_MAX 12
#define VIRTIO_BLK_CFG_BLK_SIZE 20

struct virtio_blk_outhdr {
	u32 type;
	u32 reserved;
	u64 sector;
} PACKED;

struct blk_dev {
	struct virtio_dev *vdev;
	u64 capacity; /* 512-byte sectors */
	u32 seg_max;  /* 0 when not offered */
	bool read_only;
	bool can_flush;
	u32 timeout_ms;
	/* One request at a time: header and status byte live here (device-visible memory). */
	struct virtio_blk_outhdr *hdr;
	volatile u8 *status;
};

/* Features the driver asks for on top of VERSION_1 (event_idx / indirect are per test option). */
#define BLK_DRIVER_FEATURES                                                                                  \
	(VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_RO) | VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE) |  \
	 VIRTIO_BIT(VIRTIO_BLK_F_FLUSH))

/* Negotiate (BLK_DRIVER_FEATURES | extra), set up the queue, read the config, DRIVER_OK. */
const char *blk_init(struct blk_dev *b, struct virtio_dev *d, u64 extra_features, bool use_irq, u32 timeout_ms);

/*
 * One request, waited for: type with `len` bytes of data at `buf` (device-
 * readable for OUT, writable for IN / GET_ID, none for FLUSH), split into
 * `segments` descriptors. Returns the status byte (VIRTIO_BLK_S_*) or -1 with
 * *err set (timeout, ring full, broken ring).
 */
int blk_request(struct blk_dev *b, u32 type, u64 sector, void *buf, u32 len, u32 segments, const char **err);

#endif
