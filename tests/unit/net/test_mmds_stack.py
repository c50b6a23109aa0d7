"""The in-worker MMDS: HTTP semantics (Firecracker's), then the TCP stack's edge cases."""

from __future__ import annotations

import json

import pytest

from devices.net import packets as pk
from devices.net.mmds import MAX_REQUEST_BYTES, HttpError, MmdsService, TokenAuthority, parse_request
from devices.net.stack import MMDS_MAC, SEND_BUFFER_BYTES, MmdsStack
from devices.net.testing import GuestPeer, http_body, parse_reply

DATA = {"latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-2", "n": 3}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service(version: str = "V2", clock: Clock | None = None, imds_compat: bool = False) -> MmdsService:
    svc = MmdsService(version, imds_compat, TokenAuthority(b"k" * 32, clock or Clock()))
    svc.set_data(json.dumps(DATA).encode())
    return svc


def ask(svc: MmdsService, text: str) -> tuple[int, dict[str, str], bytes]:
    parsed = parse_request(text.encode())
    assert parsed is not None
    return http_body(svc.handle(parsed[0]))


def token(svc: MmdsService, ttl: str = "60", header: str = "X-metadata-token-ttl-seconds") -> str:
    status, _, body = ask(svc, f"PUT /latest/api/token HTTP/1.1\r\n{header}: {ttl}\r\n\r\n")
    assert status == 200
    return body.decode()


def test_v2_token_then_json_and_imds_formats() -> None:
    svc = service()
    t = token(svc)

    status, headers, body = ask(
        svc, f"GET /latest/meta-data HTTP/1.1\r\nX-metadata-token: {t}\r\nAccept: application/json\r\n\r\n"
    )
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == DATA["latest"]["meta-data"]
    assert (
        ask(svc, f"GET /latest/meta-data/ HTTP/1.1\r\nX-aws-ec2-metadata-token: {t}\r\n\r\n")[2]
        == b"ami-id\nreservation-id\nn"
    )
    assert ask(svc, f"GET /latest HTTP/1.1\r\nX-metadata-token: {t}\r\n\r\n")[2] == b"meta-data/"
    assert ask(svc, f"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {t}\r\n\r\n")[2] == b"ami-1"


def test_v2_refuses_missing_bad_and_expired_tokens() -> None:
    clock = Clock()
    svc = service(clock=clock)
    t = token(svc, "5", "X-aws-ec2-metadata-token-ttl-seconds")

    assert ask(svc, "GET /latest HTTP/1.1\r\n\r\n")[0] == 401
    assert ask(svc, f"GET /latest HTTP/1.1\r\nX-metadata-token: {t}x\r\n\r\n")[0] == 401
    assert ask(svc, "GET /latest HTTP/1.1\r\nX-metadata-token: 99999999999999.1.abc\r\n\r\n")[0] == 401
    assert ask(svc, f"GET /latest HTTP/1.1\r\nX-metadata-token: {t}\r\n\r\n")[0] == 200
    clock.now += 5.001
    assert ask(svc, f"GET /latest HTTP/1.1\r\nX-metadata-token: {t}\r\n\r\n")[0] == 401
    assert svc.metrics["rx_no_token"] == 1 and svc.metrics["rx_invalid_token"] == 3


@pytest.mark.parametrize("ttl", ["0", "21601", "4294967295", "0" * 5000 + "21601"])
def test_token_ttl_out_of_range_is_400(ttl: str) -> None:
    status, _, body = ask(service(), f"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n")
    assert status == 400 and b"between 1 and 21600" in body


@pytest.mark.parametrize("ttl", ["-1", "abc", "4294967296", "9" * 5000, "1_0", "5x"])
def test_token_ttl_that_is_not_a_u32_is_an_invalid_header(ttl: str) -> None:
    """Firecracker parses the TTL as a u32: anything else is micro_http's InvalidValue (400)."""
    svc = service()
    request = f"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
    parsed = parse_request(request.encode())
    assert parsed is not None
    status, _, body = http_body(svc.handle(parsed[0]))
    assert status == 400
    assert body.startswith(b"Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:")
    # V2 reads the header on GETs too (Firecracker's TokenHeaders), before the token
    parsed = parse_request(f"GET /latest HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n".encode())
    assert parsed is not None and http_body(svc.handle(parsed[0]))[0] == 400


