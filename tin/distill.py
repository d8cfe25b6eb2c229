"""Knowledge distillation: the teachers' loss object, which the step just calls (as DeiT's
DistillationLoss), and the cached soft labels it can replay.

    teacher = load_teachers(cfg, data, runtime)         # tin/run/load.py: --teacher PATH [PATH ...]; None without
    loss = teacher.loss(label_loss, logits, inputs)     # in the step, for the student's batch

A teacher is a run of this toolkit (its folder, i.e. best.pth.tar, or a .pth.tar file) or
``timm:NAME`` with ``--teacher_pretrained_path``; several make an ensemble whose probabilities are
averaged. It sees exactly the student's batch, augmented, mixed and normalised ("consistent
teaching": Beyer et al., "Knowledge distillation: A good teacher is patient and consistent", CVPR
2022), in eval mode, without gradients, in the run's precision and memory layout, resized on the
device to the resolution it was trained at when the student trains at another (progressive
resizing). Its forward pass is part of the step, so ``--time_budget`` measures and plans it.

The loss (Hinton et al., "Distilling the knowledge in a neural network", 2015):
``(1 - alpha) * CE(student, soft targets) + alpha * T^2 * KL(teacher_T || student_T)``, ``_T``
the softmax at temperature T (T^2 keeps the term's gradients at the scale of T = 1).

Cached soft labels (``--kd_views K``, "fast knowledge distillation": Shen & Xing, ECCV 2022): a
live teacher's forward pass can cost as much as a small student's whole step. Instead, the
teachers go once over K views of every training image — a crop and a flip each, drawn from the
recipe at ``--aug_strength`` — and their top-TOPK log-probabilities are stored beside the decode
cache (reused by every later run with the same teachers, data, seed and recipe). Training replays
them: in epoch e each image shows its view e mod K (the crop and flip the teacher saw; the
student's other ops, colour, affine, erasing, are its own) and its soft label, mixed with the
same weight as the images when CutMix/MixUp mix the batch. The step then costs a gather.

A resumed run checks that each teacher's weights are those it started with (a digest in every
checkpoint): the same run needs the same teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import transforms
from batch_manager import Loaders
from tin.data.readers import Split
from tin.runtime import hardware
from utils import UserError

log = logging.getLogger("tin")


TOPK = 20  # classes kept per cached soft label: a 200-class teacher's top 20 hold nearly all its probability
VIEW_OPS = ("crop", "flip")  # what a cached view fixes: the geometry the teacher saw
CACHE_VERSION = 1
CHUNK = 256  # images per teacher forward pass while caching


@dataclass
class Replay:
    """One batch's cached soft labels: its images' views (for BatchAugment) and their soft labels."""

    views: dict[str, dict[str, torch.Tensor]]  # op -> its per-image parameters (host)
    rows: torch.Tensor  # (B, 2 * TOPK) float32, host: log-probabilities, then their classes

    def probs(self, device: torch.device, num_classes: int, lam: float) -> torch.Tensor:
        """(B, num_classes) probabilities on `device` (one non-blocking copy), mixed as the images
        were: weight `lam` for each image's own, 1 - lam for its partner's (image B-1-i)."""
        rows = self.rows.pin_memory() if device.type == "cuda" else self.rows
        rows = rows.to(device, non_blocking=True)
        k = rows.shape[1] // 2
        p = torch.zeros(rows.shape[0], num_classes, device=device)
        p = p.scatter_(1, rows[:, k:].long(), rows[:, :k].softmax(1))  # the top-k, renormalised
        return p if lam == 1.0 else lam * p + (1 - lam) * p.flip(0)


@dataclass
class SoftLabels:
    """The cache: for each of K views of each training image, its crop and flip and the teachers'
    top-TOPK log-probabilities at the run's temperature."""

    logp: np.ndarray  # (K, N, TOPK) float32
    classes: np.ndarray  # (K, N, TOPK) int16
    views: np.ndarray  # (K, N, 5) float32: the crop's w, h, cx, cy (transforms.Crop) and the flip (0/1)
    path: Path

    def batch(self, epoch: int, indices: np.ndarray) -> Replay:
        v = epoch % len(self.views)
        g = torch.from_numpy(self.views[v][indices])
        crop = {"w": g[:, 0], "h": g[:, 1], "cx": g[:, 2], "cy": g[:, 3]}
        rows = np.concatenate([self.logp[v][indices], self.classes[v][indices].astype(np.float32)], axis=1)
        return Replay({"crop": crop, "flip": {"on": g[:, 4] > 0.5}}, torch.from_numpy(rows))


