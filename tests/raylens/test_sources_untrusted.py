"""Inputs from strangers (issue 10): manifest rows confined to their roots, files that are not files,
reads that stall, lines that do not parse, repeated column names, names that are not UTF-8."""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import image_bytes
from fault_proxy import FaultProxy, first_n_reads_fail
from raylens.fetch import UrlFetcher
from raylens.sources import (
    ReadRoots,
    SourceError,
    SourceFilesystems,
    file_uri,
    list_inputs,
    read_source,
)
from raylens.storage import S3Settings, resolve_filesystem

RED, BLUE = image_bytes(color=(200, 0, 0)), image_bytes(color=(0, 0, 200), fmt="JPEG")
FETCHER = UrlFetcher()


def listing_of(path, **kwargs):
    fs, root = resolve_filesystem(str(path))
    return list_inputs(fs, root, **kwargs)


def outcome(source, filesystems, fetcher=FETCHER):
    """The bytes read, or the SourceError's kind; fails the test if the read does not end in 10 s."""
    result = []

    def run():
        try:
            result.append(read_source(source, filesystems=filesystems, fetcher=fetcher))
        except SourceError as exc:
            result.append(exc.kind)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert result, f"reading {source!r} did not end within 10 s"
    return result[0]


def outcomes(listing, **kwargs):
    filesystems = SourceFilesystems.create(roots=listing.roots, read_timeout_s=5, **kwargs)
    return {item.id: outcome(item.source, filesystems) for item in listing.items}


@pytest.fixture
def tree(tmp_path):
    """data/ holds the manifest and its images; secret/ is beside it, outside what the manifest may read."""
    (tmp_path / "data" / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "imgs" / "ok.png").write_bytes(RED)
    (tmp_path / "data" / "imgs" / "sub" / "ok2.jpg").write_bytes(BLUE)
    (tmp_path / "secret" / "s.png").write_bytes(BLUE)
    os.symlink("sub/ok2.jpg", tmp_path / "data" / "imgs" / "inner.jpg")           # stays inside
    os.symlink("../../secret/s.png", tmp_path / "data" / "imgs" / "escape.png")   # leads out
    os.symlink(str(tmp_path / "secret"), tmp_path / "data" / "imgs" / "outdir")   # a folder outside
    return tmp_path


def write_manifest(path, values):
    path.write_text("\n".join(json.dumps({"image": v, "n": i}) for i, v in enumerate(values)) + "\n")


# ------------------------------------------------------------------------------------ item 7: roots
def test_manifest_rows_read_only_under_the_manifest_folder(tree):
    secret = tree / "secret" / "s.png"
    rows = {
        "imgs/ok.png": RED,
        "imgs/inner.jpg": BLUE,                    # a link that stays inside
        "imgs/../imgs/ok.png": RED,
        "./imgs/sub/ok2.jpg": BLUE,
        "imgs/escape.png": "outside_root",         # a link that leads out
        "imgs/outdir/s.png": "outside_root",       # through a linked folder outside
        "../secret/s.png": "outside_root",
        "imgs/../../secret/s.png": "outside_root",
        str(secret): "outside_root",               # absolute
        f"file://{secret}": "outside_root",
        "file:///etc/passwd": "outside_root",
        "/etc/passwd": "outside_root",
        "/proc/self/environ": "outside_root",
        "/dev/zero": "outside_root",
        f"tar://{tree}/secret/x.tar#a.jpg": "outside_root",
        "imgs/gone.png": "missing",
        "imgs": "not_a_file",                      # a directory inside
    }
    write_manifest(tree / "data" / "list.jsonl", list(rows))
    listing = listing_of(tree / "data" / "list.jsonl")
    assert listing.kind == "manifest" and listing.roots == ReadRoots(local=(str((tree / "data").resolve()),))
    got = outcomes(listing)
    assert list(got.values()) == list(rows.values())