def test_huge_list_index_and_content_length_are_refused_not_raised() -> None:
    svc = MmdsService("V1", False, TokenAuthority(b"k" * 32, Clock()))
    svc.set_data(json.dumps({"l": ["a", "b"]}).encode())
    assert ask(svc, "GET /l/1 HTTP/1.1\r\n\r\n")[2] == b"b"
    assert ask(svc, f"GET /l/{'1' * 5000} HTTP/1.1\r\n\r\n")[0] == 404
    assert ask(svc, f"GET /l/{'0' * 11}1 HTTP/1.1\r\n\r\n")[0] == 404  # serde_json: no leading zero
    with pytest.raises(HttpError) as e:
        parse_request(f"GET / HTTP/1.1\r\nContent-Length: {'9' * 5000}\r\n\r\n".encode())
    assert e.value.status == 400
    token = "9" * 5000 + ".1.x"
    assert ask(service(), f"GET /latest HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n")[0] == 401


def test_token_put_errors() -> None:
    svc = service()
    assert token(svc, "+0000000000000000000060")  # what Rust's u32 parse takes
    assert ask(svc, "PUT /latest/api/token HTTP/1.1\r\n\r\n")[0] == 400
    forwarded = "PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: a\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n"
    assert ask(svc, forwarded)[0] == 400
    assert ask(svc, "PUT /latest/other HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n")[0] == 404
    assert token(svc, "21600")


def test_v1_needs_no_token_and_status_codes() -> None:
    svc = service("V1")
    assert ask(svc, "GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")[:3:2] == (200, b"ami-1")
    assert ask(svc, "GET /latest/nothing HTTP/1.1\r\n\r\n")[0] == 404
    status, headers, _ = ask(svc, "POST /latest HTTP/1.1\r\n\r\n")
    assert (status, headers["allow"]) == (405, "GET, PUT")
    assert ask(svc, "DELETE /latest HTTP/1.1\r\n\r\n")[0] == 405
    assert ask(svc, "GET /latest/meta-data/n HTTP/1.1\r\n\r\n")[0] == 501  # a number has no IMDS form
    assert ask(svc, "GET /latest/meta-data/n HTTP/1.1\r\nAccept: application/json\r\n\r\n")[2] == b"3"


def test_imds_compat_ignores_accept_json() -> None:
    svc = service("V1", imds_compat=True)
    status, headers, body = ask(svc, "GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n")
    assert (status, headers["content-type"], body) == (200, "text/plain", b"meta-data/")


def test_empty_store_is_404() -> None:
    svc = MmdsService("V1")
    assert ask(svc, "GET / HTTP/1.1\r\n\r\n")[0] == 404


# --- the TCP stack -----------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stack(clock: Clock) -> MmdsStack:
    return MmdsStack(service("V1", clock), clock=clock)


def peer(stack: MmdsStack, port: int = 40000) -> GuestPeer:
    def transport(frame: bytes) -> list[bytes]:
        stack.receive(frame)
        return stack.take_output()

    return GuestPeer(transport, port=port)


def test_arp_for_the_mmds_address_is_answered(stack: MmdsStack) -> None:
    g = peer(stack)
    (reply,) = g.arp()
    eth = pk.parse_ethernet(reply)
    arp = pk.parse_arp(eth.payload)
    assert (eth.dst, arp.op, arp.sender_mac, arp.sender_ip, arp.target_ip) == (g.mac, 2, MMDS_MAC, g.mmds_ip, g.ip)


