/* virtio-mmio v2 transport and split virtqueues (see virtio.h). */
#include "virtio.h"

#include "alloc.h"
#include "io.h"
#include "irq.h"
#include "lib.h"

/* --- registers -------------------------------------------------------------------------- */

u32 virtio_read32(const struct virtio_dev *d, u32 reg) { return mmio_read32(d->base + reg); }
void virtio_write32(const struct virtio_dev *d, u32 reg, u32 v) { mmio_write32(d->base + reg, v); }
u8 virtio_status(const struct virtio_dev *d) { return (u8)virtio_read32(d, VIRTIO_MMIO_STATUS); }

static void add_status(struct virtio_dev *d, u8 bits)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

/* Full fence for a store followed by a load (publish avail idx, then read avail_event). */
static inline void virtio_mb(void) { mb(); }

/* --- discovery ------------------------------------------------------------------------------ */

/* Linux's memparse: a number (decimal or 0x) with an optional K/M/G suffix. */
static const char *parse_num(const char *s, u64 *out, bool suffix)
{
	char buf[24];
	size_t n = 0;

	while (*s && *s != '@' && *s != ':' && n < sizeof(buf) - 1)
		buf[n++] = *s++;
	buf[n] = '\0';
	u64 mult = 1;
	if (suffix && n) {
		char c = buf[n - 1];
		if (c == 'K' || c == 'k')
			mult = 1ULL << 10;
		else if (c == 'M' || c == 'm')
			mult = 1ULL << 20;
		else if (c == 'G' || c == 'g')
			mult = 1ULL << 30;
		if (mult != 1)
			buf[n - 1] = '\0';
	}
	if (!parse_u64(buf, out))
		return NULL;
	*out *= mult;
	return s;
}

/* "<size>@<base>:<irq>[:<id>]" */
static bool parse_device_arg(const char *arg, u64 *size, u64 *base, u64 *irq)
{
	const char *p = parse_num(arg, size, true);
	if (!p || *p != '@')
		return false;
	p = parse_num(p + 1, base, false);
	if (!p || *p != ':')
		return false;
	p = parse_num(p + 1, irq, false);
	return p && (*p == '\0' || *p == ':');
}

u32 virtio_discover(struct virtio_dev *devs, u32 max)
{
	u32 n = 0;
	const char *arg;

	for (unsigned i = 0; n < max && (arg = cmdline_get_nth("virtio_mmio.device", i)); i++) {
		u64 size, base, irq;
		if (!parse_device_arg(arg, &size, &base, &irq) || size < 0x200 || irq > IRQ_MAX_GSI) {
			printf("virtio: cannot parse virtio_mmio.device=%s\n", arg);
			continue;
		}
		if (base < 0xd0000000ULL || base + size > 0x100000000ULL) {
			printf("virtio: device at 0x%llx is outside the uncached MMIO gap\n", base);
			continue;
		}
		struct virtio_dev *d = &devs[n];
		memset(d, 0, sizeof(*d));
		d->base = (uintptr_t)base;
		d->gsi = (u32)irq;
		u32 magic = virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE);
		if (magic != VIRTIO_MMIO_MAGIC) {
			printf("virtio: device at 0x%llx: bad magic 0x%08x\n", base, magic);
			continue;
		}
		d->version = virtio_read32(d, VIRTIO_MMIO_VERSION);
		if (d->version != 2) {
			printf("virtio: device at 0x%llx: version %u, only 2 (modern) is supported\n", base, d->version);
			continue;
		}
		d->device_id = virtio_read32(d, VIRTIO_MMIO_DEVICE_ID);
		if (d->device_id == 0) /* a placeholder: no device behind the window (Linux: -ENODEV) */
			continue;
		n++;
	}
	return n;
}

/* --- initialization (spec 3.1.1) ------------------------------------------------------------ */

void virtio_reset(struct virtio_dev *d)
{
	if (d->use_irq)
		irq_disable(d->gsi);
	d->use_irq = false;
	virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
}

void virtio_fail(struct virtio_dev *d) { add_status(d, VIRTIO_STATUS_FAILED); }

