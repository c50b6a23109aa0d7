"""The state file: what is written reads back; every damaged file is refused with a
SnapshotFormatError (never another exception), including random byte flips and cuts."""

from __future__ import annotations

import os
import random

import pytest

from shared import snapshot_format as fmt


def sample() -> fmt.SnapshotState:
    return fmt.SnapshotState(
        snapshot_type="Full",
        mem_size=64 << 20,
        spec={"vcpu_count": 1, "mem_size_mib": 64, "drives": []},
        config={"machine-config": {"vcpu_count": 1}},
        vm_state=bytes(range(256)) * 8,
        devices=[{"name": "block-disk", "kind": "block", "device_id": "disk", "state": {"transport": {}}}],
        embervm_version="0.1.0",
        track_dirty_pages=True,
    )


def test_round_trip():
    assert fmt.decode(fmt.encode(sample())) == sample()


def test_atomic_write_then_read_and_describe(tmp_path):
    path = str(tmp_path / "state")
    fmt.write_atomically(path, fmt.encode(sample()))

    assert fmt.read(path) == sample()
    assert fmt.describe(path) == fmt.version_string()
    assert os.listdir(tmp_path) == ["state"]  # no temporary file left


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "state")
    fmt.write_atomically(path, b"old")

    def explode(fd: int) -> None:
        os.write(fd, b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        fmt.write_atomically(path, fill=explode)
    assert (tmp_path / "state").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state"]


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"x", "trailing"),
        (lambda b: b"NOTASNAP" + b[8:], "bad magic"),
        (lambda b: b[:8] + (2).to_bytes(2, "little") + b[10:], "format version v2.0.0 is not supported"),
        (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "checksum"),
    ],
)
def test_damaged_files_are_refused_with_the_reason(damage, says):
    with pytest.raises(fmt.SnapshotFormatError, match=says):
        fmt.decode(damage(fmt.encode(sample())))


def test_a_valid_checksum_over_a_wrong_shape_is_refused():
    import msgpack

    payload = msgpack.packb({**sample().to_payload(), "mem_size": "64M"})
    data = fmt.seal(payload)
    with pytest.raises(fmt.SnapshotFormatError, match="mem_size"):
        fmt.decode(data)


def test_fuzzed_bytes_never_escape_as_another_error():
    good = fmt.encode(sample())
    rng = random.Random(15)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        if bytes(data) == good:
            continue
        with pytest.raises(fmt.SnapshotFormatError):
            fmt.decode(bytes(data))


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(fmt.SnapshotFormatError, match="cannot read"):
        fmt.read(str(tmp_path / "nothing"))
