from __future__ import annotations

import msgpack
import pytest

from shared import protocol as p


def test_message_round_trips():
    msg = p.Exited(code=1, reason="guest triple-faulted", detail="rip=0x1")

    assert p.decode(p.encode(msg)) == msg


def test_nested_metrics_round_trip():
    msg = p.Metrics({"uart": {"write_count": 3}})

    assert p.decode(p.encode(msg)) == msg


def test_unknown_type_is_rejected():
    with pytest.raises(p.ProtocolError, match="unknown"):
        p.decode(msgpack.packb({"type": "format_disk"}))


def test_extra_field_is_rejected():
    with pytest.raises(p.ProtocolError, match="expected fields"):
        p.decode(msgpack.packb({"type": "ready", "pid": 1, "extra": 2}))


def test_wrong_field_type_is_rejected():
    with pytest.raises(p.ProtocolError, match="wrong type"):
        p.decode(msgpack.packb({"type": "exited", "code": "0", "reason": "", "detail": ""}))


def test_bool_is_not_an_int():
    with pytest.raises(p.ProtocolError, match="wrong type"):
        p.decode(msgpack.packb({"type": "ready", "pid": True}))


def test_ill_typed_nested_counter_is_rejected():
    with pytest.raises(p.ProtocolError, match="wrong type"):
        p.decode(msgpack.packb({"type": "metrics", "groups": {"uart": {"write_count": "many"}}}))


def test_garbage_is_rejected():
    with pytest.raises(p.ProtocolError):
        p.decode(b"\xc1\xc1\xc1")