def test_the_error_says_where_a_row_may_read_and_how_to_allow_more(tree):
    write_manifest(tree / "data" / "list.jsonl", ["imgs/escape.png"])
    listing = listing_of(tree / "data" / "list.jsonl")
    with pytest.raises(SourceError) as info:
        read_source(listing.items[0].source, filesystems=SourceFilesystems.create(roots=listing.roots), fetcher=FETCHER)
    message = str(info.value)
    assert "escape.png" in message and str(tree / "secret" / "s.png") in message  # where the link leads
    assert str((tree / "data").resolve()) in message and "--image-root" in message


def test_image_roots_widen_what_rows_may_read(tree):
    write_manifest(tree / "data" / "list.jsonl", ["imgs/escape.png", "../secret/s.png", "/etc/hostname"])
    listing = listing_of(tree / "data" / "list.jsonl", image_roots=[str(tree / "secret")])
    assert list(outcomes(listing).values()) == [BLUE, BLUE, "outside_root"]


def test_kernel_filesystems_and_devices_are_refused_even_inside_a_root(tree):
    write_manifest(tree / "data" / "list.jsonl", ["/proc/self/environ", "/proc/self/cmdline", "/dev/zero",
                                                  "/dev/null", "/sys/kernel/notes", "/etc/hostname"])
    listing = listing_of(tree / "data" / "list.jsonl", image_roots=["/"])
    got = list(outcomes(listing).values())
    assert got[:5] == ["not_a_file"] * 5
    assert isinstance(got[5], bytes)  # a regular file inside the root: read (decoding fails later)


def test_image_roots_are_checked(tree):
    write_manifest(tree / "data" / "list.jsonl", ["imgs/ok.png"])
    with pytest.raises(ValueError, match="is not a folder"):
        listing_of(tree / "data" / "list.jsonl", image_roots=[str(tree / "nowhere")])
    with pytest.raises(ValueError, match="expected a local folder or s3://"):
        listing_of(tree / "data" / "list.jsonl", image_roots=["gs://bucket/x"])
    with pytest.raises(ValueError, match="is a directory input"):
        listing_of(tree / "data" / "imgs", image_roots=[str(tree / "secret")])


def test_a_folder_of_manifests_reads_under_that_folder(tree):
    (tree / "data" / "lists").mkdir()
    write_manifest(tree / "data" / "lists" / "a.jsonl", ["../imgs/ok.png", "../../secret/s.png"])
    listing = listing_of(tree / "data")  # data/ holds images: it is a directory input, no roots
    assert listing.kind == "directory" and listing.roots is None
    listing = listing_of(tree / "data" / "lists")
    assert listing.roots == ReadRoots(local=(str((tree / "data" / "lists").resolve()),))
    assert list(outcomes(listing).values()) == ["outside_root", "outside_root"]


# ------------------------------------------------------------------------------------ item 9: non-files, time limits
def test_fifos_sockets_and_devices_in_a_manifest_are_error_rows_and_never_hang(tree):
    os.mkfifo(tree / "data" / "imgs" / "fifo.png")  # opening it for reading would wait for a writer forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tree / "data" / "imgs" / "sock.png"))
    os.symlink("/dev/zero", tree / "data" / "imgs" / "zero.png")
    write_manifest(tree / "data" / "list.jsonl", ["imgs/fifo.png", "imgs/sock.png", "imgs/zero.png"])
    listing = listing_of(tree / "data" / "list.jsonl", image_roots=["/dev"])
    start = time.monotonic()
    assert list(outcomes(listing).values()) == ["not_a_file"] * 3
    assert time.monotonic() - start < 5
    server.close()


def test_a_directory_input_never_opens_a_fifo(tmp_path):
    (tmp_path / "a.png").write_bytes(RED)
    os.mkfifo(tmp_path / "b.png")
    listing = listing_of(tmp_path)
    assert [i.id for i in listing.items] == ["a.png"]  # skipped while listing (with a warning)
    filesystems = SourceFilesystems.create()
    assert outcome(str(tmp_path / "b.png"), filesystems) == "not_a_file"  # and refused if named anyway


