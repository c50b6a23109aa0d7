"""Ethernet, ARP, IPv4 and TCP: the little of each the in-worker MMDS stack parses and builds.

Parsing never trusts a length field: every parser checks what it reads against the bytes it
was given and raises `PacketError` (the guest's fault; the frame is dropped and counted).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HEADER = 14
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_TCP = 6
BROADCAST = b"\xff" * 6

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")


class PacketError(Exception):
    """A malformed frame."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes


def parse_ethernet(frame: bytes) -> Ethernet:
    if len(frame) < ETH_HEADER:
        raise PacketError(f"a {len(frame)}-byte frame has no Ethernet header")
    return Ethernet(frame[0:6], frame[6:12], struct.unpack_from("!H", frame, 12)[0], frame[ETH_HEADER:])


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse_arp(payload: bytes) -> Arp:
    if len(payload) < _ARP.size:
        raise PacketError("truncated ARP packet")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        raise PacketError("ARP packet is not Ethernet/IPv4")
    return Arp(op, sha, spa, tha, tpa)


def arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    return _ARP.pack(1, ETH_P_IP, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)


@dataclass(frozen=True)
class Ipv4:
    src: bytes
    dst: bytes
    protocol: int
    payload: bytes


def parse_ipv4(packet: bytes) -> Ipv4:
    if len(packet) < _IPV4.size:
        raise PacketError("truncated IPv4 header")
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    ihl = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or ihl < _IPV4.size or total < ihl or total > len(packet):
        raise PacketError("bad IPv4 version, header length or total length")
    if frag & 0x3FFF:  # MF set or a fragment offset: the MMDS stack takes no fragments
        raise PacketError("IPv4 fragment")
    return Ipv4(src, dst, proto, packet[ihl:total])


def ipv4(src: bytes, dst: bytes, protocol: int, payload: bytes, ident: int = 0) -> bytes:
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(payload), ident & 0xFFFF, 0x4000, 64, protocol, 0, src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


@dataclass(frozen=True)
class Tcp:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None
    payload: bytes


def parse_tcp(segment: bytes) -> Tcp:
    """A TCP segment (the checksum is not verified: the guest may leave it to offload)."""
    if len(segment) < _TCP.size:
        raise PacketError("truncated TCP header")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _TCP.unpack_from(segment)
    hlen = (off >> 4) * 4
    if hlen < _TCP.size or hlen > len(segment):
        raise PacketError("bad TCP data offset")
    return Tcp(sport, dport, seq, ack, flags & 0x3F, window, _mss_option(segment[_TCP.size : hlen]), segment[hlen:])


def _mss_option(options: bytes) -> int | None:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            return None
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            return None
        length = options[i + 1]
        if kind == 2 and length == 4 and i + 4 <= len(options):
            return int(struct.unpack_from("!H", options, i + 2)[0])
        i += length
    return None


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: bytes = b"",
    mss: int | None = None,
) -> bytes:
    """A TCP segment with its checksum over the IPv4 pseudo-header."""
    options = struct.pack("!BBH", 2, 4, mss) if mss is not None else b""
    off = (_TCP.size + len(options)) // 4 << 4
    header = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off, flags, window, 0, 0) + options
    pseudo = src + dst + struct.pack("!BBH", 0, IPPROTO_TCP, len(header) + len(payload))
    csum = checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", csum) + header[18:] + payload
