"""Where a run came from, recorded with it (config.yaml's resolved section, the run page), as
airbench logs its own source: the code (its git commit, whether the tree held changes and a digest
of them; a digest of the toolkit's own files, which a Docker image without .git still has), the
versions of what it ran on, and the command line."""

from __future__ import annotations

import hashlib
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[2]
CODE = ("*.py", "tin/**/*.py", "arch/**/*.py", "configs/*.yaml", "requirements*.txt")


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


def code_digest() -> str:
    """sha256 (16 hex digits) over the toolkit's own files, path and bytes, in path order."""
    h = hashlib.sha256()
    for path in sorted({p for pattern in CODE for p in ROOT.glob(pattern) if p.is_file()}):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def git_state() -> dict:
    """The commit, and whether the tree differs from it: the diff (tracked files) and the untracked
    files' names and bytes, digested; {"git": None} outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"git": None}
    status = _git("status", "--porcelain", "--untracked-files=all") or ""
    h = hashlib.sha256((_git("diff", "HEAD", "--binary") or "").encode())
    for line in sorted(status.splitlines()):
        if line.startswith("?? "):
            path = ROOT / line[3:].strip('"')
            h.update(line.encode() + (path.read_bytes() if path.is_file() and path.stat().st_size < 10**7 else b""))
    dirty = bool(status.strip())
    return {"git": commit.strip(), "dirty": dirty, **({"diff_digest": h.hexdigest()[:16]} if dirty else {})}


def versions() -> dict:
    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion: a str subclass yaml cannot write
        "timm": str(timm.__version__),
        "cuda": cuda,
        "cudnn": cudnn,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def source(argv: list[str] | None) -> dict:
    """This process's record: code, versions, the command (`argv`: main()'s arguments, None: the
    process's own)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        **git_state(),
        "code_digest": code_digest(),
        **versions(),
        "command": shlex.join(["python", "main.py", *args]),
    }
