/*
 * test=balloon: a virtio-balloon driver that does what Linux's does, in the small.
 * test=rng: read random bytes from a virtio-rng device.
 *
 * balloon: negotiates STATS_VQ when offered and gives the device one stats buffer
 * (free_memory counts the stats requests answered); reads the target (num_pages),
 * touches that many pages so the host backs them, inflates them (256 PFNs per
 * chain), writes `actual`, prints "balloon: inflated N", then waits (up to
 * balloon.timeout_ms) for the host to change the target. It prints the new target
 * and the `actual` it reads back (a restarted device worker must still have it),
 * deflates every page, checks that each reads as zeros, writes and checks a
 * pattern, and prints "balloon: done". Lines on failure start "balloon: FAIL".
 */
#include "alloc.h"
#include "irq.h"
#include "lib.h"
#include "tests.h"
#include "virtio.h"

#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5
#define BALLOON_F_STATS_VQ 1
#define BALLOON_CFG_NUM_PAGES 0
#define BALLOON_CFG_ACTUAL 4
#define PFNS_PER_CHAIN 256
#define STAT_FREE_MEMORY 4
#define STAT_TOTAL_MEMORY 5

struct balloon_stat {
	u16 tag;
	u64 val;
} PACKED;

static struct virtio_dev *find_device(struct virtio_dev *devs, u32 id)
{
	u32 n = virtio_discover(devs, VIRTIO_MAX_DEVICES);
	for (u32 i = 0; i < n; i++)
		if (devs[i].device_id == id)
			return &devs[i];
	return NULL;
}

static void sleep_ms(u32 ms)
{
	deadline_start(ms);
	while (!deadline_passed())
		wait_for_interrupt();
	deadline_stop();
}

/* Send pages [first, first+count) on `vq` as PFN arrays; false on a timeout. */
static bool send_pfns(struct virtq *vq, u8 *first, u32 count, u32 *pfns)
{
	for (u32 done = 0; done < count;) {
		u32 n = count - done < PFNS_PER_CHAIN ? count - done : PFNS_PER_CHAIN;
		for (u32 i = 0; i < n; i++)
			pfns[i] = (u32)(virt_to_phys(first + (u64)(done + i) * PAGE_SIZE) / PAGE_SIZE);
		struct virtio_sg sg = {pfns, n * 4};
		u32 len;
		if (virtq_add(vq, &sg, 1, 0, pfns) < 0 || (virtq_kick(vq), !virtq_wait_used(vq, &len, 10000)))
			return false;
		done += n;
	}
	return true;
}

static struct balloon_stat stats[2];
static u64 stats_answered;

static void give_stats(struct virtq *vq)
{
	stats[0] = (struct balloon_stat){STAT_FREE_MEMORY, stats_answered};
	stats[1] = (struct balloon_stat){STAT_TOTAL_MEMORY, 64ULL << 20};
	struct virtio_sg sg = {stats, sizeof(stats)};
	virtq_add(vq, &sg, 1, 0, stats);
	virtq_kick(vq);
}

