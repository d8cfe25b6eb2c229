"""Fetch and unpack Tiny-ImageNet-200 (or CIFAR) safely.

    cd data && sh download_and_unzip.sh                  # official zip -> data/tiny-imagenet-200
    python data/download.py --archive part0 part1 ...    # offline: local .zip / .tar.gz / split parts
    python data/download.py --url MIRROR --md5 HEX       # a mirror, checked against its MD5
    python data/download.py --dataset cifar10            # CIFAR-10 python archive -> data/cifar10

Guarantees:
- downloads show progress and resume a partial file (HTTP Range) instead of starting over;
- the archive is checked (size and MD5 of the official zip); a mismatch keeps the partial file
  for inspection, deletes nothing the user had, and exits non-zero;
- extraction refuses absolute paths, ``..`` entries and links, and happens in a temporary folder
  renamed into place only when complete and validated: an interrupted run never leaves a half
  dataset that looks whole; a dataset already present and valid is left alone, quickly.

Standard library only (tqdm is used when installed), so it runs before the environment exists.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CIFAR = {  # name: (url, md5, folder inside the archive, files it must hold)
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py", ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)],
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python", ["meta", "train", "test"],
    ),
}
OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_SIZE = 248_100_043
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
CHUNK = 1 << 20
DATA_DIR = Path(__file__).resolve().parent
COMPLETE_MARKER = ".complete"


class DownloadError(RuntimeError):
    """A download, check or extraction that failed; the message names the file and the fix."""


@dataclass(frozen=True)
class Expected:
    """What a complete Tiny-ImageNet-200 holds (smaller in tests)."""

    classes: int = 200
    train_per_class: int = 500
    val: int = 10_000
    test: int = 10_000


# --------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, total: int | None, initial: int, desc: str) -> None:
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc)
        except ImportError:  # plain text fallback: one line, rewritten
            self._bar = None
        self.total, self.done, self.desc, self._last = total, initial, desc, 0.0

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last > 0.5:
            self._last = time.monotonic()
            pct = f"{100 * self.done / self.total:5.1f}%" if self.total else ""
            print(f"\r{self.desc}: {self.done / 1e6:8.1f} MB {pct}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


# --------------------------------------------------------------------------- download
def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 30.0,
) -> Path:
    """Download `url` to `dest`, resuming `dest.part` across cut connections and earlier runs.

    The file is renamed from ``.part`` to `dest` only once its size and MD5 check out.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, timeout)
            break
        except (ConnectionError, TimeoutError, urllib.error.ContentTooShortError, _Incomplete) as exc:
            if attempt == retries:
                raise DownloadError(
                    f"download of {url} kept failing ({exc}); {part} is kept: run the same command again to resume"
                ) from None
            print(f"connection lost ({exc}); resuming from byte {part.stat().st_size}", file=sys.stderr)
            time.sleep(min(2**attempt, 10) * 0.1)
    _verify(part, md5, size)
    os.replace(part, dest)
    return dest


class _Incomplete(Exception):
    pass


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the .part is already whole
            return
        raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; check the URL or use --archive") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (ConnectionResetError, TimeoutError)):
            raise ConnectionError(str(exc.reason)) from None
        raise DownloadError(
            f"cannot reach {url} ({exc.reason}); without internet, pass --archive with a local copy"
        ) from None
    with response:
        resumed = response.status == 206
        if have and not resumed:
            have = 0  # the server ignored Range: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = _Progress(total, have, part.name.removesuffix(".part"))
        try:
            with open(part, "ab" if resumed else "wb") as fh:
                for block in iter(lambda: response.read(CHUNK), b""):
                    fh.write(block)
                    bar.update(len(block))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"the disk is full while writing {part}; free space and run again to resume"
                ) from None
            raise
        finally:
            bar.close()
    if total is not None and part.stat().st_size < total:
        raise _Incomplete(f"got {part.stat().st_size} of {total} bytes")


def _verify(path: Path, md5: str | None, size: int | None) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise DownloadError(
            f"{path} has {got:,} bytes, expected {size:,}; it is kept for inspection (delete it to start over)"
        )
    if md5 is not None:
        digest = md5_of(path)
        if digest != md5.lower():
            raise DownloadError(
                f"{path} has MD5 {digest}, expected {md5.lower()}; it is kept for inspection (delete it to start over)"
            )


