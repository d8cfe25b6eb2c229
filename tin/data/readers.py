"""Readers for every dataset format users bring, each returning the same ``DataSplits``.

``--dataset``:
- ``tiny-imagenet``: the official Tiny-ImageNet-200 layout::

      ROOT/wnids.txt, ROOT/words.txt (wnid<TAB>names, optional)
      ROOT/train/<wnid>/images/*.JPEG
      ROOT/val/images/*.JPEG + ROOT/val/val_annotations.txt   (file<TAB>wnid<TAB>box...)
      ROOT/test/images/*.JPEG                                   (unlabelled)

  Class index = position of the wnid in the *sorted* wnid list (not wnids.txt order).
- ``cifar10`` / ``cifar100``: the official python-pickle archives, extracted
  (``ROOT/cifar-10-batches-py`` or ``ROOT/cifar-100-python``, or ROOT itself); val = the
  official test batch; no unlabelled test split.
- ``folder``: ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``, optional unlabelled ``ROOT/test/*``;
  any image size; class names (and their sorted order) from the folder names.
- ``npy``: ``x_train.npy`` ``y_train.npy`` ``x_val.npy`` ``y_val.npy`` [``x_test.npy``], images
  (N, H, W, 3) uint8, labels (N,) integers 0..K-1 (seed 002's format).

Images from files are decoded to RGB uint8 (grayscale, palette, CMYK and 16-bit files included).
"""

from __future__ import annotations

import inspect
import logging
import pickle
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError

log = logging.getLogger("tin")

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
GET_DATA_HINT = (
    "download it with `sh data/download_and_unzip.sh` (or --archive for a local copy), "
    "pass --data_dir, or run `make demo` for the built-in demo dataset"
)


class DatasetError(UserError):
    """A dataset folder or file that does not match the expected format."""