static void test_balloon(void)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	struct virtio_dev *d = find_device(devs, VIRTIO_ID_BALLOON);
	if (!d) {
		println("balloon: no device");
		return;
	}
	const char *err = virtio_negotiate(d, VIRTIO_BIT(VIRTIO_F_VERSION_1) | VIRTIO_BIT(BALLOON_F_STATS_VQ));
	u16 queues = virtio_has(d, BALLOON_F_STATS_VQ) ? 3 : 2;
	for (u16 q = 0; q < queues && !err; q++)
		err = virtio_setup_queue(d, q, 64);
	if (!err)
		err = virtio_driver_ok(d, false);
	if (err) {
		printf("balloon: FAIL init: %s\n", err);
		return;
	}
	if (queues == 3)
		give_stats(&d->vqs[2]);
	u32 target = virtio_config_read32(d, BALLOON_CFG_NUM_PAGES);
	printf("balloon: target %u\n", target);
	u8 *pages = alloc_pages((size_t)target * PAGE_SIZE);
	u32 *pfns = alloc(PFNS_PER_CHAIN * 4, 64);
	for (u32 i = 0; i < target; i++)
		memset(pages + (u64)i * PAGE_SIZE, 0xab, PAGE_SIZE);
	if (!send_pfns(&d->vqs[0], pages, target, pfns)) {
		println("balloon: FAIL inflate timed out");
		return;
	}
	virtio_write32(d, VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL, target);
	printf("balloon: inflated %u\n", target);

	u32 timeout_ms = (u32)cmdline_get_u64("balloon.timeout_ms", 60000);
	u32 now = target;
	for (u32 waited = 0; now == target && waited < timeout_ms; waited += 20) {
		sleep_ms(20);
		u32 len;
		if (queues == 3 && virtq_get_used(&d->vqs[2], &len)) { /* the device polled: refill */
			stats_answered++;
			give_stats(&d->vqs[2]);
		}
		now = virtio_config_read32(d, BALLOON_CFG_NUM_PAGES);
	}
	if (now == target) {
		println("balloon: FAIL the target never changed");
		return;
	}
	printf("balloon: new target %u actual %u stats %llu\n", now, virtio_config_read32(d, BALLOON_CFG_ACTUAL),
	       stats_answered);
	if (!send_pfns(&d->vqs[1], pages, target, pfns)) {
		println("balloon: FAIL deflate timed out");
		return;
	}
	virtio_write32(d, VIRTIO_MMIO_CONFIG + BALLOON_CFG_ACTUAL, 0);
	for (u32 i = 0; i < target; i++) {
		u64 *p = (u64 *)(pages + (u64)i * PAGE_SIZE);
		for (u32 j = 0; j < PAGE_SIZE / 8; j++)
			if (p[j]) {
				printf("balloon: FAIL page %u not zero after deflate\n", i);
				return;
			}
	}
	println("balloon: zeros ok");
	for (u32 i = 0; i < target; i++)
		memset(pages + (u64)i * PAGE_SIZE, (int)(i & 0xff), PAGE_SIZE);
	for (u32 i = 0; i < target; i++)
		if (pages[(u64)i * PAGE_SIZE + 123] != (u8)(i & 0xff)) {
			printf("balloon: FAIL page %u lost its pattern\n", i);
			return;
		}
	printf("balloon: reuse ok %u\n", target);
	println("balloon: done");
}
GUEST_TEST("balloon", test_balloon);

static void test_rng(void)
{
	static struct virtio_dev devs[VIRTIO_MAX_DEVICES];
	struct virtio_dev *d = find_device(devs, VIRTIO_ID_RNG);
	if (!d) {
		println("rng: no device");
		return;
	}
	const char *err = virtio_negotiate(d, VIRTIO_BIT(VIRTIO_F_VERSION_1));
	if (!err)
		err = virtio_setup_queue(d, 0, 64);
	if (!err)
		err = virtio_driver_ok(d, false);
	if (err) {
		printf("rng: FAIL init: %s\n", err);
		return;
	}
	u8 *buf = alloc(256, 64);
	u32 total = 0, nonzero = 0;
	for (u32 round = 0; round < 4; round++) {
		struct virtio_sg sg = {buf, 256};
		u32 len = 0;
		memset(buf, 0, 256);
		if (virtq_add(&d->vqs[0], &sg, 0, 1, buf) < 0 || (virtq_kick(&d->vqs[0]), !virtq_wait_used(&d->vqs[0], &len, 10000))) {
			println("rng: FAIL request timed out");
			return;
		}
		total += len;
		for (u32 i = 0; i < len; i++)
			nonzero += buf[i] != 0;
	}
	printf(nonzero > total / 2 ? "rng: ok %u bytes\n" : "rng: FAIL %u bytes, mostly zeros\n", total);
}
GUEST_TEST("rng", test_rng);
