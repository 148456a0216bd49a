"""UrlFetcher: SSRF refusals (no traffic at all), then real fetches from a server on 127.0.0.1 only."""
from __future__ import annotations

import pickle
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import raylens.fetch as fetch_module
from raylens.fetch import FetchError, UrlFetcher, is_public_address

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
SLOW_S = 3.0
TIMEOUT_S = 0.6


class _Handler(BaseHTTPRequestHandler):
    """Every route the tests need; it records each request's path and Host header."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.seen.append((self.path, self.headers.get("Host")))
        route = {
            "/img": lambda: self._send(200, PAYLOAD),
            "/host": lambda: self._send(200, self.headers.get("Host", "").encode()),
            "/redirect": lambda: self._redirect("/img"),
            "/redirect-absolute": lambda: self._redirect(f"http://127.0.0.1:{self.server.server_port}/img"),
            "/redirect-twice": lambda: self._redirect("/redirect"),
            "/redirect-loop": lambda: self._redirect("/redirect-loop"),
            "/redirect-file": lambda: self._redirect("file:///etc/passwd"),
            "/redirect-gopher": lambda: self._redirect("gopher://127.0.0.1:70/_x"),
            "/redirect-userinfo": lambda: self._redirect(f"http://u:p@127.0.0.1:{self.server.server_port}/img"),
            "/redirect-private": lambda: self._redirect("http://private.example/img"),
            "/redirect-nolocation": lambda: self._send(302, b""),
            "/missing": lambda: self._send(404, b"not here"),
            "/big": lambda: self._send(200, b"x" * 5000),
            "/big-undeclared": self._big_undeclared,
            "/short": self._short,
            "/slow": self._slow,
            "/drip": self._drip,
        }.get(self.path.split("?")[0])
        if route is None:
            self._send(404, b"no route")
        else:
            route()

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self._send(302, b"", [("Location", location)])

    def _big_undeclared(self):  # no Content-Length: the limit must hold while streaming
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"y" * 5000)
        self.close_connection = True

    def _short(self):  # promises 100 bytes, sends 10, hangs up
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        self.wfile.write(b"z" * 10)
        self.close_connection = True

    def _slow(self):
        time.sleep(SLOW_S)
        self._send(200, b"late")

    def _drip(self):  # each byte well within the socket timeout, the whole body far beyond the budget
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"d")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.block_on_close = False
    srv.seen = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def base(server):
    server.seen.clear()
    return f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def local_fetcher():
    return UrlFetcher(timeout_s=TIMEOUT_S, max_bytes=1000 * 1000, allow_private_networks=True)


@pytest.fixture
def no_connect(monkeypatch):
    """Fail the test if anything tries to open a TCP connection (refusals must send nothing)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


# ------------------------------------------------------------------------------- refusals, no traffic
@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x", "http://127.0.0.1:8080/x", "http://localhost/x", "http://LOCALHOST./x",
    "http://[::1]/x", "http://10.1.2.3/x", "http://192.168.0.1/x", "http://172.16.0.1/x",
    "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0/x", "http://[::]/x",
    "http://[::ffff:127.0.0.1]/x", "http://[::ffff:169.254.169.254]/x", "http://[fe80::1]/x",
    "http://[fc00::1]/x", "http://100.64.0.1/x", "http://224.0.0.1/x", "http://[ff02::1]/x",
    "http://2130706433/x", "http://127.1/x", "https://127.0.0.1/x",
])
def test_non_public_addresses_are_blocked(url, no_connect):
    with pytest.raises(FetchError) as info:
        UrlFetcher().fetch(url)
    assert info.value.kind == "blocked", info.value
    assert "non-public address" in str(info.value)


