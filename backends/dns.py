"""DNS look-ups for service discovery (router/discovery.py), never blocking the event loop.

`resolve(name, record, port, nameserver)` returns the endpoints (address, port) a name stands for:
- record A: every A and AAAA address of `name`, each at `port`.
- record SRV: every SRV record's target at the record's port (priority and weight are not used: every
  target is an instance, and the router's own policy spreads the load); a target's addresses come from the reply's
  additional section when the server put them there (CoreDNS does for headless Services), else from A and
  AAAA queries of the target (an address-literal target is taken as is).

With `nameserver` ("ip[:port]", policies/urls.nameserver_address) the queries go straight to that server
over UDP, from a small client here: one question per datagram, recursion desired, an EDNS0 OPT record
offering 4096-byte replies, a random 16-bit id checked on the reply (the UDP socket is connected, so only
that server's datagrams arrive), and a retry over TCP when the reply is truncated. Without it, record A
asks the system resolver (`loop.getaddrinfo`, on the loop's thread pool: /etc/hosts, search domains and
all), and SRV, which getaddrinfo cannot ask, goes to the first `nameserver` of /etc/resolv.conf (give the
fully qualified name: no search domains are tried there).

Each query has its own deadline (`timeout_s`, default 1 s). Every failure (timeout, network error,
SERVFAIL/REFUSED, a malformed reply) raises `DnsError`; a name with no records (NXDOMAIN, or NOERROR and no
answer) is an empty list, not an error. CNAME chains are left to the recursive server: every A/AAAA
(or SRV) record of the answer section is taken, whatever its owner name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
from dataclasses import dataclass

from policies.urls import nameserver_address

A, CNAME, AAAA, SRV, OPT = 1, 5, 28, 33, 41
_NOERROR, _NXDOMAIN = 0, 3


class DnsError(Exception):
    """A look-up that failed (as opposed to one that found no records)."""


@dataclass(frozen=True, order=True)
class Endpoint:
    address: str      # an IP address (IPv6 without brackets)
    port: int

    @property
    def hostport(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Record:
    name: str         # owner name, lower case, no trailing dot
    rtype: int
    value: str | tuple[int, int, int, str]   # an address, a CNAME target, or SRV (priority, weight, port, target)


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


def encode_query(qid: int, name: str, qtype: int) -> bytes:
    """A standard query (RD set) for `name`/`qtype`, class IN, with an EDNS0 OPT record (4096-byte replies)."""
    try:
        labels = [label.encode("ascii") for label in _norm(name).split(".") if label]
    except UnicodeEncodeError:
        raise DnsError(f"{name!r} is not an ASCII name") from None
    if any(len(label) > 63 for label in labels):
        raise DnsError(f"a label of {name!r} is longer than 63 characters")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    return header + qname + struct.pack("!HH", qtype, 1) + b"\x00" + struct.pack("!HHIH", OPT, 4096, 0, 0)


def _read_name(data: bytes, at: int) -> tuple[str, int]:
    """The (possibly compressed) name at `at`, and the offset just past it in the record."""
    labels: list[str] = []
    end = None
    for _ in range(128):   # bounds a pointer loop
        n = data[at]
        if n & 0xC0 == 0xC0:
            end = at + 2 if end is None else end
            at = ((n & 0x3F) << 8) | data[at + 1]
            continue
        if n == 0:
            return ".".join(labels).lower(), (at + 1 if end is None else end)
        labels.append(data[at + 1:at + 1 + n].decode("ascii", "replace"))
        at += 1 + n
    raise DnsError("a name in the reply loops")


def _rdata(data: bytes, rtype: int, at: int, length: int) -> str | tuple[int, int, int, str] | None:
    if rtype == A and length == 4:
        return str(ipaddress.IPv4Address(data[at:at + 4]))
    if rtype == AAAA and length == 16:
        return str(ipaddress.IPv6Address(data[at:at + 16]))
    if rtype == SRV and length >= 7:
        prio, weight, port = struct.unpack_from("!HHH", data, at)
        return prio, weight, port, _read_name(data, at + 6)[0]
    if rtype == CNAME:
        return _read_name(data, at)[0]
    return None


def decode_response(data: bytes, qid: int) -> tuple[int, bool, list[Record], list[Record]]:
    """(rcode, truncated, answer records, additional records) of a reply to query `qid`."""
    try:
        rid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data, 0)
        if rid != qid or not flags & 0x8000:
            raise DnsError("the reply is not an answer to this query")
        at = 12
        for _ in range(qd):
            at = _read_name(data, at)[1] + 4
        sections: list[list[Record]] = [[], [], []]
        for section, count in zip(sections, (an, ns, ar), strict=True):
            for _ in range(count):
                name, at = _read_name(data, at)
                rtype, _cls, _ttl, length = struct.unpack_from("!HHIH", data, at)
                at += 10
                if at + length > len(data):
                    raise DnsError("a record runs past the end of the reply")
                value = _rdata(data, rtype, at, length)
                if value is not None:
                    section.append(Record(name, rtype, value))
                at += length
    except (IndexError, struct.error, ValueError) as exc:
        raise DnsError(f"malformed reply: {type(exc).__name__}") from None
    return flags & 0x000F, bool(flags & 0x0200), sections[0], sections[2]


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, qid: int, future: asyncio.Future[bytes]) -> None:
        self.qid = qid
        self.future = future

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.qid and not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:   # e.g. ICMP port unreachable: nobody listens there
        if not self.future.done():
            self.future.set_exception(exc)


async def _udp(server: tuple[str, int], packet: bytes, qid: int) -> bytes:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Reply(qid, future), remote_addr=server)
    try:
        transport.sendto(packet)
        return await future
    finally:
        transport.close()


async def _tcp(server: tuple[str, int], packet: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(len(packet).to_bytes(2, "big") + packet)
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()


async def query(server: tuple[str, int], name: str, qtype: int, timeout_s: float = 1.0) -> tuple[list[Record],
                                                                                                   list[Record]]:
    """(answers, additional records) for one question to `server`; [] answers for NXDOMAIN or no data."""
    qid = secrets.randbits(16)
    packet = encode_query(qid, name, qtype)
    try:
        async with asyncio.timeout(timeout_s):
            rcode, truncated, answers, extra = decode_response(await _udp(server, packet, qid), qid)
            if truncated:
                rcode, truncated, answers, extra = decode_response(await _tcp(server, packet), qid)
    except TimeoutError:
        raise DnsError(f"no answer from {server[0]}:{server[1]} within {timeout_s:g} s") from None
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise DnsError(f"{server[0]}:{server[1]}: {type(exc).__name__}: {exc}") from None
    if rcode == _NXDOMAIN:
        return [], []
    if rcode != _NOERROR:
        raise DnsError(f"{server[0]}:{server[1]} answered rcode {rcode} for {name}")
    return answers, extra


def system_nameserver(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    """The first `nameserver` of resolv.conf (blocking: call it off the loop)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    addr = parts[1].split("%")[0]   # a zone index (fe80::1%eth0) is not kept
                    found = nameserver_address(f"[{addr}]" if ":" in addr else addr)
                    if found is not None:
                        return found
    except OSError as exc:
        raise DnsError(f"cannot read {path}: {exc}") from None
    raise DnsError(f"{path} names no nameserver")


