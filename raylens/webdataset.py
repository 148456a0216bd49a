"""WebDataset shards (uncompressed ``.tar``, as img2dataset writes them): list samples, read members.

Why this module exists: a WebDataset input is a set of tar shards, each holding samples as members
that share a key (``000000001.jpg``, ``000000001.txt``, ``000000001.json``). Listing finds, per key,
the image member and its byte range inside the shard; reading one image later needs only that range
(one ranged read, which matters on S3: finding a member by name means reading every header before
it). A range is checked against the member's own tar header before it is trusted, so a shard that
changed after listing is an error, never another sample's bytes.

Conventions (WebDataset's): the key is the member path up to the first dot of its file name
(``a/b.seg.png`` -> key ``a/b``, extension ``seg.png``); members whose name has no dot, or starts
with one, are not sample members. Duplicate member names: the last one wins, as with ``tar x``.
Only regular-file members count. Compressed shards (``.tar.gz``) are not read.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow.fs as pafs

SHARD_EXTENSION = ".tar"
# Image members, in order of preference when a sample has several.
SAMPLE_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MAX_METADATA_BYTES = 1024 * 1024  # a .txt / .json member larger than this is not metadata
_READ_AHEAD = 8 * 1024 * 1024  # one ranged read covers many small members' headers
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_HEADER = tarfile.BLOCKSIZE
_USTAR_NAME_BYTES = 100


@dataclass(frozen=True)
class ShardSample:
    """One key of a shard that has an image member: where the image bytes are, and its metadata
    (``txt``: the .txt member's text; ``json``: the .json member parsed, or its text if it is not
    JSON; absent when the sample has no such member)."""

    key: str
    image_member: str
    offset: int  # of the member's data in the shard
    size: int
    metadata: dict[str, Any]


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a sample member, or None when the name is not one."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def iter_shard_samples(fs: pafs.FileSystem, path: str, name: str) -> Iterator[ShardSample]:
    """The samples of the shard at ``path`` that have an image member, in order of first appearance.

    ``name`` is how error messages call the shard. Raises ValueError for a shard that is not a
    readable tar, or whose metadata member is larger than MAX_METADATA_BYTES.
    """
    images: dict[str, dict[str, tarfile.TarInfo]] = {}
    metadata: dict[str, dict[str, Any]] = {}
    order: dict[str, None] = {}
    try:
        with fs.open_input_file(path) as raw, tarfile.open(
            fileobj=io.BufferedReader(raw, buffer_size=_READ_AHEAD), mode="r:"
        ) as tar:
            for member in tar:
                parts = split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                if ext in SAMPLE_IMAGE_EXTENSIONS:
                    images.setdefault(key, {})[ext] = member
                    order.setdefault(key)
                elif ext in ("txt", "json"):
                    metadata.setdefault(key, {})[ext] = _read_metadata(tar, member, name)
                    order.setdefault(key)
    except tarfile.TarError as exc:
        raise ValueError(f"WebDataset shard {name} is not a readable tar: {exc}") from None
    for key in order:
        if key in images:
            ext = next(e for e in SAMPLE_IMAGE_EXTENSIONS if e in images[key])
            member = images[key][ext]
            yield ShardSample(key=key, image_member=member.name, offset=member.offset_data,
                              size=member.size, metadata=metadata.get(key, {}))


def _read_metadata(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str) -> Any:
    if member.size > MAX_METADATA_BYTES:
        raise ValueError(f"WebDataset shard {shard}: member {member.name!r} is {member.size} bytes, "
                         f"more than the {MAX_METADATA_BYTES} bytes a .txt/.json metadata member may have")
    f = tar.extractfile(member)
    text = f.read().decode("utf-8", errors="replace") if f is not None else ""
    if member.name.lower().endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def read_member_range(fs: pafs.FileSystem, path: str, member: str, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of the shard, after checking that the tar header just before
    them is ``member``'s. Raises FileNotFoundError (no shard) or ValueError (not that member)."""
    if offset < _HEADER or size < 0:
        raise ValueError(f"member {member!r}: impossible range offset={offset} size={size}")
    with fs.open_input_file(path) as f:
        block = f.read_at(_HEADER + size, offset - _HEADER)
    if len(block) != _HEADER + size:
        raise ValueError(f"member {member!r}: the shard ends before offset {offset} + size {size}")
    try:
        header = tarfile.TarInfo.frombuf(block[:_HEADER], tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as exc:
        raise ValueError(f"member {member!r}: no tar header before offset {offset} ({exc})") from None
    # A name longer than the header's field lives in an extended header before it; the field has a prefix.
    long_name = len(member.encode("utf-8", "surrogateescape")) >= _USTAR_NAME_BYTES
    same_name = header.name == member or (long_name and member.startswith(header.name))
    if not same_name or header.size != size:
        raise ValueError(f"member {member!r}: the header at offset {offset} is {header.name!r} of "
                         f"{header.size} bytes (was the shard rewritten after listing?)")
    return block[_HEADER:]


def find_member(fs: pafs.FileSystem, path: str, member: str) -> tuple[int, int]:
    """(offset, size) of the last regular member named ``member``, scanning the headers; KeyError when
    there is none. For sources without a range: costs a read of every header up to the end."""
    found = None
    with fs.open_input_file(path) as raw, tarfile.open(
        fileobj=io.BufferedReader(raw, buffer_size=_READ_AHEAD), mode="r:"
    ) as tar:
        for info in tar:
            if info.name == member and info.isfile():
                found = (info.offset_data, info.size)
    if found is None:
        raise KeyError(member)
    return found
