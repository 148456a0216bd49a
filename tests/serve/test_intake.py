"""Image intake rules (no Serve needed): data URLs, http(s) under the fetcher's SSRF defences, s3 buckets."""
from __future__ import annotations

import base64
import http.server
import threading

import pytest

from conftest import bomb_png, image_bytes
from raylens.checkpoints.formats import ModelSpec
from raylens.checkpoints.resolve import demo_model_dir
from serve.chat import ImageRef
from serve.config import ServeConfig
from serve.errors import ApiError
from serve.intake import ImageIntake

SPEC = ModelSpec.from_dir(demo_model_dir())
PNG = image_bytes((64, 48))


@pytest.fixture(scope="module")
def http_server():
    """A loopback HTTP server: /cat.png, /big.png (too many bytes), /redirect (to /cat.png)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            body = {"/cat.png": PNG, "/big.png": b"\x89PNG" + b"\0" * 50_000}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def intake(**config) -> ImageIntake:
    return ImageIntake(ServeConfig(**config), SPEC)


def load(i: ImageIntake, url: str, max_tiles=None):
    return i.load_one(ImageRef(url, "messages[0].content[0].image_url.url", max_tiles))


def refused(i: ImageIntake, url: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        load(i, url)
    assert info.value.param == "messages[0].content[0].image_url.url"
    return info.value


def test_data_urls_decode_like_the_batch_job():
    from raylens.images import decode_prepared

    prepared = load(intake(), "data:image/png;base64," + base64.b64encode(PNG).decode(), max_tiles=1)
    expected = decode_prepared(PNG, SPEC.tiling(1))
    assert prepared.grid == expected.grid and (prepared.pixels == expected.pixels).all()
    # base64 wrapped over lines (as MIME writes it) is still a data URL
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[k:k + 60] for k in range(0, len(encoded), 60))
    assert load(intake(), "data:image/png;base64," + wrapped).original_size == (64, 48)


@pytest.mark.parametrize("url,status,code", [
    ("data:image/png;base64,***", 400, "invalid_base64"),
    ("data:image/png;base64,", 400, "image_empty"),
    ("data:no-comma", 400, "invalid_data_url"),
    ("data:," + "A" * 10, 400, "image_not_an_image"),
    ("data:image/png;base64," + base64.b64encode(bomb_png()).decode(), 413, "image_too_large"),
    ("file:///etc/passwd", 400, "image_url_scheme"),
    ("/etc/passwd", 400, "image_url_scheme"),
    ("ftp://example.com/a.png", 400, "image_url_scheme"),
    ("s3://not-configured/a.png", 400, "image_bucket_refused"),
    ("http://127.0.0.1/a.png", 400, "image_fetch_blocked"),
    ("http://[::ffff:10.0.0.1]/a.png", 400, "image_fetch_blocked"),
    ("http://user@example.com/a.png", 400, "image_fetch_bad_url"),
])
def test_refused_urls(url, status, code):
    error = refused(intake(), url)
    assert (error.status, error.code) == (status, code), error.message


def test_bytes_are_capped_before_decoding():
    error = refused(intake(max_image_bytes=1000), "data:image/png;base64," + base64.b64encode(b"\0" * 5000).decode())
    assert (error.status, error.code) == (413, "image_too_large")


def test_http_urls_through_the_fetcher(http_server):
    trusted = intake(allow_private_networks=True, max_image_bytes=10_000)
    assert load(trusted, f"{http_server}/cat.png").original_size == (64, 48)
    assert load(trusted, f"{http_server}/redirect").original_size == (64, 48)
    assert refused(trusted, f"{http_server}/big.png").status == 413
    assert refused(trusted, f"{http_server}/missing.png").code == "image_fetch_http_status"
    # the defaults: loopback is not a public address
    assert refused(intake(), f"{http_server}/cat.png").code == "image_fetch_blocked"
    # an allow-list names hosts exactly
    assert refused(intake(allow_private_networks=True, allowed_domains=["images.example.com"]),
                   f"{http_server}/cat.png").code == "image_fetch_blocked"
    # and URLs can be switched off
    assert refused(intake(allow_image_urls=False), f"{http_server}/cat.png").code == "image_urls_disabled"


def test_s3_only_from_configured_buckets(local_s3):
    bucket = local_s3.new_bucket("serve-images")
    local_s3.put(bucket, "cat.png", PNG)
    local_s3.put(bucket, "big.png", b"\0" * 5000)
    i = ImageIntake(ServeConfig(s3_buckets=[bucket], max_image_bytes=2000), SPEC, s3_filesystem=local_s3.filesystem())
    assert load(i, f"s3://{bucket}/cat.png").original_size == (64, 48)
    assert refused(i, f"s3://{bucket}/missing.png").code == "image_not_found"
    assert refused(i, f"s3://{bucket}/big.png").status == 413
    assert refused(i, f"s3://other-{bucket}/cat.png").code == "image_bucket_refused"
