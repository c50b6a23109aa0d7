"""virtio-balloon memory statistics (virtio spec 5.5.6.3): parsing what the guest reports.

The stats buffer is an array of packed `struct virtio_balloon_stat { le16 tag; le64 val; }`
(10 bytes each). Tags are named as Firecracker's GET /balloon/statistics names them. The
guest writes the buffer, so it is hostile input: a length that is not a whole number of
entries, or more entries than `MAX_ENTRIES`, fails the whole update; unknown tags are
skipped (newer guests report more than v1.12 knows) and counted by the caller.
"""

from __future__ import annotations

import struct

ENTRY = struct.Struct("<HQ")
MAX_ENTRIES = 64  # Linux reports at most VIRTIO_BALLOON_S_NR (10 in 5.x, 16 in 6.12)

# VIRTIO_BALLOON_S_* tag -> Firecracker's field name.
STAT_NAMES: dict[int, str] = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
KNOWN = frozenset(STAT_NAMES.values())


class StatsError(Exception):
    """The stats buffer is malformed."""


def parse_stats(data: bytes) -> tuple[dict[str, int], int]:
    """(known statistics by name, number of unknown tags skipped); StatsError if malformed.
    A tag given twice keeps its last value, as the spec's array order implies."""
    if len(data) % ENTRY.size:
        raise StatsError(f"a stats buffer of {len(data)} bytes is not a whole number of {ENTRY.size}-byte entries")
    if len(data) // ENTRY.size > MAX_ENTRIES:
        raise StatsError(f"{len(data) // ENTRY.size} stats entries, more than the {MAX_ENTRIES} accepted")
    stats: dict[str, int] = {}
    unknown = 0
    for tag, value in ENTRY.iter_unpack(data):
        name = STAT_NAMES.get(tag)
        if name is None:
            unknown += 1
        else:
            stats[name] = value
    return stats, unknown