def test_get_over_tcp_with_keep_alive_then_fin(stack: MmdsStack) -> None:
    g = peer(stack)
    syn_ack = g.connect()
    assert syn_ack.mss == 1460
    raw = g.request("GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert http_body(raw)[::2] == (200, b"ami-1")
    g.received.clear()
    raw = g.request("GET /latest/meta-data/reservation-id HTTP/1.1\r\n\r\n")  # same connection
    assert http_body(raw)[2] == b"r-2"
    g.send(pk.TCP_FIN | pk.TCP_ACK)
    g.send(pk.TCP_ACK)
    assert g.fin_seen and not stack.conns
    assert stack.metrics["connections_created"] == stack.metrics["connections_destroyed"] == 1


def test_half_close_request_then_fin_is_still_answered(stack: MmdsStack) -> None:
    g = peer(stack)
    g.connect()
    raw = g.request("GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n", fin=True)
    assert http_body(raw)[2] == b"ami-1" and g.fin_seen
    assert not stack.conns


def test_out_of_order_segment_is_dropped_and_re_acked(stack: MmdsStack) -> None:
    g = peer(stack)
    g.connect()
    first, second = b"GET /latest HTTP/1.1\r\n", b"\r\n"
    (dup,) = g.send(pk.TCP_ACK, second, seq=g.seq + len(first))  # arrives before `first`
    assert dup.ack == g.seq and not dup.payload  # duplicate ACK for what is still missing
    g.send(pk.TCP_ACK, first)
    assert not g.received  # the request is not complete yet
    raw = g.request(second.decode())
    assert http_body(raw)[2] == b"meta-data/"


def test_rst_from_the_guest_drops_the_connection(stack: MmdsStack) -> None:
    g = peer(stack)
    g.connect()
    assert stack.conns
    g.send(pk.TCP_RST)
    assert not stack.conns


def test_segment_without_connection_gets_rst(stack: MmdsStack) -> None:
    g = peer(stack)
    (rst,) = g.send(pk.TCP_ACK, b"hello")
    assert rst.flags & pk.TCP_RST and not stack.conns


def test_zero_window_waits_then_probes_and_resumes(stack: MmdsStack, clock: Clock) -> None:
    g = peer(stack)
    g.connect()
    g.window = 0
    replies = g.send(pk.TCP_ACK | pk.TCP_PSH, b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert all(not r.payload for r in replies)  # nothing sent into a zero window
    clock.now += stack.next_timeout() or 0
    stack.on_timer()
    (probe,) = [r for f in stack.take_output() if (r := parse_reply(f))]
    assert len(probe.payload) == 1  # a one-byte window probe
    g.window = 65535
    g.absorb([probe])
    raw = g.request("")  # a window update; the rest follows
    assert http_body(raw)[2] == b"ami-1"


def test_lost_segment_is_retransmitted(stack: MmdsStack, clock: Clock) -> None:
    g = peer(stack)
    g.connect()
    lost = g.send(pk.TCP_ACK | pk.TCP_PSH, b"GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n")
    assert lost[0].payload
    g.received.clear()
    g.ack = lost[0].seq  # pretend it never arrived
    clock.now += stack.next_timeout() or 0
    stack.on_timer()
    g.absorb([r for f in stack.take_output() if (r := parse_reply(f))])
    assert http_body(bytes(g.received))[2] == b"ami-1"
    assert stack.metrics["retransmissions"] == 1


def test_too_large_request_resets_the_connection(stack: MmdsStack) -> None:
    g = peer(stack)
    g.connect()
    big = "GET / HTTP/1.1\r\nX-Pad: " + "a" * 1400
    while not g.rst_seen and g.seq < 1000 + 2 * MAX_REQUEST_BYTES:
        g.send(pk.TCP_ACK, big.encode())
        big = "a" * 1400
    assert g.rst_seen and not stack.conns


def test_unanswered_data_is_given_up_after_retries(stack: MmdsStack, clock: Clock) -> None:
    g = peer(stack)
    g.connect()
    g.send(pk.TCP_ACK | pk.TCP_PSH, b"GET /latest HTTP/1.1\r\n\r\n")
    for _ in range(10):
        clock.now += stack.next_timeout() or 0
        stack.on_timer()
    assert not stack.conns and stack.metrics["connections_reset"] == 1


def test_connection_limit_resets_extra_syns(stack: MmdsStack) -> None:
    for port in range(30):
        peer(stack, 1000 + port).connect()
    (rst,) = peer(stack, 5000).send(pk.TCP_SYN)
    assert rst.flags & pk.TCP_RST


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00" * 13,
        b"\xff" * 14 + b"\x08\x00",
        bytes(12) + b"\x08\x00" + b"\x45" + bytes(40),
        bytes(12) + b"\x08\x06" + bytes(10),
    ],
)
def test_malformed_frames_are_counted_not_raised(stack: MmdsStack, frame: bytes) -> None:
    stack.receive(frame)
    assert not stack.take_output()


