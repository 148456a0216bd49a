"""Fetch untrusted http(s) image URLs without letting them reach anything but the public internet.

Why this module exists: a manifest row's URL is data from strangers (scraped data sets carry millions
of them). Fetched naively from a cluster node, such a URL can read the cloud metadata service
(169.254.169.254), an internal admin page, or a local file, and a slow or endless body can stall a
worker forever. :class:`UrlFetcher` applies these rules to every URL *and to every redirect hop*:

* only ``http`` and ``https``; no credentials in the URL (``http://user@host``); no control characters;
* ``allowed_domains``, when set, is an exact host allowlist (no subdomain wildcards);
* the host is resolved once with ``getaddrinfo`` and refused if ANY address is not public, unless
  ``allow_private_networks`` (tests and trusted deployments only). "Public" is decided by our own
  tables (:func:`is_public_address`), not by the Python version's ``is_global``: for IPv4, everything
  outside the special-purpose blocks of RFC 6890 and later (loopback, private, link-local incl.
  metadata, shared/CGNAT, "this network", IETF protocol assignments, documentation, benchmarking,
  6to4 relay anycast, multicast, reserved, broadcast); for IPv6, only global unicast ``2000::/3``
  minus its special-purpose blocks (Teredo and the rest of ``2001::/23``, documentation), plus the
  forms a host really translates or tunnels to IPv4, which are judged by the IPv4 address inside
  (IPv4-mapped ``::ffff:0:0/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, ISATAP interface ids).
  So IPv4-compatible ``::a.b.c.d``, SIIT ``::ffff:0:a.b.c.d``, local-use NAT64 ``64:ff9b:1::/48``,
  unique-local, site-local, link-local, multicast and unspecified addresses are all refused, and so
  is any address with a zone id (``fe80::1%eth0``: only scoped addresses have one). Unusual IPv4
  spellings (``0x7f.1``, ``2130706433``, ``0177.0.0.1``, ``127.1``, a trailing dot) need no rule
  of their own: the check judges the address the resolver turned them into, and that address is the
  one connected to;
* the connection goes to the vetted address itself, never to the name again (a DNS answer that
  changes between check and connect -- "DNS rebinding" -- cannot slip through), while the request
  carries the original ``Host`` header and, for https, SNI and certificate checks use the host name;
* redirects are followed by hand, at most ``max_redirects``, each hop vetted like the first;
* the body is streamed and refused past ``max_bytes``; ``timeout_s`` is the budget of the whole fetch
  (all hops, headers and body), enforced by a watchdog that shuts the socket, so a server dripping one
  byte at a time cannot hold a worker longer than that.

Environment proxies (``HTTP_PROXY``...) are not used: a proxy would resolve the name itself and undo
the address check. Only the standard library is used. A fetcher holds plain settings and opens nothing
until :meth:`UrlFetcher.fetch`, so it pickles into Ray tasks.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from raylens.errors import KindError

FETCH_ERROR_KINDS = frozenset({"blocked", "bad_url", "http_status", "too_large", "timeout", "network"})
ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
_CHUNK = 64 * 1024
# RFC 3986 reserved + unreserved characters and "%": what may stay as is in a request target.
_SAFE_URL_CHARS = "/?#[]@!$&'()*+,;=-._~:%"
# IPv4 blocks that are not publicly routable unicast (RFC 6890 registry, RFC 7526, RFC 8190).
_IPV4_NON_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
))
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix; 64:ff9b:1::/48 is local-use
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# Special-purpose blocks inside 2000::/3 (IETF protocol assignments incl. Teredo 2001::/32, ORCHID and
# benchmarking; documentation 2001:db8::/32 and 3fff::/20).
_IPV6_NON_PUBLIC = tuple(ipaddress.ip_network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20"))


class FetchError(KindError):
    """A URL that could not be fetched; ``kind`` is one of "blocked" (refused by policy: address,
    allowlist, redirect scheme), "bad_url", "http_status", "too_large", "timeout", "network". It
    pickles with its kind, so it survives crossing Ray processes."""

    KINDS = FETCH_ERROR_KINDS


@dataclass(frozen=True)
class _Target:
    """One vetted hop: where to connect (addresses) and what to ask for (host, port, path)."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    request_target: str
    addresses: tuple[tuple, ...]  # getaddrinfo tuples, all vetted


