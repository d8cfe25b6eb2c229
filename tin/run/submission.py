"""The submission and the other CSV files a run or an evaluation writes: test predictions in the
``image,label`` form, checked against the test split before they are called done."""

from __future__ import annotations

import csv
from pathlib import Path

from utils import UserError


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["empty"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_predictions(ids: list[str], preds: list[int], classes: list[str], out_csv: Path) -> Path:
    """Submission CSV: header image,label; one row per image (file name, class id), sorted by name."""
    if len(ids) != len(preds):
        raise ValueError(f"{len(ids)} test images but {len(preds)} predictions")
    rows = sorted((name, classes[k]) for name, k in zip(ids, preds, strict=True))
    tmp = out_csv.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    tmp.replace(out_csv)
    return out_csv


def check_predictions(path: Path, ids: list[str], classes: list[str]) -> int:
    """A submission as the format wants it: header image,label, one row per test image (each image of
    `ids` once), every label a class id of `classes`. Returns the row count; a UserError names what
    is wrong."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    problems = []
    if not rows or rows[0] != ["image", "label"]:
        problems.append(f"the header is {rows[0] if rows else 'missing'}, not ['image', 'label']")
    body = rows[1:]
    if sorted(r[0] for r in body if r) != sorted(ids):
        problems.append(f"{len(body)} rows for {len(ids)} test images (every image once is needed)")
    unknown = {r[1] for r in body if len(r) > 1} - set(classes)
    if unknown:
        problems.append(f"labels that are no class: {sorted(unknown)[:3]}")
    if problems:
        raise UserError(f"{path} is not a valid submission: {'; '.join(problems)}")
    return len(body)
