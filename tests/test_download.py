"""The safe downloader against a real HTTP server on 127.0.0.1 serving a generated zip."""

from __future__ import annotations

import hashlib
import http.server
import io
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, make_layout
from data import download as dl
from tin.data.readers import read_tiny_imagenet

SMALL = dl.Expected(classes=4, train_per_class=3, val=4, test=2)


def _zip_of(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, "tiny-imagenet-200/" + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> bytes:
    root = make_layout(tmp_path_factory.mktemp("src") / "tin", n_train=3, n_val=1, n_test=2)
    return _zip_of(root)


class Server:
    """Serves `payload`; the first `cuts` responses stop after `cut_at` bytes (a dropped connection)."""

    def __init__(self, payload: bytes, cuts: int = 0, cut_at: int = 0, status: int = 200) -> None:
        self.payload, self.cuts, self.cut_at, self.status = payload, cuts, cut_at, status
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if server.status != 200:
                    self.send_error(server.status)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = server.payload[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.end_headers()
                if server.cuts > 0:
                    server.cuts -= 1
                    self.wfile.write(body[: server.cut_at])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # drop the connection mid-transfer
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny-imagenet-200.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_clean_download_installs_a_loadable_dataset(tmp_path, dataset_zip):
    server = Server(dataset_zip)
    try:
        dest = dl.fetch_tiny_imagenet(tmp_path / "tiny-imagenet-200", server.url, _md5(dataset_zip), expected=SMALL)
    finally:
        server.close()
    assert len(read_tiny_imagenet(dest).classes) == 4
    assert not list(tmp_path.glob(".tiny-imagenet-200.partial-*")), "no temporary folder left behind"
    # a second run with the dataset present does nothing, without touching the network
    assert dl.fetch_tiny_imagenet(dest, "http://127.0.0.1:9/unreachable.zip", expected=SMALL) == dest


def test_cut_connection_resumes_with_range(tmp_path, dataset_zip):
    server = Server(dataset_zip, cuts=2, cut_at=len(dataset_zip) // 3)
    try:
        out = dl.download(server.url, tmp_path / "t.zip", md5=_md5(dataset_zip))
    finally:
        server.close()
    assert out.read_bytes() == dataset_zip
    assert server.ranges[0] is None and all(r and r.startswith("bytes=") for r in server.ranges[1:])
    assert len(server.ranges) == 3 and not (tmp_path / "t.zip.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path, dataset_zip):
    (tmp_path / "t.zip.part").write_bytes(dataset_zip[:1000])
    server = Server(dataset_zip)
    try:
        dl.download(server.url, tmp_path / "t.zip", md5=_md5(dataset_zip))
    finally:
        server.close()
    assert server.ranges == ["bytes=1000-"] and (tmp_path / "t.zip").read_bytes() == dataset_zip


def test_wrong_checksum_keeps_the_file_and_touches_nothing(tmp_path, dataset_zip):
    mine = tmp_path / "my_notes.txt"
    mine.write_text("keep me")
    server = Server(dataset_zip)
    try:
        with pytest.raises(dl.DownloadError, match="MD5") as err:
            dl.fetch_tiny_imagenet(tmp_path / "tiny-imagenet-200", server.url, "0" * 32, expected=SMALL)
    finally:
        server.close()
    assert "kept for inspection" in str(err.value)
    assert (tmp_path / "tiny-imagenet-200.zip.part").read_bytes() == dataset_zip
    assert not (tmp_path / "tiny-imagenet-200").exists() and mine.read_text() == "keep me"


def test_http_error_and_no_network_are_clear(tmp_path, dataset_zip):
    server = Server(dataset_zip, status=404)
    try:
        with pytest.raises(dl.DownloadError, match="HTTP 404"):
            dl.download(server.url, tmp_path / "t.zip")
    finally:
        server.close()
    with pytest.raises(dl.DownloadError, match="cannot reach"):
        dl.download("http://127.0.0.1:9/x.zip", tmp_path / "t.zip", retries=0, timeout=2)


def test_zip_slip_entry_is_refused_and_nothing_escapes(tmp_path, dataset_zip, tmp_path_factory):
    src = make_layout(tmp_path_factory.mktemp("evil") / "tin", n_train=3, n_val=1, n_test=2)
    evil = tmp_path / "evil.zip"
    evil.write_bytes(_zip_of(src, {"../../escaped.txt": b"gotcha"}))
    with pytest.raises(dl.DownloadError, match="unsafe entry"):
        dl.fetch_tiny_imagenet(tmp_path / "out" / "tiny-imagenet-200", archives=[evil], expected=SMALL)
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "out" / "tiny-imagenet-200").exists()


def test_tar_with_link_outside_is_refused(tmp_path):
    tar_path = tmp_path / "links.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        link = tarfile.TarInfo("tiny-imagenet-200/wnids.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(dl.DownloadError, match="link"):
        dl.fetch_tiny_imagenet(tmp_path / "tiny-imagenet-200", archives=[tar_path], expected=SMALL)


def test_split_tar_parts_in_order_and_incomplete_layout(tmp_path, tmp_path_factory):
    src = make_layout(tmp_path_factory.mktemp("parts") / "tiny-imagenet-200", n_train=3, n_val=1, n_test=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(src, arcname="tiny-imagenet-200")
    data = buf.getvalue()
    parts = []
    for i, start in enumerate(range(0, len(data), len(data) // 3 + 1)):
        parts.append(tmp_path / f"t.tar.gz.part{i}")
        parts[-1].write_bytes(data[start : start + len(data) // 3 + 1])
    dest = dl.fetch_tiny_imagenet(tmp_path / "ok" / "tiny-imagenet-200", archives=parts, expected=SMALL)
    assert (dest / dl.COMPLETE_MARKER).is_file() and len(read_tiny_imagenet(dest).train.paths) == 12
    with pytest.raises(dl.DownloadError, match="incomplete"):  # the real counts are not met
        dl.fetch_tiny_imagenet(tmp_path / "strict" / "tiny-imagenet-200", archives=parts)
    assert not (tmp_path / "strict" / "tiny-imagenet-200").exists()
    with pytest.raises(dl.DownloadError, match="in order"):
        dl.fetch_tiny_imagenet(tmp_path / "bad" / "tiny-imagenet-200", archives=parts[::-1], expected=SMALL)


def test_shell_entry_point_reports_errors(tmp_path):
    proc = subprocess.run(
        [
            "sh",
            str(ROOT / "data" / "download_and_unzip.sh"),
            "--dest",
            str(tmp_path / "t"),
            "--archive",
            str(tmp_path / "missing.zip"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "error: archive" in proc.stderr and "Traceback" not in proc.stderr


REAL_PARTS = sorted((ROOT.parent / "shared" / "data").glob("tiny-imagenet-200.tar.gz.part*"))


@pytest.mark.slow
@pytest.mark.skipif(not REAL_PARTS, reason="the real Tiny-ImageNet parts are not in ../shared/data")
def test_real_archive_parts_install_a_dataset_the_loader_accepts(tmp_path):
    dest = dl.fetch_tiny_imagenet(tmp_path / "tiny-imagenet-200", archives=REAL_PARTS)
    data = read_tiny_imagenet(dest)
    assert len(data.classes) == 200 and len(data.train.paths) == 100_000
    assert len(data.val.paths) == 10_000 and len(data.test.paths) == 10_000


def _cifar_targz() -> bytes:
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:

        def add(name, obj):
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))

        for i in range(1, 6):
            add(f"data_batch_{i}", {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]})
        add("test_batch", {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [4, 5]})
        add("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return buf.getvalue()


def test_cifar_download_uses_the_same_safe_path(tmp_path):
    import batch_manager

    payload = _cifar_targz()
    server = Server(payload)
    try:
        dest = dl.fetch_cifar("cifar10", tmp_path / "cifar10", url=server.url, md5=_md5(payload))
    finally:
        server.close()
    data = batch_manager.prepare_data("cifar10", dest, 32, 0)
    assert len(data.train) == 20 and len(data.val) == 2 and (dest / dl.COMPLETE_MARKER).is_file()
    with pytest.raises(dl.DownloadError, match="lacks"):
        dl.fetch_cifar("cifar100", tmp_path / "c100", archives=[tmp_path / "tiny-imagenet-200.zip"])


def test_full_disk_is_a_clear_error(tmp_path, dataset_zip):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    server = Server(dataset_zip * 4)  # larger than the 64 KiB filesystem
    try:
        with pytest.raises(dl.DownloadError, match="disk is full"):
            dl.download(server.url, small / "t.zip")
    finally:
        server.close()
        subprocess.run(["umount", str(small)], check=True)
