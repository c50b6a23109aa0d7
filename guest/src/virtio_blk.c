/* virtio-blk driver (see virtio_blk.h) and test=blk. */
#include "virtio_blk.h"

#include "alloc.h"
#include "io.h"
#include "lib.h"
#include "tests.h"

const char *blk_init(struct blk_dev *b, struct virtio_dev *d, u64 extra_features, bool use_irq, u32 timeout_ms)
{
	memset(b, 0, sizeof(*b));
	b->vdev = d;
	b->timeout_ms = timeout_ms;
	if (d->device_id != VIRTIO_ID_BLOCK)
		return "not a block device";
	const char *err = virtio_negotiate(d, BLK_DRIVER_FEATURES | extra_features);
	if (err)
		return err;
	err = virtio_setup_queue(d, 0, (u16)cmdline_get_u64("blk.queue_size", 256));
	if (err) {
		virtio_fail(d);
		return err;
	}
	b->capacity = virtio_config_read64(d, VIRTIO_BLK_CFG_CAPACITY);
	if (virtio_has(d, VIRTIO_BLK_F_SEG_MAX))
		b->seg_max = virtio_config_read32(d, VIRTIO_BLK_CFG_SEG_MAX);
	b->read_only = virtio_has(d, VIRTIO_BLK_F_RO);
	b->can_flush = virtio_has(d, VIRTIO_BLK_F_FLUSH);
	/* Header and status in one small device-visible block. */
	u8 *area = alloc(64, 64);
	b->hdr = (struct virtio_blk_outhdr *)area;
	b->status = area + 32;
	return virtio_driver_ok(d, use_irq);
}

int blk_request(struct blk_dev *b, u32 type, u64 sector, void *buf, u32 len, u32 segments, const char **err)
{
	struct virtq *vq = &b->vdev->vqs[0];
	struct virtio_sg sg[VIRTQ_MAX_SG];
	u32 n = 0;

	if (!len)
		segments = 0;
	if (segments > VIRTQ_MAX_SG - 2 || (b->seg_max && segments > b->seg_max)) {
		*err = "too many segments";
		return -1;
	}
	b->hdr->type = type;
	b->hdr->reserved = 0;
	b->hdr->sector = sector;
	*b->status = 0xff; /* the device must overwrite it */

	sg[n++] = (struct virtio_sg){b->hdr, sizeof(*b->hdr)};
	u32 off = 0;
	for (u32 i = 0; i < segments; i++) {
		u32 part = i + 1 < segments ? len / segments : len - off;
		sg[n++] = (struct virtio_sg){(u8 *)buf + off, part};
		off += part;
	}
	sg[n++] = (struct virtio_sg){(void *)b->status, 1};
	/* OUT: header and data readable; IN / GET_ID: data writable; FLUSH: no data. */
	u32 n_out = type == VIRTIO_BLK_T_OUT ? 1 + segments : 1;

	if (virtq_add(vq, sg, n_out, n - n_out, b->hdr) < 0) {
		*err = "virtqueue full";
		return -1;
	}
	virtq_kick(vq);
	u32 used_len = 0;
	void *token = virtq_wait_used(vq, &used_len, b->timeout_ms);
	if (!token) {
		*err = vq->error ? vq->error : "timeout waiting for the request to complete";
		return -1;
	}
	if (token != b->hdr) {
		*err = "device completed a request we did not send";
		return -1;
	}
	u8 status = *b->status;
	if (status == 0xff) {
		*err = "device did not write the status byte";
		return -1;
	}
	if (status == VIRTIO_BLK_S_OK && used_len < 1 + (type == VIRTIO_BLK_T_OUT ? 0 : len) && type != VIRTIO_BLK_T_GET_ID) {
		*err = "used length shorter than the data the device had to write";
		return -1;
	}
	return status;
}

/* ------------------------------------------------------------------------ test=blk */

#define MAX_BLK VIRTIO_MAX_DEVICES
#define READ_FIRST 0
#define WRITE_FIRST 16
#define TEST_SECTORS 8
#define TEST_BYTES (TEST_SECTORS * SECTOR_SIZE)

/*
 * What the host writes before boot, and what the guest writes: byte i of
 * sector s is (base(s) + i) & 0xff, a ramp, so each sector is a 512-byte
 * window of a 768-byte ramp table: filling is one memcpy and checking one
 * memcmp per sector (rep movsb / repe cmpsb: one emulated instruction each).
 */
static u64 read_base(u64 s) { return s * 7; }
static u64 write_base(u64 s) { return s * 13 + 1; }

static u8 ramp[256 + SECTOR_SIZE];
static u64 snap_seed; /* test_snap's pattern: which count a sector holds */

static const u8 *ramp_at(u64 base)
{
	if (!ramp[1])
		for (u32 j = 0; j < sizeof(ramp); j++)
			ramp[j] = (u8)j;
	return ramp + (base & 0xff);
}

