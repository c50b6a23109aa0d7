"""Our virtio numbers agree with the kernel's uapi headers, where the machine has them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.virtio import constants as c

HEADERS = Path("/usr/include/linux")

# (header, kernel name, our value)
PAIRS = [
    ("virtio_ids.h", "VIRTIO_ID_NET", c.VIRTIO_ID_NET),
    ("virtio_ids.h", "VIRTIO_ID_BLOCK", c.VIRTIO_ID_BLOCK),
    ("virtio_ids.h", "VIRTIO_ID_VSOCK", c.VIRTIO_ID_VSOCK),
    ("virtio_config.h", "VIRTIO_CONFIG_S_ACKNOWLEDGE", c.STATUS_ACKNOWLEDGE),
    ("virtio_config.h", "VIRTIO_CONFIG_S_DRIVER", c.STATUS_DRIVER),
    ("virtio_config.h", "VIRTIO_CONFIG_S_DRIVER_OK", c.STATUS_DRIVER_OK),
    ("virtio_config.h", "VIRTIO_CONFIG_S_FEATURES_OK", c.STATUS_FEATURES_OK),
    ("virtio_config.h", "VIRTIO_CONFIG_S_NEEDS_RESET", c.STATUS_DEVICE_NEEDS_RESET),
    ("virtio_config.h", "VIRTIO_CONFIG_S_FAILED", c.STATUS_FAILED),
    ("virtio_config.h", "VIRTIO_F_VERSION_1", c.VIRTIO_F_VERSION_1),
    ("virtio_ring.h", "VIRTIO_RING_F_INDIRECT_DESC", c.VIRTIO_F_INDIRECT_DESC),
    ("virtio_ring.h", "VIRTIO_RING_F_EVENT_IDX", c.VIRTIO_F_EVENT_IDX),
    ("virtio_ring.h", "VRING_DESC_F_NEXT", c.VIRTQ_DESC_F_NEXT),
    ("virtio_ring.h", "VRING_DESC_F_WRITE", c.VIRTQ_DESC_F_WRITE),
    ("virtio_ring.h", "VRING_DESC_F_INDIRECT", c.VIRTQ_DESC_F_INDIRECT),
    ("virtio_ring.h", "VRING_USED_F_NO_NOTIFY", c.VIRTQ_USED_F_NO_NOTIFY),
    ("virtio_ring.h", "VRING_AVAIL_F_NO_INTERRUPT", c.VIRTQ_AVAIL_F_NO_INTERRUPT),
    ("virtio_mmio.h", "VIRTIO_MMIO_MAGIC_VALUE", c.MMIO_MAGIC_VALUE),
    ("virtio_mmio.h", "VIRTIO_MMIO_DEVICE_FEATURES_SEL", c.MMIO_DEVICE_FEATURES_SEL),
    ("virtio_mmio.h", "VIRTIO_MMIO_DRIVER_FEATURES", c.MMIO_DRIVER_FEATURES),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_NUM_MAX", c.MMIO_QUEUE_NUM_MAX),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_READY", c.MMIO_QUEUE_READY),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_NOTIFY", c.MMIO_QUEUE_NOTIFY),
    ("virtio_mmio.h", "VIRTIO_MMIO_INTERRUPT_STATUS", c.MMIO_INTERRUPT_STATUS),
    ("virtio_mmio.h", "VIRTIO_MMIO_INTERRUPT_ACK", c.MMIO_INTERRUPT_ACK),
    ("virtio_mmio.h", "VIRTIO_MMIO_STATUS", c.MMIO_STATUS),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_DESC_HIGH", c.MMIO_QUEUE_DESC_HIGH),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_AVAIL_LOW", c.MMIO_QUEUE_DRIVER_LOW),
    ("virtio_mmio.h", "VIRTIO_MMIO_QUEUE_USED_HIGH", c.MMIO_QUEUE_DEVICE_HIGH),
    ("virtio_mmio.h", "VIRTIO_MMIO_SHM_LEN_LOW", c.MMIO_SHM_LEN_LOW),
    ("virtio_mmio.h", "VIRTIO_MMIO_CONFIG_GENERATION", c.MMIO_CONFIG_GENERATION),
    ("virtio_mmio.h", "VIRTIO_MMIO_CONFIG", c.MMIO_CONFIG),
    ("virtio_mmio.h", "VIRTIO_MMIO_INT_VRING", c.INTERRUPT_USED_RING),
    ("virtio_mmio.h", "VIRTIO_MMIO_INT_CONFIG", c.INTERRUPT_CONFIG_CHANGE),
]


def kernel_value(header: str, name: str) -> int:
    path = HEADERS / header
    if not path.exists():
        pytest.skip(f"{path} is not installed")
    text = path.read_text()
    shifted = re.search(rf"^#define\s+{name}\s+\(1\s*<<\s*(\d+)\)", text, re.MULTILINE)
    if shifted:
        return 1 << int(shifted.group(1))
    match = re.search(rf"^#define\s+{name}\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.MULTILINE)
    assert match, f"{name} not found in {path}"
    return int(match.group(1), 0)


@pytest.mark.parametrize(("header", "name", "ours"), PAIRS, ids=[p[1] for p in PAIRS])
def test_constant_matches_kernel_header(header: str, name: str, ours: int) -> None:
    assert kernel_value(header, name) == ours