async def _addresses(server: tuple[str, int], name: str, timeout_s: float) -> list[str]:
    (a, _), (aaaa, _) = await asyncio.gather(query(server, name, A, timeout_s), query(server, name, AAAA, timeout_s))
    return [str(r.value) for r in a + aaaa if r.rtype in (A, AAAA)]


async def _system_addresses(name: str, port: int, timeout_s: float) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except TimeoutError:
        raise DnsError(f"the system resolver did not answer within {timeout_s:g} s") from None
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise DnsError(f"the system resolver: {exc}") from None
    return [str(info[4][0]).split("%")[0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


async def _srv(server: tuple[str, int], name: str, timeout_s: float) -> list[Endpoint]:
    answers, extra = await query(server, name, SRV, timeout_s)
    targets = [(r.value[3], r.value[2]) for r in answers if r.rtype == SRV and isinstance(r.value, tuple)]
    known: dict[str, list[str]] = {}
    for r in extra:
        if r.rtype in (A, AAAA):
            known.setdefault(r.name, []).append(str(r.value))

    async def addresses(target: str) -> list[str]:
        try:
            return [str(ipaddress.ip_address(target))]
        except ValueError:
            pass
        return known.get(target) or await _addresses(server, target, timeout_s)

    found = await asyncio.gather(*(addresses(t) for t, _ in targets))
    return [Endpoint(addr, port) for (_, port), addrs in zip(targets, found, strict=True) for addr in addrs]


async def resolve(name: str, record: str, port: int | None, nameserver: str | None,
                  timeout_s: float = 1.0) -> list[Endpoint]:
    """The endpoints `name` stands for, sorted and without duplicates (module header); DnsError on failure."""
    server = nameserver_address(nameserver) if nameserver is not None else None
    if nameserver is not None and server is None:
        raise DnsError(f"not a nameserver address: {nameserver!r}")
    if record == "SRV":
        if server is None:
            server = await asyncio.to_thread(system_nameserver)
        found = await _srv(server, name, timeout_s)
    elif record == "A" and port is not None:
        addrs = await (_addresses(server, name, timeout_s) if server is not None else
                       _system_addresses(name, port, timeout_s))
        found = [Endpoint(addr, port) for addr in addrs]
    else:
        raise DnsError(f"record {record!r} (with port {port}) is not one tiergate resolves")
    return sorted(set(found))