static void fill(u8 *buf, u64 first, u64 (*base)(u64))
{
	for (u32 s = 0; s < TEST_SECTORS; s++)
		memcpy(buf + s * SECTOR_SIZE, ramp_at(base(first + s)), SECTOR_SIZE);
}

/* First sector (absolute) whose content differs from the pattern, or -1. */
static s64 check(const u8 *buf, u64 first, u64 (*base)(u64))
{
	for (u32 s = 0; s < TEST_SECTORS; s++)
		if (memcmp(buf + s * SECTOR_SIZE, ramp_at(base(first + s)), SECTOR_SIZE))
			return (s64)(first + s);
	return -1;
}

static u64 dev_option(u32 n, const char *name, u64 dflt)
{
	char key[32];

	snprintf(key, sizeof(key), "blk%u.%s", n, name);
	return cmdline_get_u64(key, dflt);
}

/* One request; prints "blk<n>: FAIL <what>: <why>" and returns false unless the status is `want`. */
static bool request_expect(struct blk_dev *b, u32 n, const char *what, u32 type, u64 sector, void *buf, u32 len,
			   u32 segments, int want)
{
	const char *err = NULL;
	int status = blk_request(b, type, sector, buf, len, segments, &err);

	if (status < 0) {
		printf("blk%u: FAIL %s: %s\n", n, what, err);
		return false;
	}
	if (status != want) {
		printf("blk%u: FAIL %s: status %d, expected %d\n", n, what, status, want);
		return false;
	}
	return true;
}

static void print_id(u32 n, const u8 *id)
{
	char text[VIRTIO_BLK_ID_BYTES + 1];
	u32 i;

	/* Up to the first NUL; exactly 20 bytes has none. */
	for (i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
		text[i] = id[i] >= 0x20 && id[i] < 0x7f ? (char)id[i] : '?';
	text[i] = '\0';
	printf("blk%u: id %s\n", n, text);
}

static void test_one(struct virtio_dev *d, u32 n, u64 extra, bool use_irq, u32 timeout_ms, u64 loops)
{
	struct blk_dev b;
	const char *err = blk_init(&b, d, extra, use_irq, timeout_ms);

	if (err) {
		printf("blk%u: FAIL init: %s\n", n, err);
		return;
	}
	printf("blk%u: capacity %llu\n", n, b.capacity);

	u8 *buf = alloc_pages(TEST_BYTES);
	u8 *id = alloc(VIRTIO_BLK_ID_BYTES, 8);
	if (!request_expect(&b, n, "GET_ID", VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES, 1, VIRTIO_BLK_S_OK))
		return;
	print_id(n, id);

	if (b.capacity < READ_FIRST + TEST_SECTORS) {
		printf("blk%u: FAIL capacity %llu is too small to read sectors 0..7\n", n, b.capacity);
		return;
	}
	if (!request_expect(&b, n, "read", VIRTIO_BLK_T_IN, READ_FIRST, buf, TEST_BYTES, 1, VIRTIO_BLK_S_OK))
		return;
	s64 bad = dev_option(n, "pattern", 1) ? check(buf, READ_FIRST, read_base) : -1;
	if (bad >= 0)
		printf("blk%u: read MISMATCH sector %lld\n", n, bad); /* the write test still runs */
	else
		printf("blk%u: read ok\n", n);

	if (b.read_only) {
		fill(buf, WRITE_FIRST, write_base);
		if (request_expect(&b, n, "write to a read-only drive", VIRTIO_BLK_T_OUT, WRITE_FIRST, buf,
				   SECTOR_SIZE, 1, VIRTIO_BLK_S_IOERR))
			printf("blk%u: write rejected ok\n", n);
		return;
	}
	if (b.capacity < WRITE_FIRST + TEST_SECTORS) {
		printf("blk%u: FAIL capacity %llu is too small to write sectors 16..23\n", n, b.capacity);
		return;
	}
	/* Loop k writes the 8 sectors from 16 + 8k, wrapping inside the disk. */
	u64 slots = (b.capacity - WRITE_FIRST) / TEST_SECTORS;
	for (u64 k = 0; k < loops; k++) {
		u64 first = WRITE_FIRST + (k % slots) * TEST_SECTORS;
		fill(buf, first, write_base);
		if (!request_expect(&b, n, "write", VIRTIO_BLK_T_OUT, first, buf, TEST_BYTES, 2, VIRTIO_BLK_S_OK))
			return;
		if (b.can_flush &&
		    !request_expect(&b, n, "flush", VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, VIRTIO_BLK_S_OK))
			return;
		memset(buf, 0, TEST_BYTES);
		if (!request_expect(&b, n, "read back", VIRTIO_BLK_T_IN, first, buf, TEST_BYTES, 1, VIRTIO_BLK_S_OK))
			return;
		bad = check(buf, first, write_base);
		if (bad >= 0) {
			printf("blk%u: FAIL read back MISMATCH sector %lld (loop %llu)\n", n, bad, k);
			return;
		}
		if (loops > 1)
			printf("blk%u: loop %llu ok\n", n, k);
	}
	printf("blk%u: write ok\n", n);
	if (use_irq)
		printf("blk%u: interrupts %llu\n", n, d->vring_interrupts);
}

static void test_blk(void)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	u32 ndev = virtio_discover(devs, VIRTIO_MAX_DEVICES);
	u64 extra = 0;

	if (cmdline_get_u64("blk.event_idx", 0))
		extra |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
	if (cmdline_get_u64("blk.indirect", 0))
		extra |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
	bool use_irq = cmdline_get_u64("blk.irq", 0) != 0;
	u32 timeout_ms = (u32)cmdline_get_u64("blk.timeout_ms", 10000);
	u64 loops = cmdline_get_u64("blk.loops", 1);

	u32 n = 0;
	for (u32 i = 0; i < ndev && n < MAX_BLK; i++) {
		if (devs[i].device_id == VIRTIO_ID_BLOCK)
			test_one(&devs[i], n++, extra, use_irq, timeout_ms, loops);
	}
	println(n ? "blk: done" : "blk: no devices");
}
GUEST_TEST("blk", test_blk);