const char *virtio_negotiate(struct virtio_dev *d, u64 wanted)
{
	virtio_reset(d);
	if (virtio_status(d) != 0)
		return "status not 0 after reset";
	for (u32 q = 0; q < VIRTIO_MAX_QUEUES; q++)
		d->vqs[q].num = 0;
	add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	add_status(d, VIRTIO_STATUS_DRIVER);

	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u64 offered = (u64)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered |= virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->device_features = offered;
	if (!(offered & VIRTIO_BIT(VIRTIO_F_VERSION_1))) {
		virtio_fail(d);
		return "device does not offer VIRTIO_F_VERSION_1";
	}

	d->features = offered & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1));
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);

	add_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		virtio_fail(d);
		return "device refused the features (FEATURES_OK not set)";
	}
	return NULL;
}

const char *virtio_setup_queue(struct virtio_dev *d, u16 index, u16 max_num)
{
	if (index >= VIRTIO_MAX_QUEUES)
		return "too many queues";
	struct virtq *vq = &d->vqs[index];

	virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY))
		return "queue already set up (QueueReady is 1)";
	u32 max = virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return "queue not available (QueueNumMax is 0)";
	u32 num = 1;
	while (num * 2 <= max && num * 2 <= max_num)
		num *= 2;

	memset(vq, 0, sizeof(*vq));
	vq->dev = d;
	vq->index = index;
	vq->num = (u16)num;
	/* Descriptor table 16-aligned, available ring 2-aligned, used ring 4-aligned (spec 2.7). */
	vq->desc = alloc(16 * num, PAGE_SIZE);
	vq->avail = alloc(6 + 2 * num, 2);
	vq->used = alloc(6 + 8 * num, PAGE_SIZE);
	vq->tokens = alloc(sizeof(void *) * num, 8);
	if (virtio_has(d, VIRTIO_F_INDIRECT_DESC))
		vq->indirect = alloc(sizeof(struct virtq_desc) * VIRTQ_MAX_SG * num, 16);
	for (u32 i = 0; i < num; i++)
		vq->desc[i].next = (u16)(i + 1);
	vq->free_head = 0;
	vq->num_free = (u16)num;

	u64 desc = virt_to_phys(vq->desc), avail = virt_to_phys(vq->avail), used = virt_to_phys(vq->used);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, num);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (u32)avail);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (u32)(avail >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_USED_LOW, (u32)used);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (u32)(used >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	return NULL;
}

/* The device's interrupt: read and acknowledge InterruptStatus (Linux's vm_interrupt). */
static void virtio_irq(u32 gsi, void *arg)
{
	struct virtio_dev *d = arg;
	u32 isr = virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS);

	if (isr)
		virtio_write32(d, VIRTIO_MMIO_INTERRUPT_ACK, isr);
	d->isr |= isr;
	d->interrupts++;
	if (isr & VIRTIO_MMIO_INT_VRING)
		d->vring_interrupts++;
}

const char *virtio_driver_ok(struct virtio_dev *d, bool use_irq)
{
	d->use_irq = use_irq;
	for (u32 q = 0; q < VIRTIO_MAX_QUEUES; q++) {
		struct virtq *vq = &d->vqs[q];
		if (!vq->num)
			continue;
		/* Without interrupts, tell the device not to bother (a hint; the pin stays masked anyway). */
		vq->avail[0] = use_irq || virtio_has(d, VIRTIO_F_EVENT_IDX) ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
	}
	if (use_irq)
		irq_enable(d->gsi, virtio_irq, d);
	add_status(d, VIRTIO_STATUS_DRIVER_OK);
	u8 status = virtio_status(d);
	if (status & VIRTIO_STATUS_NEEDS_RESET)
		return "device needs a reset after DRIVER_OK";
	if (!(status & VIRTIO_STATUS_DRIVER_OK))
		return "device did not accept DRIVER_OK";
	return NULL;
}

/* --- config space ------------------------------------------------------------------------------ */

u8 virtio_config_read8(const struct virtio_dev *d, u32 off) { return mmio_read8(d->base + VIRTIO_MMIO_CONFIG + off); }