@dataclass(frozen=True)
class UrlFetcher:
    """Plain settings for fetching untrusted http(s) URLs; see the module docstring for the rules."""

    timeout_s: float = 10.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = 3
    allowed_domains: frozenset[str] | None = None
    allow_private_networks: bool = False  # ONLY for tests and trusted deployments
    user_agent: str = "raylens/0.1 (+batch image captioning)"

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"UrlFetcher.timeout_s must be a number > 0, got {self.timeout_s!r}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"UrlFetcher.max_bytes must be an int >= 1, got {self.max_bytes!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"UrlFetcher.max_redirects must be an int >= 0, got {self.max_redirects!r}")
        if not isinstance(self.allow_private_networks, bool):
            raise ValueError(f"UrlFetcher.allow_private_networks must be a bool, got {self.allow_private_networks!r}")
        if self.allowed_domains is not None:
            object.__setattr__(self, "allowed_domains", _normalize_domains(self.allowed_domains))

    # ------------------------------------------------------------------------------------ public
    def fetch(self, url: str) -> bytes:
        """The body of a 2xx answer to GET ``url``, following vetted redirects; raises FetchError."""
        deadline = time.monotonic() + self.timeout_s
        current = url
        for hop in range(self.max_redirects + 1):
            target = self._vet(current, original=url, redirect=hop > 0)
            status, reason, location, body = self._exchange(target, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise FetchError("http_status", f"{_show(current)}: HTTP {status} redirect without a Location header")
                current = urljoin(target.url, location.strip())
                continue
            if 200 <= status < 300:
                assert body is not None
                return body
            raise FetchError("http_status", f"{_show(current)}: HTTP {status} {reason}".rstrip())
        raise FetchError("http_status", f"{_show(url)}: more than {self.max_redirects} redirects (last to {_show(current)})")

    # ------------------------------------------------------------------------------------ vetting
    def _vet(self, url: str, *, original: str, redirect: bool) -> _Target:
        """Parse and check one hop's URL, resolve its host and check every address."""
        where = f"redirect from {_show(original)} to {_show(url)}" if redirect else _show(url)
        if not isinstance(url, str):
            raise FetchError("bad_url", f"URL must be a string, got {type(url).__name__}")
        url = url.strip()
        if any(ord(c) < 0x21 and c != " " or ord(c) == 0x7F for c in url):
            raise FetchError("bad_url", f"{where}: control characters in URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError("bad_url", f"{where}: malformed URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            # A redirect off http(s) is the server steering us (to file:, gopher:, ...): a policy refusal.
            kind = "blocked" if redirect else "bad_url"
            shown = f"scheme {scheme!r}" if scheme else "no scheme"
            raise FetchError(kind, f"{where}: {shown} refused, only http and https are fetched")
        if "@" in parts.netloc:
            raise FetchError("bad_url", f"{where}: credentials (user@host) in URLs are refused")
        host = _ascii_host(parts, where)
        if self.allowed_domains is not None and host not in self.allowed_domains:
            raise FetchError("blocked", f"{where}: host {host!r} is not in allowed_domains")
        port = port or (443 if scheme == "https" else 80)
        if ":" in host and not self.allow_private_networks and not is_public_address(host):
            # An IPv6 literal, judged as written: a zone id ("fe80::1%25eth0") would otherwise reach
            # the resolver, which may not even parse it.
            raise FetchError("blocked", f"{where}: host {host!r} is a non-public address")
        addresses = self._resolve(host, port, where)
        return _Target(url=url, scheme=scheme, host=host, port=port,
                       request_target=_request_target(parts), addresses=addresses)

    def _resolve(self, host: str, port: int, where: str) -> tuple[tuple, ...]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError("network", f"{where}: cannot resolve host {host!r} ({exc})") from None
        if not infos:
            raise FetchError("network", f"{where}: host {host!r} resolves to no address")
        if not self.allow_private_networks:
            for info in infos:
                address = info[4][0]
                if not is_public_address(address):
                    raise FetchError("blocked", f"{where}: host {host!r} resolves to non-public address {address}")
        return tuple(infos)

    # ------------------------------------------------------------------------------------ exchange
    def _exchange(self, target: _Target, deadline: float) -> tuple[int, str, str | None, bytes | None]:
        """One GET: (status, reason, Location, body); the body only for 2xx answers."""
        sock = _connect(target, deadline)
        watchdog = _Watchdog(sock, deadline - time.monotonic())
        conn: http.client.HTTPConnection | None = None
        try:
            if target.scheme == "https":
                context = ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=target.host)
                watchdog.sock = sock
                conn = http.client.HTTPSConnection(target.host, target.port, context=context)
            else:
                conn = http.client.HTTPConnection(target.host, target.port)
            conn.sock = sock  # already connected to the vetted address: http.client will not resolve the name
            sock.settimeout(_remaining(deadline, target))
            conn.putrequest("GET", target.request_target)  # adds Host (the name) and Accept-Encoding: identity
            conn.putheader("User-Agent", self.user_agent)
            conn.putheader("Accept", "image/*, */*;q=0.5")
            conn.putheader("Connection", "close")
            conn.endheaders()
            response = conn.getresponse()
            status, reason = response.status, response.reason or ""
            if status in REDIRECT_STATUSES or not 200 <= status < 300:
                return status, reason, response.getheader("Location"), None
            return status, reason, None, self._read_body(response, sock, target, deadline, watchdog)
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001 - socket, ssl and http.client errors of one hop
            if watchdog.fired or isinstance(exc, TimeoutError) or time.monotonic() >= deadline:
                raise FetchError("timeout", f"{_show(target.url)}: no complete answer within {self.timeout_s}s") from None
            raise FetchError("network", f"{_show(target.url)}: {type(exc).__name__}: {exc}") from None
        finally:
            watchdog.cancel()
            if conn is not None:
                conn.close()
            sock.close()

    def _read_body(self, response: http.client.HTTPResponse, sock: socket.socket, target: _Target,
                   deadline: float, watchdog: "_Watchdog") -> bytes:
        declared = response.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > self.max_bytes:
            raise FetchError("too_large", f"{_show(target.url)}: Content-Length {int(declared)} is more than "
                             f"max_bytes {self.max_bytes}")
        chunks, total = [], 0
        while True:
            sock.settimeout(_remaining(deadline, target))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > self.max_bytes:
                raise FetchError("too_large", f"{_show(target.url)}: body is more than max_bytes {self.max_bytes}")
            chunks.append(chunk)
        if watchdog.fired:  # the watchdog's shutdown looks like an early end of the body
            raise TimeoutError(f"time budget spent on {target.url}")
        if response.length:  # read1 ends quietly when the server closes before Content-Length bytes
            raise FetchError("network", f"{_show(target.url)}: connection closed after {total} bytes, "
                             f"{response.length} short of Content-Length")
        return b"".join(chunks)


# ---------------------------------------------------------------------------------------- helpers
def is_public_address(address: str) -> bool:
    """True only for a globally routable unicast address (see the module docstring for the tables).

    IPv6 forms that reach an IPv4 address are judged by that address; an address with a zone id
    (``%eth0``) is refused outright. Python's own ``is_global`` must agree too, so a block a newer
    Python learns about is refused without a change here."""
    if not isinstance(address, str) or "%" in address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip.is_global and not any(ip in net for net in _IPV4_NON_PUBLIC)
    embedded = _embedded_ipv4(ip)
    if ip in _IPV4_MAPPED or ip in _NAT64:  # the host connects to the IPv4 address itself
        return embedded is not None and is_public_address(str(embedded))
    if ip not in _IPV6_GLOBAL_UNICAST or any(ip in net for net in _IPV6_NON_PUBLIC):
        return False
    if embedded is not None and not is_public_address(str(embedded)):  # 6to4, ISATAP
        return False
    return ip.is_global and not ip.is_multicast


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries in a form that reaches it (mapped, NAT64, 6to4, ISATAP)."""
    value = int(ip)
    if ip in _IPV4_MAPPED or ip in _NAT64:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ip.sixtofour
    # ISATAP interface id (RFC 5214): [00|02|01|03]00:5efe:a.b.c.d in the low 64 bits, any prefix.
    if (value >> 32) & 0xFCFFFFFF == 0x00005EFE:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


def _normalize_domains(domains: Iterable[str]) -> frozenset[str]:
    if isinstance(domains, str):
        raise ValueError(f"UrlFetcher.allowed_domains must be a set of host names, not the string {domains!r}")
    out = set()
    for d in domains:
        if not isinstance(d, str) or not d.strip():
            raise ValueError(f"UrlFetcher.allowed_domains holds a non-host entry {d!r}")
        name = d.strip().lower().rstrip(".")
        try:
            out.add(name if ":" in name else name.encode("idna").decode("ascii"))
        except UnicodeError as exc:
            raise ValueError(f"UrlFetcher.allowed_domains entry {d!r} is not a valid host name ({exc})") from None
    return frozenset(out)


def _ascii_host(parts: SplitResult, where: str) -> str:
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError("bad_url", f"{where}: no host in URL")
    if ":" in host:  # IPv6 literal (urlsplit already dropped the brackets)
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise FetchError("bad_url", f"{where}: host {host!r} is not a valid domain name ({exc})") from None


def _request_target(parts: SplitResult) -> str:
    path = quote(parts.path or "/", safe=_SAFE_URL_CHARS)
    return f"{path}?{quote(parts.query, safe=_SAFE_URL_CHARS)}" if parts.query else path


def _remaining(deadline: float, target: _Target) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"time budget spent on {target.url}")
    return left


def _connect(target: _Target, deadline: float) -> socket.socket:
    """A TCP connection to the first vetted address that answers (never to the name)."""
    last: Exception | None = None
    for family, _, proto, _, sockaddr in target.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.settimeout(_remaining(deadline, target))
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            sock.close()
            raise FetchError("timeout", f"{_show(target.url)}: connecting to {sockaddr[0]} timed out") from None
        except OSError as exc:
            sock.close()
            last = exc
    raise FetchError("network", f"{_show(target.url)}: cannot connect to {target.host}:{target.port} ({last})")


class _Watchdog:
    """Shuts the socket when the fetch's time budget is spent, whatever http.client is blocked in."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock = sock
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        try:
            # The plain socket's shutdown, also for an SSLSocket: unblocks a pending read without
            # touching the TLS state another thread is using.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _show(url: object, limit: int = 200) -> str:
    """A URL for an error message: repr-quoted (control characters visible) and shortened."""
    text = repr(url)
    return text if len(text) <= limit else text[: limit - 3] + "..."