@dataclass
class Teacher:
    """One or more teachers and how their predictions enter the loss."""

    models: list[torch.nn.Module]  # eval mode, on the run's device and in its memory format
    sizes: list[int]  # the resolution each was trained at
    alpha: float = 0.5
    temperature: float = 1.0
    channels_last: bool = False
    info: list[dict] = field(default_factory=list)  # per teacher: source, arch, params, val_top1, digest
    cache: SoftLabels | None = None  # --kd_views K: the cached soft labels replayed instead of a forward pass

    def replay(self, loaders: Loaders, b: int) -> Replay | None:
        """Batch `b`'s cached views and soft labels (None: the teacher runs live)."""
        return None if self.cache is None else self.cache.batch(loaders.epoch, loaders.batch_indices(b))

    def probs(self, inputs: torch.Tensor) -> torch.Tensor:
        """The ensemble's mean probabilities at temperature T (float32, no gradient) for the student's
        normalised batch `inputs`, each teacher at its own resolution."""
        with torch.no_grad():  # not inference_mode: the KL term keeps these for its backward pass
            total = None
            for model, size in zip(self.models, self.sizes, strict=True):
                p = (model(self.resized(inputs, size)).float() / self.temperature).softmax(1)
                total = p if total is None else total + p
            return total / len(self.models)

    def probs_of_views(self, x: torch.Tensor, theta: torch.Tensor, normalize) -> torch.Tensor:
        """The ensemble's mean probabilities at temperature T for uint8-valued images `x` seen through
        the warps `theta` (n, 2, 3), each teacher's view made at its own resolution."""
        with torch.no_grad():
            total = None
            for model, size in zip(self.models, self.sizes, strict=True):
                p = (model(self.view(x, theta, size, normalize)).float() / self.temperature).softmax(1)
                total = p if total is None else total + p
            return total / len(self.models)

    def view(self, x: torch.Tensor, theta: torch.Tensor, size: int, normalize) -> torch.Tensor:
        """The normalised (n, 3, size, size) view of `x` through `theta`, in fp32 under any autocast:
        the student is shown transforms.warp's fp32 views (BatchAugment runs outside autocast), and
        under bf16 affine_grid's batched product would round the sampling coordinates by up to
        0.15 px, so the soft labels would belong to slightly other crops. The teacher itself still
        runs in the caller's autocast."""
        kind = x.device.type
        fp32 = torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else contextlib.nullcontext()
        with fp32:
            view = normalize(transforms.warp(x.float(), theta.float(), size).clamp_(0, 255))
        return view.contiguous(memory_format=torch.channels_last) if self.channels_last else view

    def resized(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """`x` at `size` x `size`, on its device (bilinear; antialiased when shrinking)."""
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        shrink = size < x.shape[-1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def summary(self) -> list[dict]:
        """What the checkpoints, config.yaml's resolved: and best_results.json record of the teachers."""
        keep = ("source", "arch", "params", "img_size", "val_top1", "evaluated", "digest")
        return [{k: t[k] for k in keep} for t in self.info]

    def loss(
        self, label_loss: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor, cached: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The label loss mixed with T^2 * KL(teacher || student) at temperature T; the teacher's
        probabilities are `cached` (replayed soft labels) or its forward pass on `inputs`."""
        t = self.temperature
        log_q = (logits.float() / t).log_softmax(1)
        probs = cached if cached is not None else self.probs(inputs)
        kd = F.kl_div(log_q, probs, reduction="batchmean") * (t * t)
        return (1 - self.alpha) * label_loss + self.alpha * kd


def digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of a model's weights (every tensor's bytes, in key order)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_teachers(saved: list[dict] | None, teacher: Teacher | None, where: str) -> None:
    """A resumed run (`where`) continues only with the teachers it started with (`saved`, from its
    checkpoint)."""
    before = saved or []
    now = teacher.summary() if teacher is not None else []
    if [t["digest"] for t in now] != [t["digest"] for t in before]:
        names = ", ".join(t["source"] for t in before) or "none"
        raise UserError(
            f"--resume {where}: the run's teachers ({names}) are not the ones it started with (their weights "
            "differ); the same run needs the same teachers: restore their files, or start a new run"
        )


# --------------------------------------------------------------------------- cached soft labels
def soft_labels(
    teacher: Teacher,
    split: Split,
    num_classes: int,
    recipe: dict,
    views: int,
    seed: int,
    runtime: hardware.Runtime,
    cache_dir: Path,
) -> SoftLabels:
    """The cached soft labels of `teacher` for the training `split`: read from `cache_dir`, or made
    (one pass of the teachers over `views` (--kd_views) views of every image, drawn from `recipe` at
    the run's strength with `seed`) and written there."""
    key = _cache_key(teacher, split, views, seed, {op: recipe[op] for op in VIEW_OPS})
    path = cache_dir / f"soft_labels_{key}.npz"
    try:
        with np.load(path) as f:
            found = SoftLabels(f["logp"], f["classes"], f["views"], path)
        if found.views.shape[:2] == (views, len(split)):
            log.info("cached soft labels: %s (%d views of %d images)", path, views, len(split))
            return found
    except (OSError, ValueError, KeyError, zlib.error):
        pass  # absent, or cut short: made again
    start = time.perf_counter()
    drawn = _draw_views(recipe, len(split), views, seed)
    logp, classes = _teach(teacher, split, drawn, num_classes, runtime)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, logp=logp, classes=classes, views=drawn)
    os.replace(tmp, path)  # whole or absent
    log.info(
        "cached soft labels: %d views of %d images through the teacher%s in %.0f s, written to %s (reused by "
        "later runs with the same teachers, data, seed and recipe)",
        views,
        len(split),
        "s" if len(teacher.models) > 1 else "",
        time.perf_counter() - start,
        path,
    )
    return SoftLabels(logp, classes, drawn, path)


def _cache_key(teacher: Teacher, split: Split, views: int, seed: int, view_recipe: dict) -> str:
    """What the cached soft labels depend on: the teachers' weights and sizes, the temperature, the
    training images (their names and decode cache), the views (count, seed, crop and flip ranges)."""
    memmap = getattr(split.array, "filename", None)
    facts = {
        "version": CACHE_VERSION,
        "teachers": [t["digest"] for t in teacher.info],
        "sizes": teacher.sizes,
        "temperature": teacher.temperature,
        "topk": TOPK,
        "images": hashlib.sha256("\n".join(split.ids).encode()).hexdigest(),
        "decoded": Path(memmap).name if memmap else len(split),
        "views": views,
        "seed": seed,
        "recipe": view_recipe,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _draw_views(recipe: dict, n: int, k: int, seed: int) -> np.ndarray:
    """(k, n, 5): each image's crop (w, h, cx, cy) and flip in each view, from streams of their own
    seeded by (seed, view, op): independent of batches, so any order replays them."""
    out = np.zeros((k, n, 5), np.float32)
    for v in range(k):
        drawn = {}
        for name in VIEW_OPS:
            op, params = transforms.OPS[name], recipe[name]
            stream = int(np.random.SeedSequence([seed, 7919, v, zlib.crc32(name.encode())]).generate_state(1)[0])
            u = torch.rand(n, op.columns(params), generator=torch.Generator().manual_seed(stream), dtype=torch.float64)
            drawn[name] = op.draw(u.float(), params)
        c = drawn["crop"]
        out[v] = torch.stack([c["w"], c["h"], c["cx"], c["cy"], drawn["flip"]["on"].float()], 1).numpy()
    return out


def _teach(
    teacher: Teacher, split, views: np.ndarray, num_classes: int, runtime: hardware.Runtime
) -> tuple[np.ndarray, np.ndarray]:
    """The teachers' top-TOPK log-probabilities (and classes) on every view of every image of `split`."""
    k, n = views.shape[:2]
    topk = min(TOPK, num_classes)
    logp, classes = np.zeros((k, n, topk), np.float32), np.zeros((k, n, topk), np.int16)
    normalize = transforms.Normalize().to(runtime.device)
    bar = tqdm(total=k * n, desc="soft labels", unit="img", leave=False, dynamic_ncols=True, disable=None)
    for v in range(k):
        for lo in range(0, n, CHUNK):
            bar.update(min(CHUNK, n - lo))
            rows = np.arange(lo, min(lo + CHUNK, n))
            stored = split.array[rows if split.rows is None else split.rows[rows]]
            x = torch.from_numpy(np.ascontiguousarray(stored)).permute(0, 3, 1, 2).to(runtime.device).float()
            g = torch.from_numpy(views[v, rows])
            crop = {"w": g[:, 0], "h": g[:, 1], "cx": g[:, 2], "cy": g[:, 3]}
            theta = transforms.OPS["crop"].matrix(crop) @ transforms.OPS["flip"].matrix({"on": g[:, 4] > 0.5})
            with hardware.autocast(runtime.device, runtime.amp_dtype):
                probs = teacher.probs_of_views(x, theta[:, :2].to(runtime.device), normalize)
            top = probs.clamp_min(1e-12).log().topk(topk, dim=1)
            logp[v, rows] = top.values.cpu().numpy()
            classes[v, rows] = top.indices.cpu().numpy().astype(np.int16)
    bar.close()
    return logp, classes
