/*
 * virtio 1.x over virtio-mmio version 2, split virtqueues: the part every
 * device driver shares. A driver (virtio_blk.c, later net and vsock) does,
 * as Linux does:
 *
 *   n = virtio_discover(devs, max);          // virtio_mmio.device= entries
 *   err = virtio_negotiate(d, wanted);       // reset, ACK, DRIVER, features, FEATURES_OK
 *   err = virtio_setup_queue(d, 0, 256);     // per queue, before DRIVER_OK
 *   ... read config space ...
 *   virtio_driver_ok(d, use_irq);            // DRIVER_OK; IOAPIC pin unmasked if use_irq
 *   head = virtq_add(vq, sg, n_out, n_in, token); virtq_kick(vq);
 *   token = virtq_wait_used(vq, &len, timeout_ms);
 *
 * Errors are returned as short strings (NULL = success) a test prints as
 * "FAIL <reason>". All of it runs with interrupts off; interrupts are only
 * taken inside virtq_wait_used.
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include "types.h"

/* virtio-mmio registers (spec 4.2.2). All are 32-bit; config space from 0x100. */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW 0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_MMIO_INT_VRING 0x1
#define VIRTIO_MMIO_INT_CONFIG 0x2

/* Device ids (spec 5). */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_VSOCK 19

/* Device status (spec 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64
#define VIRTIO_STATUS_FAILED 128

/* Device-independent feature bits (spec 6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BIT(b) (1ULL << (b))

/* Split virtqueue (spec 2.7). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

#define VIRTIO_MAX_DEVICES 19 /* GSIs 5..23 */
#define VIRTIO_MAX_QUEUES 3   /* vsock has rx, tx, event; net rx, tx */
#define VIRTQ_MAX_SG 8	      /* buffers in one chain (= one indirect table) */

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} PACKED;

struct virtq_used_elem {
	u32 id;
	u32 len;
} PACKED;

struct virtio_dev;

struct virtq {
	struct virtio_dev *dev;
	u16 index;
	u16 num; /* 0: not set up */
	struct virtq_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[num], used_event */
	volatile u16 *used;  /* flags, idx, then num struct virtq_used_elem, then avail_event */
	struct virtq_desc *indirect; /* num tables of VIRTQ_MAX_SG, when INDIRECT_DESC is used */
	void **tokens;		     /* per head: what virtq_add was given, NULL when free */
	u16 free_head;
	u16 num_free;
	u16 avail_idx; /* our copy of avail->idx */
	u16 last_used; /* next used->idx entry to consume */
	u16 unkicked;  /* chains added since the last virtq_kick */
	const char *error; /* set when the device broke the ring; the queue is then dead */
	u64 irqs_at_kick; /* dev->vring_interrupts when virtq_kick ran */
	u64 kicks;	  /* QueueNotify writes */
	u64 kicks_skipped;
};

struct virtio_dev {
	uintptr_t base;
	u32 gsi;
	u32 device_id;
	u32 version;
	u64 device_features; /* what the device offers */
	u64 features;	     /* negotiated */
	bool use_irq;
	volatile u64 interrupts;      /* handler runs */
	volatile u64 vring_interrupts; /* ... that found InterruptStatus bit 0 (used buffer) set */
	volatile u32 isr;	      /* InterruptStatus bits seen since last cleared */
	struct virtq vqs[VIRTIO_MAX_QUEUES];
};

/* One buffer of a chain: device-readable (out) buffers come first, then writable (in). */
struct virtio_sg {
	void *addr;
	u32 len;
};

/* --- transport ------------------------------------------------------------------------ */

static inline bool virtio_has(const struct virtio_dev *d, u32 bit) { return d->features & VIRTIO_BIT(bit); }
static inline bool virtio_offers(const struct virtio_dev *d, u32 bit) { return d->device_features & VIRTIO_BIT(bit); }

u32 virtio_read32(const struct virtio_dev *d, u32 reg);
void virtio_write32(const struct virtio_dev *d, u32 reg, u32 v);
u8 virtio_status(const struct virtio_dev *d);

/*
 * Parse every virtio_mmio.device=<size>@<base>:<irq>[:<id>] on the command line
 * (in order) and probe it: magic, version 2, a non-zero device id. Devices
 * that fail are reported on the console ("virtio: ...") and skipped.
 */
u32 virtio_discover(struct virtio_dev *devs, u32 max);

/* Reset, ACKNOWLEDGE, DRIVER, features = offered & wanted (VERSION_1 required), FEATURES_OK. */
const char *virtio_negotiate(struct virtio_dev *d, u64 wanted);
/* Set up queue `index` with min(QueueNumMax, max_num) entries (a power of two). */
const char *virtio_setup_queue(struct virtio_dev *d, u16 index, u16 max_num);
/* DRIVER_OK. With use_irq, the device's GSI is routed to virtio_irq and rings ask for interrupts. */
const char *virtio_driver_ok(struct virtio_dev *d, bool use_irq);
/* Status FAILED (after an error during set-up), as Linux does. */
void virtio_fail(struct virtio_dev *d);
/* Write 0 to Status and mask the interrupt. */
void virtio_reset(struct virtio_dev *d);

/* Config space (device-specific, from 0x100), read under ConfigGeneration as Linux does. */
u8 virtio_config_read8(const struct virtio_dev *d, u32 off);
u32 virtio_config_read32(const struct virtio_dev *d, u32 off);
u64 virtio_config_read64(const struct virtio_dev *d, u32 off);

/* --- virtqueues ------------------------------------------------------------------------- */

/*
 * Make a chain of n_out device-readable then n_in device-writable buffers
 * available (not yet published to the device: see virtq_kick). Uses one
 * indirect descriptor when VIRTIO_F_INDIRECT_DESC was negotiated and the
 * chain has more than one buffer. Returns the head, or -1 when the ring is
 * full. `token` (non-NULL) comes back from virtq_get_used.
 */
int virtq_add(struct virtq *vq, const struct virtio_sg *sg, u32 n_out, u32 n_in, void *token);
/* Publish added chains and notify the device unless it said it need not be (EVENT_IDX or NO_NOTIFY). */
void virtq_kick(struct virtq *vq);
/* The token of the next used chain (and the length the device wrote), or NULL. */
void *virtq_get_used(struct virtq *vq, u32 *len);
bool virtq_has_used(const struct virtq *vq);
/*
 * Wait for the next used chain. Without interrupts: poll the used ring. With
 * them (as Linux, which only looks at the ring from its interrupt handler):
 * sleep until a used-buffer interrupt has arrived since the last virtq_kick,
 * then take the entry; an entry that shows up without one is an error
 * ("... but no used-buffer interrupt arrived"). NULL on timeout or error
 * (vq->error says which, NULL for a timeout).
 */
void *virtq_wait_used(struct virtq *vq, u32 *len, u32 timeout_ms);
/* One "virtio: <base> queue <i> <why>: ..." line with both sides' ring indexes (after a timeout). */
void virtq_dump(struct virtq *vq, const char *why);

#endif
