"""Strict checks of the endpoints a policy names: instance base URLs and KV-event ZMQ endpoints.

Each check returns None when the text is acceptable, else a message for `semantic_errors`. Messages never
echo the text itself: a URL may carry a secret, and policy errors are logged.

Instance URL: `http(s)://host[:port][/path]`, exactly.
- Every character is printable ASCII (0x21..0x7e): no space, no control character (a CR LF after the host
  would smuggle a header into every upstream request), no non-ASCII (write an IDN host in punycode).
- The scheme is `http` or `https`, lower case.
- host: a DNS name (labels of letters, digits and `-`, each 1-63 long, at most 253 in all; an underscore
  is tolerated, as in some cluster service names), an IPv4 address, or an IPv6 address in brackets.
- port: 1-65535, ASCII digits.
- path: RFC 3986 path characters (unreserved, `%XX`, sub-delims, `:`, `@`, `/`).
- Refused: userinfo (`user:pass@host`: credentials in a URL end up in logs and error messages, and
  `http://good@evil` reads as good but goes to evil; tiergate sends no upstream credentials), a query
  (`?`) and a fragment (`#`) (the router appends `/v1/...` to the base URL).

Discovery (`discover:` of a tier): `dns` is a DNS name (not an address); `nameserver` is an IP address
(IPv6 in brackets) with an optional `:port` (default 53), since the router speaks DNS to it directly.

KV-event endpoint (the router connects a ZMQ SUB socket to it): `tcp://host:port`, with host as above
(no `*`: a subscriber connects, it does not bind), or `ipc://<path>` (printable ASCII, no space).
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.schema import DiscoverSpec

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_PATH = re.compile(r"^(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)*$")
_DIGITS = re.compile(r"^[0-9]{1,5}$")


def _printable_ascii(text: str) -> bool:
    return all(0x21 <= ord(ch) <= 0x7E for ch in text)


def host_error(host: str) -> str | None:
    """None for a DNS name, an IPv4 address or a bracketed IPv6 address."""
    if host.startswith("["):
        if not host.endswith("]"):
            return "an IPv6 host must be in brackets"
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return "the bracketed host is not an IPv6 address"
        return None
    if not host:
        return "has no host"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "the host is not a valid IPv4 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        return "the host must be a DNS name (letters, digits, '-'), an IPv4 address or a bracketed IPv6 address"
    return None


def _host_port(netloc: str, need_port: bool) -> str | None:
    if "@" in netloc:
        return "must not carry user info (user:password@): tiergate sends no upstream credentials"
    if netloc.startswith("["):
        host, bracket, rest = netloc.partition("]")
        if not bracket:
            return "an IPv6 host must be in brackets"
        host += "]"
        if rest and not rest.startswith(":"):
            return "unexpected text after the bracketed IPv6 host"
        port = rest[1:] if rest else None
    else:
        host, sep, port_text = netloc.partition(":")
        port = port_text if sep else None
    err = host_error(host)
    if err:
        return err
    if port is None:
        return "needs a port (host:port)" if need_port else None
    if not _DIGITS.match(port) or not 1 <= int(port) <= 65535:
        return "the port must be a number from 1 to 65535"
    return None


def http_url_error(url: str) -> str | None:
    """None when `url` is `http(s)://host[:port][/path]` as the module header says; else why not."""
    if not url or not _printable_ascii(url):
        return "must be printable ASCII with no spaces or control characters (http(s)://host[:port][/path])"
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https"):
        return "must start with http:// or https:// (lower case)"
    if "?" in rest or "#" in rest:
        return "must not have a query (?) or fragment (#): give the base URL, http(s)://host[:port][/path]"
    netloc, slash, path = rest.partition("/")
    err = _host_port(netloc, need_port=False)
    if err:
        return err
    if not _PATH.match(slash + path):
        return "the path has characters a URL path cannot (use %XX escapes)"
    try:        # and urllib reads the same host and path (a cross-check of the split above)
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a URL urllib can read"
    if (parts.netloc, parts.path) != (netloc, slash + path):
        return "is read differently by urllib; write http(s)://host[:port][/path]"
    return None


def zmq_endpoint_error(endpoint: str) -> str | None:
    """None for `tcp://host:port` or `ipc://path`; else why not."""
    if not endpoint or not _printable_ascii(endpoint):
        return "must be printable ASCII with no spaces or control characters (tcp://host:port or ipc://path)"
    scheme, sep, rest = endpoint.partition("://")
    if scheme == "ipc" and sep:
        return None if rest else "an ipc:// endpoint needs a path"
    if scheme != "tcp" or not sep:
        return "must be a ZMQ endpoint (tcp://host:port or ipc://path)"
    if "/" in rest or "?" in rest or "#" in rest:
        return "a tcp:// endpoint is host:port only"
    return _host_port(rest, need_port=True)


def tcp_port(endpoint: str) -> int | None:
    """The port of a valid `tcp://host:port` endpoint (None for ipc://)."""
    if not endpoint.startswith("tcp://"):
        return None
    return int(endpoint.rsplit(":", 1)[1])


def instance_endpoint_errors(url: str, kv_events: str | None, dp_ranks: int) -> list[tuple[str, str]]:
    """(field, message) for an instance's `url`, `kv_events` and `kv_events_dp_ranks`."""
    errs: list[tuple[str, str]] = []
    url_err = http_url_error(url)
    if url_err:
        errs.append(("url", url_err))
    kv_err = None if kv_events is None else zmq_endpoint_error(kv_events)
    if kv_err:
        errs.append(("kv_events", kv_err))
    port = None if kv_events is None or kv_err else tcp_port(kv_events)
    if not 1 <= dp_ranks <= 256 or (dp_ranks > 1 and (port is None or port + dp_ranks - 1 > 65535)):
        errs.append(("kv_events_dp_ranks", "must be 1..256; above 1 needs a tcp://host:port kv_events "
                     "(rank r adds r to the port, which must stay <= 65535)"))
    return errs


_NAMESERVER = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([0-9.]+)(?::([0-9]{1,5}))?")


def nameserver_address(text: str) -> tuple[str, int] | None:
    """(address, port) of a `nameserver`: "ip", "ip:port", "[ipv6]" or "[ipv6]:port" (port 53 if left out);
    None when it is none of these."""
    m = _NAMESERVER.fullmatch(text)
    if m is None:
        return None
    v6, v6_port, v4, v4_port = m.groups()
    try:
        host = str(ipaddress.IPv6Address(v6) if v6 is not None else ipaddress.IPv4Address(v4))
    except ValueError:
        return None
    port = int(v6_port or v4_port or 53)
    return (host, port) if 1 <= port <= 65535 else None


def discover_errors(spec: DiscoverSpec) -> list[tuple[str, str]]:
    """(field, message) for a tier's `discover` section."""
    errs: list[tuple[str, str]] = []
    dns_err = host_error(spec.dns) if _printable_ascii(spec.dns) else "must be printable ASCII"
    if dns_err or spec.dns.startswith("[") or re.fullmatch(r"[0-9.]+", spec.dns):
        errs.append(("dns", "must be a DNS name to resolve (letters, digits, '-', '.'), not an address"))
    if spec.record not in ("A", "SRV"):
        errs.append(("record", "must be A (every A/AAAA address, at `port`) or SRV (every target:port)"))
    if spec.record == "A" and spec.port is None:
        errs.append(("port", "record A needs the port the instances listen on"))
    elif spec.record == "SRV" and spec.port is not None:
        errs.append(("port", "SRV records carry their own ports: leave `port` out"))
    elif spec.port is not None and not 1 <= spec.port <= 65535:
        errs.append(("port", "must be a number from 1 to 65535"))
    if spec.scheme not in ("http", "https"):
        errs.append(("scheme", "must be http or https"))
    if not (math.isfinite(spec.interval_s) and spec.interval_s >= 0.5):
        errs.append(("interval_s", "must be >= 0.5 (seconds)"))
    kv = spec.kv_events_port
    if kv is not None and not 1 <= kv <= 65535:
        errs.append(("kv_events_port", "must be a number from 1 to 65535"))
    if not 1 <= spec.kv_events_dp_ranks <= 256 or (spec.kv_events_dp_ranks > 1 and (
            kv is None or kv + spec.kv_events_dp_ranks - 1 > 65535)):
        errs.append(("kv_events_dp_ranks", "must be 1..256; above 1 needs kv_events_port "
                     "(rank r adds r to the port, which must stay <= 65535)"))
    if spec.nameserver is not None and nameserver_address(spec.nameserver) is None:
        errs.append(("nameserver", "must be an IP address with an optional port: 10.96.0.10, 10.96.0.10:53 "
                     "or [fd00::10]:53"))
    return errs