# --------------------------------------------------------------------------- safe extraction
class _Concat(io.RawIOBase):
    """Read several files (split archive parts) as one stream, without a temporary copy."""

    def __init__(self, paths: list[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]
        self._i = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._i < len(self._files):
            n = self._files[self._i].readinto(buffer)
            if n:
                return n
            self._i += 1
        return 0

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _check_member(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name)
    drive = bool(path.parts) and ":" in path.parts[0]
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or drive:
        raise DownloadError(f"{archive} holds an unsafe entry {name!r} (absolute or '..' path); refusing to extract")
    return path


def _is_zip(paths: list[Path]) -> bool:
    with open(paths[0], "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def extract(archives: list[Path], into: Path) -> None:
    """Extract a .zip, a .tar(.gz) or split parts of either (given in order) into `into`."""
    archives = [Path(a) for a in archives]
    for a in archives:
        if not a.is_file():
            raise DownloadError(f"archive {a} does not exist; check the path given to --archive")
    if _is_zip(archives):
        _extract_zip(archives, into)
    else:
        _extract_tar(archives, into)


def _extract_zip(archives: list[Path], into: Path) -> None:
    source: Path = archives[0]
    joined = None
    if len(archives) > 1:  # zip needs seeking: join the parts into one temporary file first
        joined = into / ".joined.zip"
        with open(joined, "wb") as out:
            for a in archives:
                with open(a, "rb") as fh:
                    shutil.copyfileobj(fh, out, CHUNK)
        source = joined
    try:
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                _check_member(info.filename, archives[0])
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"{archives[0]} holds a symbolic link {info.filename!r}; refusing to extract")
            zf.extractall(into)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{archives[0]} is not a readable zip ({exc}); download it again") from None
    finally:
        if joined is not None:
            joined.unlink(missing_ok=True)


def _extract_tar(archives: list[Path], into: Path) -> None:
    stream = io.BufferedReader(_Concat(archives), CHUNK)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for member in tf:
                _check_member(member.name, archives[0])
                if member.issym() or member.islnk() or member.isdev():
                    raise DownloadError(f"{archives[0]} holds a link or device {member.name!r}; refusing to extract")
                tf.extract(member, into, set_attrs=False, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DownloadError(f"the disk is full while extracting into {into}; free space and run again") from None
        raise DownloadError(
            f"{archives[0]} could not be read as a tar archive ({exc}); are all parts given, in order?"
        ) from None
    finally:
        stream.close()


# --------------------------------------------------------------------------- layout check
def validate_layout(root: Path, expected: Expected = Expected()) -> None:
    """Counts of a complete dataset: classes, train images per class, val annotations, test images."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DownloadError(f"{wnids_file} is missing: this is not a Tiny-ImageNet-200 folder")
    wnids = wnids_file.read_text().split()
    problems = []
    if len(wnids) != expected.classes:
        problems.append(f"{len(wnids)} classes in wnids.txt, expected {expected.classes}")
    for w in wnids:
        folder = root / "train" / w / "images"
        n = len(os.listdir(folder)) if folder.is_dir() else 0
        if n != expected.train_per_class:
            problems.append(f"{folder} has {n} images, expected {expected.train_per_class}")
            break
    ann = root / "val" / "val_annotations.txt"
    n_val = len(ann.read_text().splitlines()) if ann.is_file() else 0
    if n_val != expected.val:
        problems.append(f"{ann} has {n_val} lines, expected {expected.val}")
    test = root / "test" / "images"
    n_test = len(os.listdir(test)) if test.is_dir() else 0
    if n_test != expected.test:
        problems.append(f"{test} has {n_test} images, expected {expected.test}")
    if problems:
        raise DownloadError(f"extracted dataset is incomplete: {'; '.join(problems)}")


def is_complete(root: Path) -> bool:
    return (root / COMPLETE_MARKER).is_file() and (root / "wnids.txt").is_file()


def install(archives: list[Path], dest: Path, locate) -> Path:
    """Extract `archives` into a temporary sibling of `dest`; `locate(tmp)` checks what was
    extracted and returns the folder that becomes `dest` (renamed into place only then)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        extract(archives, tmp)
        root = locate(tmp)
        root.chmod(0o755)
        (root / COMPLETE_MARKER).write_text("validated\n")
        if dest.exists():
            raise DownloadError(f"{dest} appeared while extracting; remove it and run again")
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _locate_tiny(expected: Expected):
    def locate(tmp: Path) -> Path:
        candidates = [p.parent for p in tmp.rglob("wnids.txt")]
        if len(candidates) != 1:
            raise DownloadError("the archive does not hold exactly one dataset folder with a wnids.txt")
        validate_layout(candidates[0], expected)
        return candidates[0]

    return locate


def _check_fresh(dest: Path) -> bool:
    """True when `dest` is a complete earlier install; an error when something else is there."""
    if is_complete(dest):
        print(f"{dest} is already present and complete; nothing to do")
        return True
    if dest.exists():
        raise DownloadError(
            f"{dest} exists but was not installed by this script (or is incomplete); "
            "move it away or delete it, then run again"
        )
    return False


def _download_archive(url: str, folder: Path, md5: str | None, size: int | None) -> Path:
    name = Path(urllib.request.urlparse(url).path).name or "download.bin"
    path = folder / name
    if path.exists():
        _verify(path, md5, size)
        return path
    return download(url, path, md5=md5, size=size)


def fetch_tiny_imagenet(
    dest: str | Path = DATA_DIR / "tiny-imagenet-200",
    url: str = OFFICIAL_URL,
    md5: str | None = None,
    archives: list[str | Path] | None = None,
    expected: Expected = Expected(),
) -> Path:
    """The whole job, callable from Python. Returns the dataset folder."""
    dest = Path(dest)
    if _check_fresh(dest):
        return dest
    if not archives:
        official = url == OFFICIAL_URL
        md5, size = (OFFICIAL_MD5, OFFICIAL_SIZE) if official else (md5, None)
        archives = [_download_archive(url, dest.parent, md5, size)]
    return install([Path(a) for a in archives], dest, _locate_tiny(expected))


def fetch_cifar(
    name: str, dest: str | Path, url: str | None = None, md5: str | None = None, archives: list | None = None
) -> Path:
    """CIFAR-10/100 python archives into `dest` (which then holds cifar-10-batches-py/ or cifar-100-python/)."""
    official_url, official_md5, folder, files = CIFAR[name]
    dest = Path(dest)
    if _check_fresh(dest):
        return dest
    if not archives:
        archives = [_download_archive(url or official_url, dest.parent, md5 if url else official_md5, None)]

    def locate(tmp: Path) -> Path:
        missing = [f for f in files if not (tmp / folder / f).is_file()]
        if missing:
            raise DownloadError(f"the archive lacks {folder}/{', '.join(missing)}: is it the {name} python version?")
        return tmp

    return install([Path(a) for a in archives], dest, locate)


def main(argv: list[str] | None = None) -> int:
    here = DATA_DIR
    parser = argparse.ArgumentParser(description="Download and unpack Tiny-ImageNet-200 (or CIFAR) safely.")
    parser.add_argument("--dataset", default="tiny-imagenet", choices=["tiny-imagenet", *CIFAR])
    parser.add_argument(
        "--dest", default=None, help="target folder (default: data/tiny-imagenet-200, data/cifar10, ...)"
    )
    parser.add_argument("--url", default=None, help="a mirror of the official archive")
    parser.add_argument("--md5", default=None, help="MD5 to check a --url mirror against")
    parser.add_argument("--archive", nargs="+", help="local .zip / .tar.gz, or split parts in order (no download)")
    parser.add_argument(
        "--expect",
        default=None,
        metavar="CLASSES,TRAIN_PER_CLASS,VAL,TEST",
        help="the counts a complete copy holds, for a subset of Tiny-ImageNet (default: 200,500,10000,10000)",
    )
    args = parser.parse_args(argv)
    expected = Expected()
    if args.expect:
        try:
            expected = Expected(*(int(v) for v in args.expect.split(",")))
        except (TypeError, ValueError):
            parser.error(f"--expect {args.expect!r}: four whole numbers, e.g. 200,500,10000,10000")
    try:
        if args.dataset == "tiny-imagenet":
            dest = args.dest or here / "tiny-imagenet-200"
            path = fetch_tiny_imagenet(dest, args.url or OFFICIAL_URL, args.md5, args.archive, expected)
        else:
            path = fetch_cifar(args.dataset, args.dest or here / args.dataset, args.url, args.md5, args.archive)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(f"dataset ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