@pytest.mark.parametrize("url, kind", [
    ("file:///etc/passwd", "bad_url"), ("ftp://example.com/a.jpg", "bad_url"),
    ("gopher://example.com/_x", "bad_url"), ("data:image/png;base64,AAAA", "bad_url"),
    ("javascript:alert(1)", "bad_url"), ("/etc/passwd", "bad_url"), ("example.com/a.jpg", "bad_url"),
    ("http://user@example.com/a.jpg", "bad_url"), ("http://user:pw@example.com/a.jpg", "bad_url"),
    ("http://example.com@127.0.0.1/a.jpg", "bad_url"), ("http:///a.jpg", "bad_url"),
    ("http://example.com:99999/a.jpg", "bad_url"), ("http://example.com/a\r\nX-Injected: 1", "bad_url"),
])
def test_malformed_or_non_http_urls_are_refused(url, kind, no_connect):
    with pytest.raises(FetchError) as info:
        UrlFetcher().fetch(url)
    assert info.value.kind == kind, info.value


def test_a_name_resolving_to_loopback_is_blocked(monkeypatch, no_connect):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "innocent.example":
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(FetchError, match="innocent.example.*127.0.0.1") as info:
        UrlFetcher().fetch("https://innocent.example/a.jpg")
    assert info.value.kind == "blocked"