def test_zero_window_pipelining_cannot_grow_the_send_buffer(clock: Clock) -> None:
    """The 554 KB attack: a guest that pipelines GETs of a big document and never opens its
    window. Requests wait once the send buffer is full; our window closes; nothing grows."""
    svc = MmdsService("V1", False, TokenAuthority(b"k" * 32, clock))
    svc.set_data(json.dumps({"big": "x" * 50_000}).encode())
    stack = MmdsStack(svc, clock=clock)
    g = peer(stack)
    g.connect()
    g.window = 0
    request = b"GET /big HTTP/1.1\r\n\r\n"
    batch = request * (1400 // len(request))
    sent = 0
    for _ in range(400):  # 560 KB offered
        replies = g.send(pk.TCP_ACK | pk.TCP_PSH, batch)
        sent += len(batch)
        if replies and replies[-1].window == 0:
            g.seq = replies[-1].ack  # what a real guest does at a zero window: wait, then probe
    (conn,) = stack.conns.values()
    answer = len(svc.handle(parse_request(request)[0]))  # type: ignore[index]
    assert sent > 500_000
    assert len(conn.unacked) < SEND_BUFFER_BYTES + answer
    assert len(conn.inbuf) <= MAX_REQUEST_BYTES
    assert stack.metrics["send_buffer_full"] > 0
    # the guest opens its window: the waiting requests are answered, in order
    g.window = 65535
    g.received.clear()
    for _ in range(20):
        g.send(pk.TCP_ACK)
    assert bytes(g.received).startswith(b"HTTP/1.1 200")
    assert len(conn.unacked) < SEND_BUFFER_BYTES + answer


def test_guest_fin_waits_for_the_requests_held_back(clock: Clock) -> None:
    svc = MmdsService("V1", False, TokenAuthority(b"k" * 32, clock))
    svc.set_data(json.dumps({"big": "x" * 50_000}).encode())
    stack = MmdsStack(svc, clock=clock)
    g = peer(stack)
    g.connect()
    g.window = 0
    g.send(pk.TCP_ACK | pk.TCP_PSH | pk.TCP_FIN, b"GET /big HTTP/1.1\r\n\r\n" * 3)
    g.window = 65535
    for _ in range(200):
        if g.fin_seen:
            break
        g.send(pk.TCP_ACK)
    assert g.fin_seen and bytes(g.received).count(b"HTTP/1.1 200") == 3


def test_a_token_outlives_the_worker_that_issued_it_when_the_supervisor_gives_the_key() -> None:
    # docs/faults.md, "Net": every worker of an interface gets the supervisor's token_key, so a
    # replacement accepts a token its dead predecessor issued; without the key each worker
    # would make its own and the guest's token would be refused (401) after a restart.
    from devices.net.worker import mmds_stack

    config = {"version": "V2", "document": json.dumps(DATA), "token_key": "ab" * 32}
    first, replacement = mmds_stack(config), mmds_stack(dict(config))
    assert first is not None and replacement is not None
    issued = token(first.service)
    get = f"GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {issued}\r\n\r\n"
    assert ask(replacement.service, get)[0] == 200
    other = mmds_stack({k: v for k, v in config.items() if k != "token_key"})
    assert other is not None and ask(other.service, get)[0] == 401