def test_a_stalled_local_read_times_out(tree, monkeypatch):
    """As on a hard-mounted NFS server that went away: the read never returns. (The kernel's part
    cannot be staged here, so os.read is made to block; everything around it is real.)"""
    import raylens.sources as sources

    release = threading.Event()
    real_read = os.read

    def stalled(fd, n):
        release.wait(30)
        return real_read(fd, n)

    monkeypatch.setattr(sources.os, "read", stalled)
    filesystems = SourceFilesystems.create(read_timeout_s=0.5)
    start = time.monotonic()
    try:
        with pytest.raises(SourceError, match="no complete read within 0.5s") as info:
            read_source(str(tree / "data" / "imgs" / "ok.png"), filesystems=filesystems, fetcher=FETCHER)
    finally:
        release.set()
    assert info.value.kind == "timeout" and time.monotonic() - start < 3


def test_a_stalled_object_store_read_times_out():
    """An endpoint that accepts the connection and never answers (pyarrow's request_timeout does
    nothing on Linux)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    host, port = silent.getsockname()
    settings = S3Settings(endpoint=f"http://{host}:{port}", region="us-east-1", access_key="k", secret_key="s",
                          retry_attempts=1)
    filesystems = SourceFilesystems.create(settings, read_timeout_s=1.0)
    start = time.monotonic()
    try:
        assert outcome("s3://bucket/key.png", filesystems) == "timeout"
    finally:
        silent.close()
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------ item 7 on S3
def test_s3_manifest_rows_read_only_under_its_prefix(local_s3, tmp_path):
    bucket = local_s3.new_bucket("confined")
    ok = local_s3.put(bucket, "data/imgs/red.png", RED)
    other = local_s3.put(bucket, "elsewhere/blue.jpg", BLUE)
    (tmp_path / "local.png").write_bytes(RED)
    values = ["imgs/red.png", ok, "../elsewhere/blue.jpg", other, f"s3://{bucket}/data/../elsewhere/blue.jpg",
              f"s3://{bucket}/data/./imgs/red.png", "../../other-bucket/x.png", str(tmp_path / "local.png"),
              "/etc/passwd", f"tar://s3://{bucket}/elsewhere/x.tar#a.jpg"]
    local_s3.put(bucket, "data/list.jsonl", "\n".join(json.dumps({"image": v}) for v in values) + "\n")
    fs, root = resolve_filesystem(f"s3://{bucket}/data/list.jsonl", local_s3.settings)

    listing = list_inputs(fs, root)
    assert listing.roots == ReadRoots(s3=(f"{bucket}/data",))
    got = list(outcomes(listing, s3=local_s3.settings).values())
    assert got == [RED, RED] + ["outside_root"] * 8

    wider = list_inputs(fs, root, image_roots=[f"s3://{bucket}/elsewhere/", str(tmp_path)])
    got = list(outcomes(wider, s3=local_s3.settings).values())
    assert got == [RED, RED, BLUE, BLUE, "outside_root", "outside_root", "outside_root", RED, "outside_root", "missing"]


def test_transient_s3_failures_are_retried_also_after_pickling(local_s3):
    """pyarrow's S3FileSystem pickles without its retry strategy; SourceFilesystems rebuilds it from
    the settings, so a Ray task still retries more than pyarrow's default 3 attempts."""
    bucket = local_s3.new_bucket("retry")
    uri = local_s3.put(bucket, "red.png", RED)
    with FaultProxy(local_s3.endpoint) as proxy:
        settings = S3Settings(endpoint=proxy.endpoint, region=local_s3.settings.region,
                              access_key=local_s3.settings.access_key, secret_key=local_s3.settings.secret_key)
        shipped = pickle.loads(pickle.dumps(SourceFilesystems.create(settings, roots=ReadRoots(s3=(bucket,)))))
        assert shipped.roots == ReadRoots(s3=(bucket,))
        proxy.policy = first_n_reads_fail(3, "reset")
        assert outcome(uri, shipped) == RED
        assert proxy.counts.snapshot()["faults"] == {"reset": 3}
        plain = pickle.loads(pickle.dumps(settings.filesystem()))  # what happened before
        proxy.policy = first_n_reads_fail(3, "reset")
        with pytest.raises(OSError):
            plain.open_input_file(uri[len("s3://"):])