def test_one_private_address_among_public_ones_is_enough_to_block(monkeypatch, no_connect):
    def fake(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(FetchError, match="10.0.0.7") as info:
        UrlFetcher().fetch("http://mixed.example/a.jpg")
    assert info.value.kind == "blocked"


def test_allowlist_is_exact(no_connect):
    fetcher = UrlFetcher(allowed_domains=frozenset({"images.example.com"}))
    for url in ("http://evil.example.com/a.jpg", "http://images.example.com.evil.net/a.jpg",
                "http://sub.images.example.com/a.jpg"):
        with pytest.raises(FetchError, match="not in allowed_domains") as info:
            fetcher.fetch(url)
        assert info.value.kind == "blocked"


# Every IPv6 spelling that reaches an IPv4 address, and every special-purpose block, with why it is
# (not) public. The embedded IPv4 address decides for forms a host really translates or tunnels.
ADDRESSES = [
    # IPv4
    ("8.8.8.8", True, "public"),
    ("127.0.0.1", False, "loopback"),
    ("10.0.0.1", False, "private"),
    ("172.16.5.4", False, "private"),
    ("192.168.1.1", False, "private"),
    ("169.254.169.254", False, "link-local: cloud metadata"),
    ("100.64.0.1", False, "shared address space (CGNAT)"),
    ("0.1.2.3", False, "'this network' 0/8"),
    ("192.0.0.8", False, "IETF protocol assignments 192.0.0.0/24"),
    ("192.0.2.1", False, "documentation"),
    ("192.88.99.1", False, "6to4 relay anycast (deprecated)"),
    ("198.18.0.1", False, "benchmarking"),
    ("224.0.0.1", False, "multicast"),
    ("240.0.0.1", False, "reserved"),
    ("255.255.255.255", False, "broadcast"),
    # IPv6 native
    ("2606:4700:4700::1111", True, "global unicast"),
    ("::", False, "unspecified"),
    ("::1", False, "loopback"),
    ("fe80::1", False, "link-local"),
    ("fe80::1%eth0", False, "link-local with a zone id"),
    ("fe80::1%1", False, "link-local with a numeric zone id"),
    ("2606:4700:4700::1111%eth0", False, "a zone id makes any address scoped"),
    ("fec0::1", False, "site-local (deprecated)"),
    ("fc00::1", False, "unique local"),
    ("fd12:3456::1", False, "unique local"),
    ("ff02::1", False, "multicast, link scope"),
    ("ff0e::1", False, "multicast, global scope"),
    ("100::1", False, "discard-only"),
    ("2001:db8::1", False, "documentation"),
    ("3fff::1", False, "documentation (RFC 9637)"),
    ("2001:2::1", False, "benchmarking"),
    ("5f00::1", False, "SRv6 SIDs, not global unicast"),
    # IPv6 forms that embed IPv4
    ("::ffff:8.8.8.8", True, "IPv4-mapped, public inside"),
    ("::ffff:127.0.0.1", False, "IPv4-mapped loopback"),
    ("::ffff:10.0.0.1", False, "IPv4-mapped private"),
    ("::127.0.0.1", False, "IPv4-compatible (deprecated, ::/96)"),
    ("::10.0.0.1", False, "IPv4-compatible private"),
    ("::8.8.8.8", False, "IPv4-compatible: deprecated, refused whatever it embeds"),
    ("::ffff:0:127.0.0.1", False, "IPv4-translated (SIIT, ::ffff:0:0:0/96)"),
    ("64:ff9b::8.8.8.8", True, "NAT64 well-known prefix, public inside"),
    ("64:ff9b::127.0.0.1", False, "NAT64 well-known prefix, loopback inside"),
    ("64:ff9b::a9fe:a9fe", False, "NAT64 to the metadata address"),
    ("64:ff9b:1::808:808", False, "NAT64 local-use prefix 64:ff9b:1::/48 (never global)"),
    ("64:ff9b:1:7f00:0:100::", False, "NAT64 local-use prefix, loopback inside"),
    ("2002:808:808::1", True, "6to4, public inside"),
    ("2002:7f00:1::1", False, "6to4, loopback inside"),
    ("2002:a00:1::1", False, "6to4, private inside"),
    ("2002:a9fe:a9fe::1", False, "6to4, metadata inside"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False, "Teredo (2001::/32)"),
    ("2001:0:7f00:1::1", False, "Teredo, loopback server"),
    ("2600::5efe:7f00:1", False, "ISATAP interface id, loopback inside"),
    ("2600::200:5efe:a00:1", False, "ISATAP interface id (u bit), private inside"),
    ("2600::5efe:808:808", True, "ISATAP interface id, public inside"),
    ("fe80::5efe:a00:1", False, "ISATAP link-local"),
    # not addresses
    ("not-an-ip", False, "not an address"),
    ("", False, "empty"),
]


@pytest.mark.parametrize("address, public, why", ADDRESSES, ids=[a[0] or "empty" for a in ADDRESSES])
def test_address_classification(address, public, why):
    assert is_public_address(address) is public, why


# Unusual spellings of 127.0.0.1 and friends: whatever the resolver makes of them is checked.
@pytest.mark.parametrize("url", [
    "http://0x7f.1/x", "http://0x7f000001/x", "http://2130706433/x", "http://017700000001/x",
    "http://0177.0.0.1/x", "http://0177.0.0.01/x", "http://127.1/x", "http://127.0.1/x", "http://127.1./x",
    "http://127.0.0.1./x", "http://localhost./x", "http://0/x", "http://0.0.0.0./x", "http://0xa9.0xfe.0xa9.0xfe/x",
    "http://[::127.0.0.1]/x", "http://[::7f00:1]/x", "http://[0:0:0:0:0:0:127.0.0.1]/x", "http://[::ffff:7f00:1]/x",
    "http://[::ffff:0:127.0.0.1]/x", "http://[64:ff9b::127.0.0.1]/x", "http://[64:ff9b:1::a00:1]/x",
    "http://[2002:7f00:1::]/x", "http://[2001:0:7f00:1::1]/x", "http://[2600::5efe:7f00:1]/x",
    "http://[fe80::1%25eth0]/x", "http://[fe80::1%25lo]:8080/x", "http://[fec0::1]/x", "http://[ff0e::1]/x",
    "http://[::]/x", "http://[0::0]/x",
])
def test_unusual_spellings_of_internal_addresses_are_blocked(url, no_connect):
    with pytest.raises(FetchError) as info:
        UrlFetcher().fetch(url)
    assert info.value.kind == "blocked", info.value
    assert "non-public address" in str(info.value)


def test_settings_are_validated_and_the_fetcher_pickles():
    with pytest.raises(ValueError, match="timeout_s"):
        UrlFetcher(timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        UrlFetcher(max_bytes=0)
    with pytest.raises(ValueError, match="allowed_domains"):
        UrlFetcher(allowed_domains="example.com")
    fetcher = UrlFetcher(allowed_domains={"Example.COM."})
    assert fetcher.allowed_domains == frozenset({"example.com"})
    assert pickle.loads(pickle.dumps(fetcher)) == fetcher
    err = pickle.loads(pickle.dumps(FetchError("too_large", "big")))
    assert (type(err), err.kind, str(err)) == (FetchError, "too_large", "big")
    with pytest.raises(ValueError):
        FetchError("nope", "x")


# ------------------------------------------------------------------------------- a real local server
def test_default_settings_refuse_the_local_server_without_sending_anything(base, server):
    with pytest.raises(FetchError) as info:
        UrlFetcher().fetch(f"{base}/img")
    assert info.value.kind == "blocked"
    assert server.seen == []


def test_fetches_bytes(base, local_fetcher, server):
    assert local_fetcher.fetch(f"{base}/img?size=large") == PAYLOAD
    assert server.seen == [("/img?size=large", f"127.0.0.1:{server.server_port}")]


def test_follows_redirects_and_revalidates_each_hop(base, local_fetcher, server):
    assert local_fetcher.fetch(f"{base}/redirect") == PAYLOAD
    assert local_fetcher.fetch(f"{base}/redirect-absolute") == PAYLOAD
    assert local_fetcher.fetch(f"{base}/redirect-twice") == PAYLOAD
    assert [p for p, _ in server.seen] == ["/redirect", "/img", "/redirect-absolute", "/img",
                                           "/redirect-twice", "/redirect", "/img"]


def test_too_many_redirects(base, server):
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, max_redirects=1, allow_private_networks=True)
    with pytest.raises(FetchError, match="more than 1 redirects") as info:
        fetcher.fetch(f"{base}/redirect-twice")
    assert info.value.kind == "http_status"
    with pytest.raises(FetchError, match="redirect"):
        fetcher.fetch(f"{base}/redirect-loop")


@pytest.mark.parametrize("path, kind, text", [
    ("/redirect-file", "blocked", "file"),
    ("/redirect-gopher", "blocked", "gopher"),
    ("/redirect-userinfo", "bad_url", "credentials"),
    ("/redirect-nolocation", "http_status", "Location"),
])
def test_bad_redirects_are_refused_even_when_private_networks_are_allowed(base, local_fetcher, path, kind, text):
    with pytest.raises(FetchError, match=text) as info:
        local_fetcher.fetch(f"{base}{path}")
    assert info.value.kind == kind


def test_a_redirect_to_a_private_address_is_blocked_by_the_hop_check(base, monkeypatch, server):
    """A first hop that passes the address check, a second hop to a private address: the redirect is
    vetted like the first URL, and nothing is sent to 10.9.9.9."""
    real_getaddrinfo, real_is_public = socket.getaddrinfo, fetch_module.is_public_address

    def fake(host, *args, **kwargs):
        names = {"public.example": "127.0.0.1", "private.example": "10.9.9.9"}
        return real_getaddrinfo(names.get(host, host), *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    # pretend the test server's address is public, so the first hop goes through the default policy
    monkeypatch.setattr(fetch_module, "is_public_address", lambda a: a == "127.0.0.1" or real_is_public(a))
    with pytest.raises(FetchError, match="redirect from .* to .*10.9.9.9") as info:
        UrlFetcher(timeout_s=TIMEOUT_S).fetch(f"http://public.example:{server.server_port}/redirect-private")
    assert info.value.kind == "blocked"
    assert [p for p, _ in server.seen] == ["/redirect-private"]


def test_connects_to_the_vetted_address_and_sends_the_original_host(base, monkeypatch, server):
    """DNS rebinding: the name is resolved once; the second lookup (what a naive client would do) is
    never made, and the Host header still carries the name."""
    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, *args, **kwargs):
        if host == "rebind.example":
            lookups.append(host)
            return real("127.0.0.1" if len(lookups) == 1 else "10.9.9.9", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, allow_private_networks=True)
    body = fetcher.fetch(f"http://rebind.example:{server.server_port}/host")
    assert body == f"rebind.example:{server.server_port}".encode()
    assert lookups == ["rebind.example"]


def test_http_error_status(base, local_fetcher):
    with pytest.raises(FetchError, match="HTTP 404") as info:
        local_fetcher.fetch(f"{base}/missing")
    assert info.value.kind == "http_status"


@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_oversize_bodies_are_refused(base, path):
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, max_bytes=1000, allow_private_networks=True)
    with pytest.raises(FetchError, match="max_bytes 1000") as info:
        fetcher.fetch(f"{base}{path}")
    assert info.value.kind == "too_large"
    assert UrlFetcher(timeout_s=TIMEOUT_S, max_bytes=5000, allow_private_networks=True).fetch(f"{base}{path}") in (
        b"x" * 5000, b"y" * 5000)