@dataclass
class Split:
    """One split: `ids` name each image (the submission's `image` column); images come from
    `paths` (files) or `array` ((N, H, W, 3) uint8, possibly memory-mapped, read at `rows`);
    labels are None when unlabelled."""

    ids: list[str]
    labels: list[int] | None
    paths: list[Path] | None = None
    array: np.ndarray | None = None
    rows: np.ndarray | None = None  # row of `array` for each image; None = 0..N-1

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int] | np.ndarray) -> Split:
        """Images at `index`; array-backed splits keep their (memory-mapped) array and remap rows."""
        index = np.asarray(index, dtype=np.int64)
        rows = None
        if self.array is not None:
            rows = index if self.rows is None else self.rows[index]
        return Split(
            ids=[self.ids[i] for i in index],
            labels=None if self.labels is None else [self.labels[i] for i in index],
            paths=None if self.paths is None else [self.paths[i] for i in index],
            array=self.array,
            rows=rows,
        )

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 of image i."""
        if self.array is not None:
            return np.asarray(self.array[i if self.rows is None else self.rows[i]])
        return load_rgb(self.paths[i])

    def all_images(self) -> np.ndarray:
        """Every image as one in-memory (N, H, W, 3) array (array-backed splits only)."""
        return np.asarray(self.array if self.rows is None else self.array[self.rows])


@dataclass
class DataSplits:
    root: Path
    classes: list[str]  # index = label
    names: dict[str, str]  # class id -> human-readable name
    train: Split
    val: Split | None  # None with --trainval
    test: Split | None  # None when the dataset has no unlabelled test images


# --------------------------------------------------------------------------- decoding
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 from any image file; raises one of IMAGE_ERRORS if unreadable."""
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale, don't clip
            a = np.asarray(im, dtype=np.float64)
            a = (a / max(a.max(), 1.0) * 255.0).round().astype(np.uint8)
            return np.repeat(a[..., None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


def load_rgb(path: Path) -> np.ndarray:
    """decode_rgb, with a DatasetError naming the file when it is unreadable."""
    try:
        return decode_rgb(path)
    except IMAGE_ERRORS as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); delete or replace the file") from None


# --------------------------------------------------------------------------- dispatch
def read_dataset(kind: str, root: str | Path, val: bool = True) -> DataSplits:
    """The dataset's file lists (or arrays). val=False (a run holding out part of train as val): the
    dataset's val split is left unread, not a file of it opened or listed, so a search that picks
    on the held-out part provably never saw val (its `val` is None)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist; {GET_DATA_HINT}")
    if kind not in READERS:
        raise DatasetError(f"unknown --dataset {kind!r}; choose one of {', '.join(READERS)}")
    reader = READERS[kind]
    if val:
        return reader(root)
    if "val" in inspect.signature(reader).parameters:
        return reader(root, val=False)
    return replace(reader(root), val=None)  # a reader that always reads val: read, then dropped


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path} is missing ({what}); {GET_DATA_HINT}")
    return path


def _test_split(folder: Path) -> Split | None:
    """The unlabelled test images; an empty folder is said loudly, now, not found out at submission
    time (there is then no test split and no best_test_preds.csv)."""
    images = _images_in(folder)
    if not images:
        log.warning(
            "%s holds no images: this run will write no best_test_preds.csv (the submission); put the test "
            "images there first if you need one",
            folder,
        )
        return None
    return _file_split(images, None)


def _file_split(paths: list[Path], labels: list[int] | None) -> Split:
    return Split(ids=[p.name for p in paths], labels=labels, paths=paths)


# --------------------------------------------------------------------------- Tiny-ImageNet-200
def _listed(datasets: list[Path]) -> str:
    """The datasets found one level down, the real one first (data/tiny-imagenet-200 before
    data/demo-digits, which sorts first), each with its class count."""

    def classes(folder: Path) -> int:
        return sum(1 for w in (folder / "wnids.txt").read_text().split() if w)

    ranked = sorted(datasets, key=lambda d: (d.name != "tiny-imagenet-200", -classes(d), d.name))
    if len(ranked) == 1:
        return f"{ranked[0]} does: pass --data_dir {ranked[0]}"
    named = ", ".join(f"{d} ({classes(d)} classes)" for d in ranked)
    return f"these do: {named}; pass --data_dir with the one you mean (--data_dir {ranked[0]} for the first)"


def read_tiny_imagenet(root: str | Path, val: bool = True) -> DataSplits:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; {GET_DATA_HINT}")
    inside = sorted(w.parent for w in root.glob("*/wnids.txt"))
    if not (root / "wnids.txt").exists() and inside:  # --data_dir data, the dataset one level down
        raise DatasetError(f"{root} holds no wnids.txt, but {_listed(inside)}")
    wnids_file = _need(root / "wnids.txt", "the class list")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    if not wnids:
        raise DatasetError(f"{wnids_file} lists no classes; re-extract the dataset")
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{wnids_file} lists a wnid more than once; re-extract the dataset")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    _need(root / "train", "the training images")
    train_paths, train_labels = [], []
    for label, wnid in enumerate(classes):
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing (class {wnid} is in wnids.txt); re-extract the dataset")
        images = _images_in(folder)
        if not images:
            raise DatasetError(f"{folder} holds no images (class {wnid}); re-extract the dataset")
        train_paths += images
        train_labels += [label] * len(images)
    return DataSplits(
        root=root,
        classes=classes,
        names=_read_words(root / "words.txt", classes),
        train=_file_split(train_paths, train_labels),
        val=_read_tiny_val(root / "val", index) if val else None,
        test=_test_split(_need(root / "test" / "images", "the unlabelled test images")),
    )


def short_name(name: str) -> str:
    """A class's first name: words.txt's "goldfish, Carassius auratus" -> "goldfish" (never cut mid-word)."""
    return name.split(",")[0].strip() or name


def _read_words(words: Path, classes: list[str]) -> dict[str, str]:
    names = {w: w for w in classes}
    if not words.is_file():
        log.warning("%s is missing: class names are shown as wnids", words)
        return names
    for line in words.read_text(errors="replace").splitlines():
        wnid, _, name = line.partition("\t")
        if wnid in names and name.strip():
            names[wnid] = name.strip()
    return names


def _read_tiny_val(val_dir: Path, index: dict[str, int]) -> Split:
    ann = _need(val_dir / "val_annotations.txt", "the val labels")
    image_dir = _need(val_dir / "images", "the val images")
    paths, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DatasetError(f"{ann} line {n} is not 'file<TAB>wnid...': {line[:60]!r}")
        name, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DatasetError(
                f"{ann} line {n} names wnid {wnid}, which is not in wnids.txt; fix the line or wnids.txt"
            )
        path = image_dir / name
        if not path.is_file():
            raise DatasetError(f"{ann} line {n} names {path}, which does not exist; re-extract the dataset")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise DatasetError(f"{ann} labels no images; re-extract the dataset")
    return _file_split(paths, labels)


# --------------------------------------------------------------------------- CIFAR-10/100
class _ArraysOnly(pickle.Unpickler):
    """The official CIFAR files are pickles: allow plain containers and numpy arrays, nothing that
    could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(
            f"{path} is missing; fetch it with `python data/download.py --dataset cifar10` (or cifar100) "
            "and pass that folder as --data_dir"
        )
    with open(path, "rb") as fh:
        try:
            batch = _ArraysOnly(fh, encoding="latin1").load()
        except Exception as exc:
            raise DatasetError(f"{path} is not a readable CIFAR batch ({exc}); download it again") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return batch


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8))