# ------------------------------------------------------------------------------------ item 11: bad lines, odd names
def test_a_bad_jsonl_line_is_one_error_row(tree):
    lines = [b'{"image": "imgs/ok.png", "n": 0}', b'{"image": "imgs/ok.png", "n": ', b"",
             b'{"image": "imgs/ok.png", "n": 2, "n": 3}', b'{"image": "imgs/\xff.png", "n": 4}',
             b'{"image": "imgs/sub/ok2.jpg", "n": 5}']
    (tree / "data" / "list.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    listing = listing_of(tree / "data" / "list.jsonl")
    assert [i.id for i in listing.items] == [f"list.jsonl:{n}" for n in range(5)]  # the blank line is no row
    errors = [i.error for i in listing.items]
    assert errors[0] is None and errors[4] is None
    assert "list.jsonl line 2 is not valid JSON" in errors[1]
    assert "list.jsonl line 4 gives the key 'n' more than once" in errors[2]
    assert "list.jsonl line 5 is not valid UTF-8" in errors[3]
    assert [dict(i.extra) for i in listing.items] == [{"n": 0}, {"n": None}, {"n": None}, {"n": None}, {"n": 5}]
    assert all(i.source == "" for i in listing.items[1:4])


def test_a_json_array_with_a_repeated_key_is_one_error_row(tree):
    (tree / "data" / "list.json").write_text('[{"image": "imgs/ok.png"}, {"image": "a.png", "image": "b.png"}]')
    items = listing_of(tree / "data" / "list.json").items
    assert items[0].error is None and "list.json item 1 gives the key 'image' more than once" in items[1].error


def test_repeated_column_names_refuse_the_manifest_naming_them(tmp_path):
    (tmp_path / "m.csv").write_text("image,label,label\na.png,cat,dog\n")
    with pytest.raises(ValueError, match=r"m.csv repeats column names \('label' is columns 2, 3\)"):
        listing_of(tmp_path / "m.csv")
    table = pa.Table.from_arrays([pa.array(["a.png"]), pa.array([1]), pa.array([2])], names=["image", "n", "n"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"m.parquet repeats column names \('n' is columns 2, 3\)"):
        listing_of(tmp_path / "m.parquet")


def test_a_file_name_that_is_not_utf8_is_a_row_that_reads_back(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(raw, "wb") as f:
        f.write(RED)
    (tmp_path / "b.png").write_bytes(BLUE)
    listing = listing_of(tmp_path)
    assert [i.id for i in listing.items] == ["b.png", "caf\\xe9.png"]
    odd = listing.items[1]
    assert odd.source == f"file://{tmp_path}/caf%E9.png" == file_uri(os.fsdecode(raw))
    odd.source.encode("utf-8")  # fits an Arrow string column
    assert outcome(odd.source, SourceFilesystems.create()) == RED


def test_a_manifest_whose_name_is_not_utf8_is_skipped_by_name(tmp_path, caplog):
    with open(os.path.join(os.fsencode(tmp_path), b"list-\xe9.jsonl"), "w") as f:
        f.write('{"image": "a.png"}\n')
    (tmp_path / "good.jsonl").write_text('{"image": "b.png"}\n')
    with caplog.at_level(logging.WARNING, logger="raylens.sources"):
        listing = listing_of(tmp_path)
    assert [i.id for i in listing.items] == ["good.jsonl:0"]
    assert "list-\\xe9.jsonl: its name is not valid UTF-8" in caplog.text