/*
 * snap: a guest with state in memory and on disk, for snapshot tests. Forever: step k
 * writes sectors WRITE_FIRST + 8 * (k % slots) with the pattern of k, reads them back,
 * checks that the previous step's sectors still hold k-1's pattern and that the memory
 * trail (trail[k % TRAIL] = k) still holds k-1, then prints "snap: count k ok". The
 * previous step's sectors are read into a page only the device writes: a Diff snapshot must
 * carry it, and KVM's dirty log does not see it. With snap.irq=1 (default) every request waits for its interrupt: a lost one times out.
 */
#define TRAIL 4096

static u64 snap_base(u64 s) { return s * 31 + snap_seed; }

static void test_snap(void)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	u32 ndev = virtio_discover(devs, VIRTIO_MAX_DEVICES);
	struct virtio_dev *d = NULL;
	for (u32 i = 0; i < ndev && !d; i++)
		if (devs[i].device_id == VIRTIO_ID_BLOCK)
			d = &devs[i];
	if (!d) {
		println("snap: FAIL no block device");
		return;
	}
	struct blk_dev b;
	const char *err = blk_init(&b, d, 0, cmdline_get_u64("snap.irq", 1) != 0, 5000);
	if (err) {
		printf("snap: FAIL init: %s\n", err);
		return;
	}
	u64 slots = (b.capacity - WRITE_FIRST) / TEST_SECTORS;
	u64 every = cmdline_get_u64("snap.delay", 200000);
	u8 *buf = alloc_pages(TEST_BYTES);
	u8 *prev_buf = alloc_pages(TEST_BYTES); /* written only by the device (DMA), never by a vCPU */
	u64 *trail = alloc_pages(TRAIL * sizeof(u64));
	println("snap: ready");
	for (u64 k = 0;; k++) {
		u64 first = WRITE_FIRST + (k % slots) * TEST_SECTORS;
		snap_seed = k;
		fill(buf, first, snap_base);
		if (!request_expect(&b, 0, "write", VIRTIO_BLK_T_OUT, first, buf, TEST_BYTES, 2, VIRTIO_BLK_S_OK))
			return;
		memset(buf, 0, TEST_BYTES);
		if (!request_expect(&b, 0, "read back", VIRTIO_BLK_T_IN, first, buf, TEST_BYTES, 1, VIRTIO_BLK_S_OK))
			return;
		if (check(buf, first, snap_base) >= 0) {
			printf("snap: FAIL read back mismatch at count %llu\n", k);
			return;
		}
		if (k > 0) {
			u64 prev = WRITE_FIRST + ((k - 1) % slots) * TEST_SECTORS;
			snap_seed = k - 1;
			if (!request_expect(&b, 0, "read prev", VIRTIO_BLK_T_IN, prev, prev_buf, TEST_BYTES, 1,
					    VIRTIO_BLK_S_OK))
				return;
			if (check(prev_buf, prev, snap_base) >= 0) {
				printf("snap: FAIL disk lost count %llu\n", k - 1);
				return;
			}
			if (trail[(k - 1) % TRAIL] != k - 1) {
				printf("snap: FAIL memory lost count %llu\n", k - 1);
				return;
			}
		}
		trail[k % TRAIL] = k;
		printf("snap: count %llu ok irqs %llu\n", k, d->vring_interrupts);
		for (u64 i = 0; i < every; i++)
			barrier();
	}
}
GUEST_TEST("snap", test_snap);