def read_cifar(root: Path, num_classes: int, val: bool = True) -> DataSplits:
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    folder = root / sub if (root / sub).is_dir() else root
    if num_classes == 10:
        train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta, key, names_key = folder / "test_batch", folder / "batches.meta", "labels", "label_names"
    else:
        train_files = [folder / "train"]
        test_file, meta, key, names_key = folder / "test", folder / "meta", "fine_labels", "fine_label_names"
    batches = [(_unpickle(f), f) for f in train_files]
    x_train = np.concatenate([_cifar_images(b, f) for b, f in batches])
    y_train = [int(v) for b, _ in batches for v in b[key]]
    test = _unpickle(test_file) if val else None  # CIFAR's test batch is our val
    classes = list(_unpickle(meta)[names_key])
    return DataSplits(
        root=folder,
        classes=classes,
        names={c: c for c in classes},
        train=Split([f"train_{i:05d}" for i in range(len(x_train))], y_train, array=x_train),
        val=None
        if test is None
        else Split(
            [f"test_{i:05d}" for i in range(len(test[key]))],
            [int(v) for v in test[key]],
            array=_cifar_images(test, test_file),
        ),
        test=None,
    )


# --------------------------------------------------------------------------- image folders
def read_folder(root: Path, val: bool = True) -> DataSplits:
    train_dir = _need(root / "train", "train/<class>/ image folders")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{train_dir} has no class folders; expected {train_dir}/<class>/<image files>")

    def labelled(split_dir: Path) -> Split:
        paths, labels = [], []
        for label, name in enumerate(classes):
            folder = split_dir / name
            images = _images_in(folder) if folder.is_dir() else []
            if not images and split_dir == train_dir:
                raise DatasetError(f"{folder} holds no images; remove the folder or add images")
            paths += images
            labels += [label] * len(images)
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise DatasetError(f"{split_dir} has class folders that train/ lacks: {', '.join(extra[:5])}")
        return Split(ids=[f"{p.parent.name}/{p.name}" for p in paths], labels=labels, paths=paths)

    held = labelled(_need(root / "val", "val/<class>/ image folders (or use --val_split)")) if val else None
    test_dir = root / "test" / "images" if (root / "test" / "images").is_dir() else root / "test"
    test = _test_split(test_dir) if test_dir.is_dir() else None
    return DataSplits(root, classes, {c: c for c in classes}, labelled(train_dir), held, test)


# --------------------------------------------------------------------------- .npy arrays
def _load_array(path: Path, kind: str) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"{path} is missing; --dataset npy expects x_train/y_train/x_val/y_val.npy")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path} is not a readable .npy array ({exc})") from None
    if kind == "x" and (a.ndim != 4 or a.shape[3] != 3 or a.dtype != np.uint8):
        raise DatasetError(
            f"{path} holds {a.dtype} {a.shape}; expected images as uint8 (N, H, W, 3) — "
            "convert with (x * 255).round().astype(np.uint8) and transpose channels last"
        )
    if kind == "y" and (a.ndim != 1 or not np.issubdtype(a.dtype, np.integer)):
        raise DatasetError(f"{path} holds {a.dtype} {a.shape}; expected integer labels (N,)")
    return a


