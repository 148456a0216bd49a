"""Image intake for the endpoint: a client's `image_url` -> bytes under limits -> a decoded `PreparedImage`.

Why its own module: these are the endpoint's untrusted inputs, and every rule lives here, each failure an
`ApiError` (400, or 413 for size) naming the request field:
* `data:` URLs always (base64, or percent-encoded); the encoded size is checked before decoding base64;
* `http(s)://` through `raylens.fetch.UrlFetcher` (public addresses only, checked on every redirect hop,
  connecting to the checked address, size and time caps), optionally only from `allowed_domains`, and
  not at all when `allow_image_urls` is off;
* `s3://` only from the configured buckets, size checked before reading;
* never `file://`, bare paths or any other scheme (lmdeploy's api_server reads those for any client).
Bytes are decoded with `raylens.images.decode_prepared`, exactly as the batch job decodes them (so one
image gives both the same answer), with the pixel count checked from the header before any decoding.
The blocking work (downloads, decoding) runs on a bounded thread pool, never on the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from urllib.parse import unquote_to_bytes, urlsplit

from raylens.fetch import FetchError, UrlFetcher
from raylens.images import ImageError, PreparedImage, decode_prepared
from serve.chat import ImageRef
from serve.config import ServeConfig
from serve.errors import ApiError, bad_request, too_large

_DATA_URL = re.compile(r"^data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)$", re.DOTALL | re.IGNORECASE)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class ImageIntake:
    """Loads the images of requests under one config; holds a thread pool and the filesystems it needs."""

    def __init__(self, config: ServeConfig, spec, *, s3_filesystem=None) -> None:
        """`s3_filesystem`: the pyarrow filesystem for s3:// images (default: built from the environment's
        AWS_* settings and `config.s3_endpoint` on first use)."""
        self.config = config
        self.spec = spec
        self.fetcher = UrlFetcher(
            timeout_s=config.fetch_timeout_s,
            max_bytes=config.max_image_bytes,
            max_redirects=config.max_redirects,
            allowed_domains=frozenset(config.allowed_domains) if config.allowed_domains is not None else None,
            allow_private_networks=config.allow_private_networks,
            user_agent="raylens-serve/0.1",
        )
        self._pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="raylens-intake")
        self._s3 = s3_filesystem

    async def load(self, refs: Sequence[ImageRef]) -> list[PreparedImage]:
        """All images of one request, concurrently; the first failure (in request order) is raised."""
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(self._pool, self.load_one, ref) for ref in refs]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    def load_one(self, ref: ImageRef) -> PreparedImage:
        data = self.read(ref)
        tiling = self.spec.tiling(ref.max_tiles)
        try:
            return decode_prepared(data, tiling, max_pixels=self.config.max_image_pixels)
        except ImageError as exc:
            if exc.kind == "too_large":
                raise too_large(f"image is too large: {exc}", param=ref.param, code="image_too_large") from None
            raise bad_request(f"not a usable image: {exc}", param=ref.param, code=f"image_{exc.kind}") from None

    def read(self, ref: ImageRef) -> bytes:
        """The encoded bytes behind an image URL, under the rules of the module docstring."""
        url = ref.url.strip()
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else ""
        if scheme == "data":
            return self._read_data_url(url, ref.param)
        if scheme in ("http", "https"):
            if not self.config.allow_image_urls:
                raise bad_request("image URLs are switched off on this server; send the image as a data: URL",
                                  param=ref.param, code="image_urls_disabled")
            try:
                return self.fetcher.fetch(url)
            except FetchError as exc:
                if exc.kind == "too_large":
                    raise too_large(f"image download is too large: {exc}", param=ref.param, code="image_too_large") from None
                raise bad_request(f"could not fetch the image: {exc}", param=ref.param, code=f"image_fetch_{exc.kind}") from None
        if scheme == "s3":
            return self._read_s3(url, ref.param)
        shown = f"scheme {scheme!r}" if scheme else "a URL without a scheme"
        raise bad_request(f"image_url has {shown}; only data:, http(s):// and configured s3:// URLs are accepted",
                          param=ref.param, code="image_url_scheme")

    def _read_data_url(self, url: str, param: str) -> bytes:
        match = _DATA_URL.match(url)
        if match is None:
            raise bad_request("malformed data: URL (expected data:[<type>][;base64],<data>)", param=param, code="invalid_data_url")
        payload = match.group("data")
        is_base64 = any(p.strip().lower() == "base64" for p in match.group("params").split(";"))
        limit = self.config.max_image_bytes
        if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > limit:  # a lower bound on the decoded size
            raise too_large(f"data: URL holds more than max_image_bytes={limit} bytes", param=param, code="image_too_large")
        if is_base64:
            try:
                data = base64.b64decode("".join(payload.split()), validate=True)
            except (binascii.Error, ValueError):
                raise bad_request("data: URL is not valid base64", param=param, code="invalid_base64") from None
        else:
            data = unquote_to_bytes(payload)
        if len(data) > limit:
            raise too_large(f"data: URL holds {len(data)} bytes, more than max_image_bytes={limit}", param=param,
                            code="image_too_large")
        if not data:
            raise bad_request("data: URL holds no bytes", param=param, code="image_empty")
        return data

    def _read_s3(self, url: str, param: str) -> bytes:
        import pyarrow.fs as pafs

        parts = urlsplit(url)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if bucket not in self.config.s3_buckets:
            raise bad_request(f"s3 bucket {bucket!r} is not one this server reads images from", param=param,
                              code="image_bucket_refused")
        if not key or parts.query or parts.fragment:
            raise bad_request("s3:// image URL must be s3://bucket/key", param=param, code="invalid_image_url")
        fs = self._s3_filesystem()
        path = f"{bucket}/{key}"
        try:
            info = fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise bad_request(f"s3://{path} does not exist", param=param, code="image_not_found")
            if info.size is not None and info.size > self.config.max_image_bytes:
                raise too_large(f"s3://{path} is {info.size} bytes, more than max_image_bytes={self.config.max_image_bytes}",
                                param=param, code="image_too_large")
            with fs.open_input_stream(path) as stream:
                data = stream.read(self.config.max_image_bytes + 1)
        except ApiError:
            raise
        except OSError as exc:
            raise bad_request(f"could not read s3://{path}: {exc}", param=param, code="image_read_failed") from None
        if len(data) > self.config.max_image_bytes:
            raise too_large(f"s3://{path} is more than max_image_bytes={self.config.max_image_bytes}", param=param,
                            code="image_too_large")
        return data

    def _s3_filesystem(self):
        if self._s3 is None:
            import os

            from raylens.storage import S3Settings

            self._s3 = S3Settings.from_env(os.environ, endpoint=self.config.s3_endpoint).filesystem()
        return self._s3

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