u32 virtio_config_read32(const struct virtio_dev *d, u32 off)
{
	return virtio_read32(d, VIRTIO_MMIO_CONFIG + off);
}

u64 virtio_config_read64(const struct virtio_dev *d, u32 off)
{
	u32 gen, lo, hi;

	/* Two 32-bit halves, retried until ConfigGeneration is stable (virtio_cread64). */
	do {
		gen = virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION);
		lo = virtio_read32(d, VIRTIO_MMIO_CONFIG + off);
		hi = virtio_read32(d, VIRTIO_MMIO_CONFIG + off + 4);
	} while (gen != virtio_read32(d, VIRTIO_MMIO_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

/* --- split virtqueues (spec 2.7) ---------------------------------------------------------------- */

#define AVAIL_FLAGS(vq) ((vq)->avail[0])
#define AVAIL_IDX(vq) ((vq)->avail[1])
#define AVAIL_RING(vq, i) ((vq)->avail[2 + (i)])
#define USED_EVENT(vq) ((vq)->avail[2 + (vq)->num])
#define USED_FLAGS(vq) ((vq)->used[0])
#define USED_IDX(vq) ((vq)->used[1])
#define USED_ELEM(vq, i) (((volatile struct virtq_used_elem *)((vq)->used + 2))[i])
#define AVAIL_EVENT(vq) ((vq)->used[2 + 4 * (vq)->num])

/* The spec's vring_need_event: did [old, new) cross event_idx? */
static inline bool need_event(u16 event_idx, u16 new_idx, u16 old)
{
	return (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old);
}

int virtq_add(struct virtq *vq, const struct virtio_sg *sg, u32 n_out, u32 n_in, void *token)
{
	u32 n = n_out + n_in;

	if (!vq->num || !token || n == 0 || n > VIRTQ_MAX_SG)
		return -1;
	bool indirect = vq->indirect && n > 1;
	u32 need = indirect ? 1 : n;
	if (vq->num_free < need)
		return -1;

	u16 head = vq->free_head;
	if (indirect) {
		struct virtq_desc *table = vq->indirect + (u32)head * VIRTQ_MAX_SG;
		for (u32 i = 0; i < n; i++) {
			table[i].addr = virt_to_phys(sg[i].addr);
			table[i].len = sg[i].len;
			table[i].flags = (u16)((i >= n_out ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
			table[i].next = (u16)(i + 1 < n ? i + 1 : 0);
		}
		vq->desc[head].addr = virt_to_phys(table);
		vq->desc[head].len = (u32)(n * sizeof(struct virtq_desc));
		vq->desc[head].flags = VIRTQ_DESC_F_INDIRECT;
		vq->free_head = vq->desc[head].next;
	} else {
		u16 i = head, last = head;
		for (u32 k = 0; k < n; k++) {
			vq->desc[i].addr = virt_to_phys(sg[k].addr);
			vq->desc[i].len = sg[k].len;
			vq->desc[i].flags = (u16)((k >= n_out ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
			last = i;
			i = vq->desc[i].next; /* free-list link doubles as the chain link */
		}
		vq->free_head = vq->desc[last].next;
	}
	vq->num_free = (u16)(vq->num_free - need);
	vq->tokens[head] = token;

	/* Ring entry before the index that publishes it (x86: stores stay in order). */
	AVAIL_RING(vq, vq->avail_idx & (vq->num - 1)) = head;
	barrier();
	vq->avail_idx++;
	AVAIL_IDX(vq) = vq->avail_idx;
	vq->unkicked++;
	return head;
}

void virtq_kick(struct virtq *vq)
{
	/* Everything since the last kick: [old, new). */
	u16 new_idx = vq->avail_idx, old = (u16)(new_idx - vq->unkicked);
	vq->unkicked = 0;
	vq->irqs_at_kick = vq->dev->vring_interrupts;
	virtio_mb(); /* the index store must be visible before we read the device's flags */
	bool kick;
	if (virtio_has(vq->dev, VIRTIO_F_EVENT_IDX))
		kick = need_event(AVAIL_EVENT(vq), new_idx, old);
	else
		kick = !(USED_FLAGS(vq) & VIRTQ_USED_F_NO_NOTIFY);
	if (kick) {
		virtio_write32(vq->dev, VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
		vq->kicks++;
	} else {
		vq->kicks_skipped++;
	}
}

bool virtq_has_used(const struct virtq *vq) { return vq->num && USED_IDX(vq) != vq->last_used; }

void *virtq_get_used(struct virtq *vq, u32 *len)
{
	if (!virtq_has_used(vq) || vq->error)
		return NULL;
	barrier(); /* read the index before the element (x86: loads stay in order) */
	volatile struct virtq_used_elem *e = &USED_ELEM(vq, vq->last_used & (vq->num - 1));
	u32 id = e->id, written = e->len;
	if (id >= vq->num || !vq->tokens[id]) {
		vq->error = "device returned an unknown descriptor id in the used ring";
		return NULL;
	}
	void *token = vq->tokens[id];
	vq->tokens[id] = NULL;

	/* Back on the free list: one descriptor if indirect, else follow NEXT. */
	u16 last = (u16)id, count = 1;
	if (!(vq->desc[id].flags & VIRTQ_DESC_F_INDIRECT)) {
		while (vq->desc[last].flags & VIRTQ_DESC_F_NEXT) {
			last = vq->desc[last].next;
			count++;
		}
	}
	vq->desc[last].next = vq->free_head;
	vq->free_head = (u16)id;
	vq->num_free = (u16)(vq->num_free + count);
	vq->last_used++;
	/* Callbacks stay on in interrupt mode: keep asking for the next one (virtqueue_get_buf). */
	if (vq->dev->use_irq && virtio_has(vq->dev, VIRTIO_F_EVENT_IDX))
		USED_EVENT(vq) = vq->last_used;
	if (len)
		*len = written;
	return token;
}

/* Ask for an interrupt at the next used entry (Linux's virtqueue_enable_cb_prepare). */
static void enable_cb(struct virtq *vq)
{
	if (virtio_has(vq->dev, VIRTIO_F_EVENT_IDX))
		USED_EVENT(vq) = vq->last_used;
	else
		AVAIL_FLAGS(vq) = 0;
	virtio_mb(); /* before re-reading the used index */
}

#define POLL_SPINS 256

void virtq_dump(struct virtq *vq, const char *why)
{
	struct virtio_dev *d = vq->dev;

	printf("virtio: 0x%lx queue %u %s: avail idx %u used idx %u last_used %u used flags 0x%x avail_event %u "
	       "used_event %u kicks %llu skipped %llu irqs %llu/%llu status 0x%x isr 0x%x\n",
	       (unsigned long)d->base, vq->index, why, vq->avail_idx, USED_IDX(vq), vq->last_used, USED_FLAGS(vq),
	       AVAIL_EVENT(vq), USED_EVENT(vq), vq->kicks, vq->kicks_skipped, d->vring_interrupts, d->interrupts,
	       virtio_status(d), virtio_read32(d, VIRTIO_MMIO_INTERRUPT_STATUS));
}

void *virtq_wait_used(struct virtq *vq, u32 *len, u32 timeout_ms)
{
	struct virtio_dev *d = vq->dev;
	void *token = NULL;

	deadline_start(timeout_ms);
	for (;;) {
		bool signalled = !d->use_irq || d->vring_interrupts != vq->irqs_at_kick;
		if (signalled && ((token = virtq_get_used(vq, len)) || vq->error))
			break;
		if (deadline_passed()) {
			if (!signalled && virtq_has_used(vq))
				vq->error = "the device completed the request but no used-buffer interrupt arrived";
			virtq_dump(vq, "timeout");
			break;
		}
		if (d->use_irq) {
			enable_cb(vq);
			wait_for_interrupt(); /* the device's interrupt, or the deadline's */
		} else {
			for (u32 i = 0; i < POLL_SPINS && !virtq_has_used(vq); i++)
				cpu_relax();
		}
	}
	deadline_stop();
	return token;
}