def test_a_body_cut_short_is_a_network_error(base, local_fetcher):
    with pytest.raises(FetchError, match="short of Content-Length") as info:
        local_fetcher.fetch(f"{base}/short")
    assert info.value.kind == "network"


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_the_time_budget_covers_the_whole_fetch(base, local_fetcher, path):
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        local_fetcher.fetch(f"{base}{path}")
    assert info.value.kind == "timeout", info.value
    assert time.monotonic() - start < TIMEOUT_S + 1.0


def test_a_closed_port_is_a_network_error():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError) as info:
        UrlFetcher(timeout_s=TIMEOUT_S, allow_private_networks=True).fetch(f"http://127.0.0.1:{port}/x")
    assert info.value.kind == "network"


def test_https_to_a_plain_http_port_fails_the_handshake(base, server):
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, allow_private_networks=True)
    with pytest.raises(FetchError) as info:
        fetcher.fetch(f"https://127.0.0.1:{server.server_port}/img")
    assert info.value.kind == "network"


# ------------------------------------------------------------------------------- TLS on 127.0.0.1
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 whose self-signed certificate names only "tls.example"."""
    cert_path, key_path = _self_signed(tmp_path_factory.mktemp("tls"), "tls.example")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.daemon_threads = True
    srv.block_on_close = False
    srv.seen = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, cert_path
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _self_signed(directory, name):
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def tls_names(monkeypatch, tls_server):
    """Names for the TLS server: "tls.example" (what the certificate says) and "other.example"."""
    real = socket.getaddrinfo
    names = {"tls.example": "127.0.0.1", "other.example": "127.0.0.1"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real(names.get(host, host), *a, **k))
    return tls_server


def test_https_refuses_an_untrusted_certificate(tls_names):
    srv, _ = tls_names
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, allow_private_networks=True)
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED") as info:
        fetcher.fetch(f"https://tls.example:{srv.server_port}/img")
    assert info.value.kind == "network"


def test_https_uses_the_name_for_sni_and_the_certificate_check(tls_names, monkeypatch):
    """Trusting the test certificate: the pinned 127.0.0.1 connection succeeds for the name on the
    certificate, and fails for another name that resolves to the same address."""
    srv, cert_path = tls_names
    real = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda *a, **k: real(cafile=cert_path))
    fetcher = UrlFetcher(timeout_s=TIMEOUT_S, allow_private_networks=True)
    assert fetcher.fetch(f"https://tls.example:{srv.server_port}/host") == f"tls.example:{srv.server_port}".encode()
    with pytest.raises(FetchError, match="(?i)hostname mismatch|doesn't match|not valid for") as info:
        fetcher.fetch(f"https://other.example:{srv.server_port}/img")
    assert info.value.kind == "network"