def read_npy(root: Path, val: bool = True) -> DataSplits:
    names = ("train", "val") if val else ("train",)
    x = {s: _load_array(root / f"x_{s}.npy", "x") for s in names}
    y = {s: _load_array(root / f"y_{s}.npy", "y") for s in names}
    for s in names:
        if len(x[s]) != len(y[s]):
            raise DatasetError(f"{root}/x_{s}.npy has {len(x[s])} images but y_{s}.npy {len(y[s])} labels")
    num_classes = int(max(y[s].max() for s in names)) + 1
    if min(y[s].min() for s in names) < 0:
        raise DatasetError(f"{root}: labels must be 0..K-1, found a negative label")
    classes = [str(i) for i in range(num_classes)]

    def split(s: str) -> Split:
        return Split([f"{s}_{i:06d}" for i in range(len(x[s]))], [int(v) for v in y[s]], array=x[s])

    test = None
    if (root / "x_test.npy").is_file():
        xt = _load_array(root / "x_test.npy", "x")
        test = Split([f"test_{i:06d}" for i in range(len(xt))], None, array=xt)
    return DataSplits(root, classes, {c: c for c in classes}, split("train"), split("val") if val else None, test)


# --dataset NAME -> reader(root) -> DataSplits; config.py takes its choices from here. A reader that also
# takes `val` (False: leave the dataset's val unread, as --val_split runs ask) keeps val out of a search.
READERS = {
    "tiny-imagenet": read_tiny_imagenet,
    "cifar10": lambda root, val=True: read_cifar(root, 10, val),
    "cifar100": lambda root, val=True: read_cifar(root, 100, val),
    "folder": read_folder,
    "npy": read_npy,
}


# --------------------------------------------------------------------------- re-splitting
def hold_out_val(data: DataSplits, fraction: float, seed: int) -> DataSplits:
    """--val_split: a stratified, seeded fraction of train becomes val (the dataset's val is not used)."""
    labels = np.asarray(data.train.labels)
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in range(len(data.classes)):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)  # every class keeps >= 1 image on each side
            val_idx += rng.choice(members, size=k, replace=False).tolist()
    val_set = set(val_idx)
    train_idx = [i for i in range(len(labels)) if i not in val_set]
    return replace(data, train=data.train.subset(train_idx), val=data.train.subset(sorted(val_idx)))


def merge_train_val(data: DataSplits) -> DataSplits:
    """--trainval: train on train + val for a final fit (no val metrics). Array-backed splits are
    joined in memory."""
    if data.val is None:
        return data
    t, v = data.train, data.val
    if (t.paths is None) != (v.paths is None):
        raise DatasetError("--trainval cannot merge a file-backed and an array-backed split")
    merged = Split(
        ids=t.ids + v.ids,
        labels=t.labels + v.labels,
        paths=None if t.paths is None else t.paths + v.paths,
        array=None if t.array is None else np.concatenate([t.all_images(), v.all_images()]),
    )
    return replace(data, train=merged, val=None)


# --------------------------------------------------------------------------- writing the layout
def write_tiny_imagenet_layout(
    root: str | Path,
    names: dict[str, str],
    train: dict[str, list[Image.Image]],
    val: list[tuple[Image.Image, str]],
    test: list[Image.Image],
) -> Path:
    """Write images in the official Tiny-ImageNet-200 layout (JPEG files, annotations, boxes).

    Built in a temporary sibling folder and renamed into place at the end, so an interrupted
    write never leaves a folder that looks like a complete dataset. Never overwrites.
    """
    root = Path(root)
    if root.exists():
        raise UserError(f"{root} already exists; remove it or choose another folder (nothing was overwritten)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a dataset is for everyone who can read the parent
    try:
        (tmp / "wnids.txt").write_text("".join(f"{w}\n" for w in names))
        (tmp / "words.txt").write_text("".join(f"{w}\t{n}\n" for w, n in names.items()))
        for wnid, images in train.items():
            folder = tmp / "train" / wnid / "images"
            folder.mkdir(parents=True)
            boxes = []
            for i, im in enumerate(images):
                im.save(folder / f"{wnid}_{i}.JPEG", quality=90)
                boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{im.width - 1}\t{im.height - 1}\n")
            (tmp / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
        (tmp / "val" / "images").mkdir(parents=True)
        lines = []
        for i, (im, wnid) in enumerate(val):
            im.save(tmp / "val" / "images" / f"val_{i}.JPEG", quality=90)
            lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{im.width - 1}\t{im.height - 1}\n")
        (tmp / "val" / "val_annotations.txt").write_text("".join(lines))
        (tmp / "test" / "images").mkdir(parents=True)
        for i, im in enumerate(test):
            im.save(tmp / "test" / "images" / f"test_{i}.JPEG", quality=90)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
