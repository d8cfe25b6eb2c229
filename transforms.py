"""Augmentation: the train recipe as a function of (image size, strength s) in two backends,
the strength and resolution schedules, on-device normalisation, and the CutMix/MixUp mixer.

Strength s in [0, 1] scales every probability and magnitude: s = 0 is (near) identity,
s = 1 is the full recipe. Two backends of the same recipe:

- ``albumentations`` (``train_pipeline``): per image in the loader workers, uint8 HWC in,
  uint8 CHW out;
- ``torch`` (``BatchAugment``): on whole uint8 batches on the device, after the copy: one
  affine warp for crop/flip/rotate/shear, colour jitter as per-image 3x3 colour matrices. No
  worker time at all, which matters on a 2-core CPU and keeps a GPU fed.

The float conversion and normalisation happen on the device, batched (see ``Normalize``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pipeline = Callable[[np.ndarray], np.ndarray]


# How strength grows with progress = epoch / epochs in [0, 1] (scaled by --aug_strength).
AUG_SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 1.0 - math.cos(math.pi / 2 * progress),  # the original project's: slow start
    "linear": lambda progress: progress,
    "constant": lambda progress: 1.0,
}


def strength_at(epoch: int, epochs: float, schedule: str = "cosine", ceiling: float = 1.0) -> float:
    """Augmentation strength for 0-based `epoch` of a run of `epochs` (fractional under a time
    budget): cosine s = 1 - cos(pi/2 * epoch/epochs), linear s = epoch/epochs, constant s = 1;
    each scaled by `ceiling`."""
    if schedule not in AUG_SCHEDULES:
        raise ValueError(f"unknown aug schedule {schedule!r}; use {', '.join(AUG_SCHEDULES)}")
    progress = min(max(epoch / max(epochs, 1e-9), 0.0), 1.0)
    return float(min(max(AUG_SCHEDULES[schedule](progress) * ceiling, 0.0), 1.0))


def train_size_at(epoch: int, epochs: float, img_size: int, min_size: int = 0, until: float = 0.75) -> int:
    """Training resolution for 0-based `epoch` (progressive resizing): grows linearly from
    `min_size` at the first epoch to `img_size` at fraction `until` of the run, then holds;
    a multiple of 8. min_size 0 (or >= img_size) = always img_size. Evaluation stays at img_size."""
    if not min_size or min_size >= img_size:
        return img_size
    last = max(until * (epochs - 1), 1e-9)
    size = min_size + (img_size - min_size) * min(epoch / last, 1.0)
    return min(img_size, int(round(size / 8.0)) * 8)


# --------------------------------------------------------------------------- the recipe
# One table for both backends: each op's probability and magnitudes at strength s = 1. At
# strength s every probability and magnitude is scaled by s (s = 0: the identity), except that
# the crop always happens (p = 1) and only its range grows. Override single entries with
# --aug_ops "flip.p=0,affine.rotate=30" (or `aug_ops:` in a preset).
RECIPE: dict[str, dict[str, float]] = {
    "crop": {"p": 1.0, "area": 0.65, "squeeze": 0.25, "stretch": 0.33},  # area in [1 - 0.65 s, 1], aspect ratio
    "flip": {"p": 0.5},  # in [1 - 0.25 s, 1 + 0.33 s] (RandomResizedCrop)
    "affine": {"p": 0.5, "rotate": 15.0, "shear": 8.0},  # degrees, together
    "randaugment": {"p": 0.0, "n": 2, "m": 9},  # --randaugment (p = 1): n ops per image, magnitude m of 10
    "jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "gray": {"p": 0.1},
    "erase": {"p": 0.5, "min_side": 0.1, "max_side": 0.4},  # one rectangle, sides a fraction of the image
}
UNSCALED = {("crop", "p"), ("randaugment", "n"), ("erase", "min_side")}


def build_recipe(overrides: str = "", randaugment: bool = False, n: int = 2, m: float = 9.0) -> dict:
    """RECIPE with --randaugment and the "op.param=value,..." overrides applied (checked: an
    unknown op or parameter, or a probability outside [0, 1], is a ValueError naming it)."""
    recipe = {op: dict(params) for op, params in RECIPE.items()}
    if randaugment:
        recipe["randaugment"].update(p=1.0, n=n, m=m)
    for item in (i.strip() for i in overrides.split(",") if i.strip()):
        key, sep, value = item.partition("=")
        op, dot, param = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--aug_ops {item!r}: expected op.param=value, e.g. flip.p=0.25")
        if op not in recipe or param not in recipe[op]:
            known = ", ".join(f"{o}.{q}" for o, qs in recipe.items() for q in qs)
            raise ValueError(f"--aug_ops {item!r}: no such op parameter; known: {known}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--aug_ops {item!r}: {value!r} is not a number") from None
        if number < 0 or (param == "p" and number > 1):
            raise ValueError(f"--aug_ops {item!r}: must be >= 0 (and a probability at most 1)")
        recipe[op][param] = number
    return recipe


def at_strength(recipe: dict, s: float) -> dict:
    """Every probability and magnitude of `recipe` at strength s (what both backends draw from)."""
    scaled = {}
    for op, params in recipe.items():
        scaled[op] = {k: (v if (op, k) in UNSCALED else v * s) for k, v in params.items()}
    scaled["jitter"]["hue"] = min(scaled["jitter"]["hue"], 0.5)
    e = scaled["erase"]
    e["max_side"] = recipe["erase"]["min_side"] + (recipe["erase"]["max_side"] - recipe["erase"]["min_side"]) * s
    return scaled


def train_pipeline(img_size: int, strength: float, recipe: dict | None = None) -> A.Compose:
    """The recipe at strength s, per image with albumentations (+ torchvision's RandAugment)."""
    r = at_strength(recipe or RECIPE, float(strength))
    crop, aff, jit, ra, er = r["crop"], r["affine"], r["jitter"], r["randaugment"], r["erase"]
    ops = [
        # s = 0: scale (1, 1) and ratio (1, 1) -> the whole image, only resized.
        A.RandomResizedCrop(
            size=(img_size, img_size),
            scale=(1.0 - crop["area"], 1.0),
            ratio=(1 - crop["squeeze"], 1 + crop["stretch"]),
            p=crop["p"],
        ),
        A.HorizontalFlip(p=r["flip"]["p"]),
    ]
    if ra["p"] > 0 and ra["m"] > 0:
        ops.append(RandAugmentOp(int(ra["n"]), ra["m"], p=ra["p"]))
    ops += [
        A.Affine(
            rotate=(-aff["rotate"], aff["rotate"]), shear=(-aff["shear"], aff["shear"]), border_mode=0, p=aff["p"]
        ),
        A.ColorJitter(
            brightness=jit["brightness"],
            contrast=jit["contrast"],
            saturation=jit["saturation"],
            hue=jit["hue"],
            p=jit["p"],
        ),
        A.ToGray(p=r["gray"]["p"]),
        A.CoarseDropout(
            num_holes_range=(1, 1),
            hole_height_range=(er["min_side"], er["max_side"]),
            hole_width_range=(er["min_side"], er["max_side"]),
            fill=0,
            p=er["p"],
        ),
    ]
    return A.Compose(ops)


# RandAugment (Cubuk et al., 2019) as torchvision implements it: 14 ops, magnitudes on a 0-10
# scale here (RECIPE's m, times s), signs drawn per op. Maxima at magnitude 10 (torchvision's):
RA_OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
RA_MAX = {"shear": 0.3, "translate": 150 / 331, "rotate": 30.0, "enhance": 0.9, "posterize_bits": 4}
_RA_BINS = 101  # torchvision's magnitude bins for the per-image backend: m/10 in steps of 1 %


class RandAugmentOp(A.ImageOnlyTransform):
    """torchvision.transforms.v2.RandAugment inside an albumentations pipeline, seeded from the
    pipeline's own per-sample random state (so it depends on (seed, epoch, index) only)."""

    def __init__(self, n: int, m: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        from torchvision.transforms import v2

        level = round(min(max(m / 10.0, 0.0), 1.0) * (_RA_BINS - 1))
        self.ra = v2.RandAugment(num_ops=n, magnitude=level, num_magnitude_bins=_RA_BINS)

    def get_params(self) -> dict:
        return {"seed": self.py_random.randint(0, 2**31 - 1)}

    def apply(self, img: np.ndarray, seed: int = 0, **params) -> np.ndarray:
        with torch.random.fork_rng(devices=[]):  # never touches the process's own random stream
            torch.manual_seed(seed)
            out = self.ra(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))
        return np.ascontiguousarray(out.numpy().transpose(1, 2, 0))


# luma weights (ITU-R 601, as cv2/albumentations use for grey) and the YIQ basis for hue rotation
_GRAY = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# columns of the per-batch parameter draw (uniform in [0, 1)); RandAugment adds 2 per op slot
_CROP_TRIES = 10  # RandomResizedCrop draws (area, ratio) until the window fits, at most 10 times
_COLS = (
    *(f"area{i}" for i in range(_CROP_TRIES)),
    *(f"ratio{i}" for i in range(_CROP_TRIES)),
    "cx",
    "cy",
    "flip",
    "affine",
    "rot",
    "shear",
    "jitter",
    "bright",
    "contrast",
    "sat",
    "hue",
    "gray",
    "erase",
    "eh",
    "ew",
    "y0",
    "x0",
    "randaugment",
)
_C = {name: i for i, name in enumerate(_COLS)}


class BatchAugment:
    """The recipe on a whole uint8 batch (B, 3, H, W) on its device, in torch.

    RandomResizedCrop, flip, RandAugment's geometric ops, rotate and shear compose into one
    affine map per image, applied by a single ``grid_sample`` straight to the output size;
    RandAugment's pixel ops follow (each computed for the batch, kept where an image drew it);
    brightness, saturation and hue compose into one 3x3 colour matrix per image, contrast blends
    towards the image's mean grey; then grey and one erased rectangle. Same ranges and
    probabilities as the albumentations pipeline (tests/test_transforms.py compares the two).

    All random parameters of a batch are drawn at once, on the CPU, from a generator seeded by
    (seed, epoch, batch index, rank) — so a batch is augmented identically however the run was
    interrupted and resumed, and on any device — and reach the device in one non-blocking copy.
    Returns float images in [0, 255] (``Normalize`` accepts both)."""

    def __init__(self, seed: int = 0, rank: int = 0, recipe: dict | None = None) -> None:
        self.seed, self.rank, self.recipe = seed, rank, recipe or RECIPE
        self.epoch, self.strength, self.size = 0, 0.0, 64
        self._consts: dict[torch.device, dict] = {}

    def set_epoch(self, epoch: int, strength: float, size: int) -> None:
        self.epoch, self.strength, self.size = int(epoch), float(strength), int(size)

    def _const(self, dev: torch.device) -> dict:
        if dev not in self._consts:
            rgb2yiq = torch.tensor(_RGB2YIQ, dtype=torch.float64)
            self._consts[dev] = {
                "gray": torch.tensor(_GRAY, device=dev),
                "eye": torch.eye(3, device=dev),
                "rgb2yiq": rgb2yiq.float().to(dev),
                "yiq2rgb": torch.linalg.inv(rgb2yiq).float().to(dev),
                "sharpen": (torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13).to(dev),
            }
        return self._consts[dev]

    def draw(self, n: int, batch_index: int, device: torch.device) -> torch.Tensor:
        """(n, columns) uniforms for this batch, on `device` (one copy, pinned when it is a GPU)."""
        seed = int(np.random.SeedSequence([self.seed, self.epoch, batch_index, self.rank]).generate_state(1)[0])
        slots = int(self.recipe["randaugment"]["n"]) if self.recipe["randaugment"]["p"] > 0 else 0
        u = torch.rand(n, len(_COLS) + 2 * slots, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        u = u.float()
        if device.type == "cuda":
            u = u.pin_memory()
        return u.to(device, non_blocking=True)

    def __call__(self, images: torch.Tensor, batch_index: int) -> torch.Tensor:
        r = at_strength(self.recipe, self.strength)
        x = images.float()
        if self.strength == 0 and x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x  # the identity: nothing to draw or resample
        u = self.draw(x.shape[0], batch_index, x.device)
        x = self._warp(x, r, u)
        if r["randaugment"]["p"] > 0:
            x = self._randaugment_pixels(x, r["randaugment"], u)
        return self._colour(x, r, u).clamp_(0, 255)

    @staticmethod
    def _uniform(u: torch.Tensor, col: str, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * u[:, _C[col]]

    def _warp(self, x: torch.Tensor, r: dict, u: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        c, a = r["crop"], r["affine"]
        w, h = self._crop_window(c, u)
        cx, cy = (2 * u[:, _C["cx"]] - 1) * (1 - w), (2 * u[:, _C["cy"]] - 1) * (1 - h)
        flip = torch.where(u[:, _C["flip"]] < r["flip"]["p"], -1.0, 1.0)
        on = u[:, _C["affine"]] < a["p"]  # rotate + shear together, as one Affine
        rot = torch.where(on, self._uniform(u, "rot", -a["rotate"], a["rotate"]), 0.0) * (math.pi / 180)
        shear = torch.where(on, self._uniform(u, "shear", -a["shear"], a["shear"]), 0.0) * (math.pi / 180)
        # output (x, y) -> input: crop scale/offset . flip . RandAugment's geometry . rotation . shear
        cos, sin, t = torch.cos(rot), torch.sin(rot), torch.tan(shear)
        base = _mat3([cos, cos * t - sin, 0 * t, sin, sin * t + cos, 0 * t])
        crop = _mat3([w * flip, 0 * w, cx, 0 * w, h, cy])
        m = crop @ self._randaugment_geometry(r["randaugment"], u, n, dev) @ base
        grid = F.affine_grid(m[:, :2, :], [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    @staticmethod
    def _crop_window(c: dict, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RandomResizedCrop's window as a fraction of the image side: area fraction and log
        aspect ratio drawn until the window fits (the first of 10 tries that does; else the whole
        image), as torchvision and albumentations do."""
        area = (1.0 - c["area"]) + c["area"] * u[:, [_C[f"area{i}"] for i in range(_CROP_TRIES)]]
        lo, hi = math.log(1 - c["squeeze"]), math.log(1 + c["stretch"])
        ratio = (lo + (hi - lo) * u[:, [_C[f"ratio{i}"] for i in range(_CROP_TRIES)]]).exp()
        w, h = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (w <= 1) & (h <= 1)
        first = fits.float().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
        ok = fits.any(1)
        pick = lambda t: torch.where(ok, t.gather(1, first).squeeze(1), 1.0)  # noqa: E731
        return pick(w), pick(h)

    def _ra_choices(self, ra: dict, u: torch.Tensor):
        """Per op slot: (op index (n,), sign (n,) of +-1); images that drew no RandAugment (1 - p) get
        the identity op in every slot."""
        base, on = len(_COLS), u[:, _C["randaugment"]] < ra["p"]
        for k in range(int(ra["n"])):
            op = (u[:, base + 2 * k] * len(RA_OPS)).long().clamp_(max=len(RA_OPS) - 1)
            yield torch.where(on, op, 0), torch.where(u[:, base + 2 * k + 1] < 0.5, -1.0, 1.0)

    def _randaugment_geometry(self, ra: dict, u: torch.Tensor, n: int, dev: torch.device) -> torch.Tensor:
        m = torch.eye(3, device=dev).expand(n, 3, 3)
        if ra["p"] <= 0:
            return m
        level = min(ra["m"] / 10.0, 1.0)
        zero, one = torch.zeros(n, device=dev), torch.ones(n, device=dev)
        for op, sign in self._ra_choices(ra, u):
            shear, shift = sign * RA_MAX["shear"] * level, sign * 2 * RA_MAX["translate"] * level
            angle = sign * RA_MAX["rotate"] * level * (math.pi / 180)
            is_ = {
                name: op == RA_OPS.index(name)
                for name in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")
            }
            cos, sin = torch.where(is_["rotate"], angle.cos(), one), torch.where(is_["rotate"], angle.sin(), zero)
            step = _mat3(
                [
                    cos,
                    torch.where(is_["shear_x"], shear, zero) - sin,
                    torch.where(is_["translate_x"], shift, zero),
                    sin + torch.where(is_["shear_y"], shear, zero),
                    cos,
                    torch.where(is_["translate_y"], shift, zero),
                ]
            )
            m = m @ step
        return m

    def _randaugment_pixels(self, x: torch.Tensor, ra: dict, u: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        level, k = min(ra["m"] / 10.0, 1.0), self._const(x.device)
        for op, sign in self._ra_choices(ra, u):
            f = (1.0 + sign * RA_MAX["enhance"] * level).view(-1, 1, 1, 1)
            grey = torch.einsum("c,nchw->nhw", k["gray"], x).unsqueeze(1)
            blur = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), k["sharpen"].view(1, 1, 3, 3), padding=1).view_as(x)
            blur[..., 0, :], blur[..., -1, :], blur[..., 0], blur[..., -1] = (
                x[..., 0, :],
                x[..., -1, :],
                x[..., 0],
                x[..., -1],
            )
            step = 2.0 ** round(RA_MAX["posterize_bits"] * level)  # 8 -> 8 - 4 m/10 bits
            lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
            candidates = {  # each RandAugment pixel op on the whole batch (torchvision's definitions)
                "brightness": x * f,
                "color": grey + f * (x - grey),
                "contrast": grey.mean((2, 3), keepdim=True) + f * (x - grey.mean((2, 3), keepdim=True)),
                "sharpness": blur + f * (x - blur),  # the 3x3 smoothing of PIL's ImageFilter.SMOOTH, borders kept
                "posterize": torch.floor(x / step) * step,
                "solarize": torch.where(x >= 255.0 * (1.0 - level), 255.0 - x, x),
                "autocontrast": torch.where(hi > lo, (x - lo) * 255.0 / (hi - lo).clamp(min=1e-6), x),
                "equalize": TF.equalize(x.round().clamp(0, 255).to(torch.uint8)).float(),
            }
            out = x
            for name, y in candidates.items():  # keep each image's own op's result (identity/geometry: x)
                out = torch.where((op == RA_OPS.index(name)).view(-1, 1, 1, 1), y, out)
            x = out.clamp(0, 255)
        return x

    def _colour(self, x: torch.Tensor, r: dict, u: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return x
        n, k, j = x.shape[0], self._const(x.device), r["jitter"]

        def factor(col: str, amount: float) -> torch.Tensor:
            return torch.where(jitter, self._uniform(u, col, 1 - amount, 1 + amount), 1.0)

        jitter = u[:, _C["jitter"]] < j["p"]
        bright, contrast, sat = (
            factor("bright", j["brightness"]),
            factor("contrast", j["contrast"]),
            factor("sat", j["saturation"]),
        )
        hue = torch.where(jitter, self._uniform(u, "hue", -j["hue"], j["hue"]), 0.0) * (2 * math.pi)
        # saturation: blend with grey, M = sat * I + (1 - sat) * 1 g^T; hue: rotate the IQ plane
        m_sat = sat.view(n, 1, 1) * k["eye"] + (1 - sat).view(n, 1, 1) * k["gray"].view(1, 1, 3)
        zero, one = torch.zeros_like(hue), torch.ones_like(hue)
        rot = _mat3([one, zero, zero, zero, hue.cos(), -hue.sin()], last=[zero, hue.sin(), hue.cos()])
        m_hue = k["yiq2rgb"] @ rot @ k["rgb2yiq"]
        to_gray = (u[:, _C["gray"]] < r["gray"]["p"]).view(n, 1, 1)
        m_gray = k["gray"].view(1, 1, 3).expand(n, 3, 3)
        m = torch.where(to_gray, m_gray @ m_hue @ m_sat, m_hue @ m_sat) * bright.view(n, 1, 1)
        x = torch.einsum("nij,njhw->nihw", m, x)
        mean = torch.einsum("c,nchw->n", k["gray"], x).view(n, 1, 1, 1) / (x.shape[-1] * x.shape[-2])
        x = (x - mean) * contrast.view(n, 1, 1, 1) + mean
        return self._erase(x, r["erase"], u)

    def _erase(self, x: torch.Tensor, e: dict, u: torch.Tensor) -> torch.Tensor:
        """One rectangle (CoarseDropout), sides in [min_side, max_side] of the image, filled with 0."""
        n, size = x.shape[0], x.shape[-1]
        erase = (u[:, _C["erase"]] < e["p"]).view(n, 1, 1)
        eh, ew = (
            self._uniform(u, "eh", e["min_side"], e["max_side"]) * size,
            self._uniform(u, "ew", e["min_side"], e["max_side"]) * size,
        )
        y0, x0 = u[:, _C["y0"]] * (size - eh), u[:, _C["x0"]] * (size - ew)
        pos = torch.arange(size, device=x.device, dtype=torch.float32)
        rows = (pos.view(1, -1) >= y0.view(-1, 1)) & (pos.view(1, -1) < (y0 + eh).view(-1, 1))
        cols = (pos.view(1, -1) >= x0.view(-1, 1)) & (pos.view(1, -1) < (x0 + ew).view(-1, 1))
        hole = erase & rows.unsqueeze(2) & cols.unsqueeze(1)
        return x.masked_fill(hole.unsqueeze(1), 0.0)


def _mat3(first_two_rows: list[torch.Tensor], last: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(n, 3, 3) from six (n,) entries (rows 1 and 2) and a last row (default 0 0 1)."""
    a = first_two_rows
    if last is None:
        zero = torch.zeros_like(a[0])
        last = [zero, zero, torch.ones_like(a[0])]
    return torch.stack([torch.stack(a[:3], -1), torch.stack(a[3:], -1), torch.stack(last, -1)], -2)


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) on the device -> float (B, 3, H, W), ImageNet mean/std.
    Batches travel from the loader as uint8: 4x less to copy than float32."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class StrengthMixer:
    """timm's Mixup/CutMix whose application probability and Beta parameters follow strength s.

    At strength s: P(mix a batch) = s * mix_prob, MixUp alpha = s * mixup_alpha,
    CutMix alpha = s * cutmix_alpha. Small alphas put Beta(a, a) mass near 0 and 1, so a weak
    mix barely changes the batch. Returns soft targets (B, num_classes) that sum to one.
    """

    def __init__(
        self, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, label_smoothing: float, num_classes: int
    ) -> None:
        self.base = {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha, "mix_prob": mix_prob}
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=mix_prob,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.set_strength(0.0)

    def set_strength(self, s: float) -> None:
        self.strength = float(s)
        self.mixup.mixup_alpha = self.base["mixup_alpha"] * s
        self.mixup.cutmix_alpha = self.base["cutmix_alpha"] * s
        self.mixup.mix_prob = self.base["mix_prob"] * s if s > 0 else 0.0

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mixup(x, target)


def build_mixer(
    mixup_alpha: float, cutmix_alpha: float, mix_prob: float, label_smoothing: float, num_classes: int
) -> StrengthMixer | None:
    """None when mixing is off (both alphas or the probability zero)."""
    if mix_prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return None
    return StrengthMixer(mixup_alpha, cutmix_alpha, mix_prob, label_smoothing, num_classes)


def soft_targets(
    x: torch.Tensor, target: torch.Tensor, mixer: StrengthMixer | None, num_classes: int, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) -> (maybe mixed images, soft targets (B, C)). One path with or without mixing."""
    if mixer is not None:
        return mixer(x, target)
    return x, mixup_target(target, num_classes, lam=1.0, smoothing=smoothing)
