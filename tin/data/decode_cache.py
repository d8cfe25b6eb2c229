"""Decode once: every image file of a split becomes one row of a uint8 (N, S, S, 3) array stored
as a memory-mapped ``.npy`` beside the data, so epochs read arrays instead of decoding JPEGs.

- Keyed by a fingerprint of the file list, sizes and mtimes (and the stored size): changed data
  means a new cache. A ``.json`` sidecar, written last, records the shape, a CRC-32 of the pixels
  and any unreadable files; a missing sidecar, a truncated array or a CRC mismatch means the
  cache is rebuilt.
- Unreadable files are found while decoding (with or without the cache) and listed with their
  reasons before training starts; ``skip_bad=True`` drops them and says how many.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from tin.data.readers import IMAGE_ERRORS, DatasetError, Split, decode_rgb

log = logging.getLogger("tin")

CACHE_VERSION = 1
CHUNK = 256


@dataclass
class BadImage:
    path: str
    reason: str


def decode_to(path: Path, size: int | None) -> np.ndarray:
    """RGB uint8 (size, size, 3): odd-sized images are resized (bilinear); size None keeps them."""
    image = decode_rgb(path)
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return image


def _decode_chunk(args: tuple[list[str], int | None, bool]) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    paths, size, keep = args
    out = np.zeros((len(paths), size, size, 3), np.uint8) if keep else None
    bad = []
    for j, p in enumerate(paths):
        try:
            image = decode_to(Path(p), size)
            if out is not None:
                out[j] = image
        except IMAGE_ERRORS as exc:
            bad.append((j, f"{type(exc).__name__}: {exc}"))
    return out, bad


def _chunks(paths: list[Path], size: int | None, keep: bool):
    return [([str(p) for p in paths[i : i + CHUNK]], size, keep) for i in range(0, len(paths), CHUNK)]


def _run(paths: list[Path], size: int | None, keep: bool, workers: int, desc: str):
    """Yield (start index, decoded chunk or None, bad list) in order, in `workers` processes."""
    jobs = _chunks(paths, size, keep)
    bar = tqdm(total=len(paths), desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=None)
    try:
        if workers > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for k, (arr, bad) in enumerate(pool.imap(_decode_chunk, jobs)):
                    bar.update(len(jobs[k][0]))
                    yield k * CHUNK, arr, bad
        else:
            for k, job in enumerate(jobs):
                arr, bad = _decode_chunk(job)
                bar.update(len(job[0]))
                yield k * CHUNK, arr, bad
    finally:
        bar.close()


def scan(paths: list[Path], workers: int, desc: str = "checking images") -> list[BadImage]:
    """Decode every file once without keeping pixels; return the unreadable ones."""
    bad = []
    for start, _, chunk_bad in _run(paths, None, False, workers, desc):
        bad += [BadImage(str(paths[start + j]), reason) for j, reason in chunk_bad]
    return bad


def fingerprint(paths: list[Path], size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION} size={size}\n".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _crc(array: np.ndarray) -> int:
    crc = 0
    for i in range(0, len(array), 8192):  # bounded memory on a memory map
        crc = zlib.crc32(np.ascontiguousarray(array[i : i + 8192]), crc)
    return crc


def _open_valid(npy: Path, meta_path: Path, n: int, size: int) -> tuple[np.ndarray, list[BadImage]] | None:
    """The cached array if its sidecar, shape and CRC check out; None means rebuild."""
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if meta.get("version") != CACHE_VERSION or tuple(array.shape) != (n, size, size, 3) or array.dtype != np.uint8:
        return None
    if _crc(array) != meta.get("crc32"):
        log.warning("decode cache %s is corrupt (CRC mismatch); rebuilding it", npy)
        return None
    return array, [BadImage(**b) for b in meta.get("bad", [])]


def cached_array(paths: list[Path], cache_dir: Path, name: str, size: int, workers: int):
    """(memory-mapped (N, size, size, 3) uint8 array, unreadable files), building it if needed."""
    key = fingerprint(paths, size)
    npy, meta_path = cache_dir / f"{name}_{key}.npy", cache_dir / f"{name}_{key}.json"
    found = _open_valid(npy, meta_path, len(paths), size) if meta_path.exists() else None
    if found is not None:
        return found
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(npy.name + f".{os.getpid()}.tmp")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    except OSError as exc:
        raise DatasetError(
            f"cannot write the decode cache in {cache_dir} ({exc.strerror}); pass --cache_dir to a writable folder "
            "or --no_cache"
        ) from None
    bad: list[BadImage] = []
    try:
        for start, chunk, chunk_bad in _run(paths, size, True, workers, f"decoding {name} once"):
            array[start : start + len(chunk)] = chunk
            bad += [BadImage(str(paths[start + j]), reason) for j, reason in chunk_bad]
        array.flush()
        crc = _crc(array)
        del array
        os.replace(tmp, npy)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"version": CACHE_VERSION, "shape": [len(paths), size, size, 3], "crc32": crc, "bad": [vars(b) for b in bad]}
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: its presence means "complete"
    log.info("decode cache written: %s (%.0f MB)", npy, npy.stat().st_size / 1e6)
    return np.load(npy, mmap_mode="r"), bad


def handle_bad(split_name: str, bad: list[BadImage], skip_bad: bool) -> set[str]:
    """Stop with the list of unreadable files, or (skip_bad) report and return them to drop."""
    if not bad:
        return set()
    listing = "; ".join(f"{b.path} ({b.reason})" for b in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    if not skip_bad:
        raise DatasetError(
            f"{len(bad)} unreadable image(s) in the {split_name} split: {listing}{more}; "
            "fix or delete them, or pass --skip_bad_images to train without them"
        )
    log.warning("--skip_bad_images: skipping %d unreadable %s image(s): %s%s", len(bad), split_name, listing, more)
    return {b.path for b in bad}


def materialize(split: Split, name: str, size: int, cache_dir: Path | None, workers: int, skip_bad: bool) -> Split:
    """File-backed split -> array-backed (cache_dir given) or checked file-backed (None) split.
    Array-backed splits pass through."""
    if split.paths is None:
        return split
    if cache_dir is None:
        dropped = handle_bad(name, scan(split.paths, workers, f"checking {name} images"), skip_bad)
        array = None
    else:
        array, bad = cached_array(split.paths, cache_dir, name, size, workers)
        dropped = handle_bad(name, bad, skip_bad)
    keep = [i for i, p in enumerate(split.paths) if str(p) not in dropped]
    full = Split(split.ids, split.labels, split.paths if array is None else None, array)
    return full if len(keep) == len(split) else full.subset(keep)
