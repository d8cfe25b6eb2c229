"""Small shared pieces: user errors, seeding, top-k accuracy, JSON reports."""

from __future__ import annotations

import difflib
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class UserError(ValueError):
    """Bad input from the user: printed as one line naming the value and the fix, no traceback."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows of logits (B, C) have their true class among the k highest, for each k: a
    (len(ks),) long tensor on the logits' device (no host synchronisation)."""
    maxk = min(max(ks), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(target.view(-1, 1))  # (B, maxk)
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def write_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as JSON at `path` (creating its folder), or, where that folder cannot be written
    (the image's bench/results belongs to root, the container runs as you), at the same name in the
    temporary folder, saying so. Returns where it went."""
    path = Path(path)
    text = json.dumps(obj, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / path.name
        fallback.write_text(text)
        print(f"note: cannot write {path} ({exc.strerror or exc}); written to {fallback} instead", file=sys.stderr)
        return fallback


def with_guess(name: str, known, prefix: str = "") -> str:
    """`name`, with a "did you mean" when a known name is close."""
    bare = name.removeprefix(prefix)
    close = [k for k in known if k.startswith(bare)][:2] or difflib.get_close_matches(
        bare, list(known), n=1, cutoff=0.6
    )
    return f"{name} (did you mean {' or '.join(prefix + c for c in close)}?)" if close else name
