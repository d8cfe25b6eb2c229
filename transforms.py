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

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Pipeline = Callable[[np.ndarray], np.ndarray]


# The augmentation backends (--aug_backend): "torch" draws whole batches on the device (BatchAugment);
# "albumentations" runs its per-image pipeline in the loader's workers. batch_manager builds each one's loader.
AUG_BACKENDS = ("torch", "albumentations")

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
# One table for both backends: each op's probability and magnitudes at strength s = 1. At strength
# s every probability and magnitude is scaled by s (s = 0: the identity), except those an op keeps
# (BatchOp.unscaled: the crop always happens and only its range grows). Override single entries
# with --aug_ops "flip.p=0,affine.rotate=30" (or `aug_ops:` in a preset). The order is the order
# of application: geometric ops compose into one warp in this order, then the pixel ops follow.
RECIPE: dict[str, dict[str, float]] = {
    "crop": {"p": 1.0, "area": 0.65, "squeeze": 0.25, "stretch": 0.33},  # area in [1 - 0.65 s, 1], aspect ratio
    "flip": {"p": 0.5},  # in [1 - 0.25 s, 1 + 0.33 s] (RandomResizedCrop)
    "randaugment": {"p": 0.0, "n": 2, "m": 9},  # --randaugment (p = 1): n ops per image, magnitude m of 10
    "affine": {"p": 0.5, "rotate": 15.0, "shear": 8.0},  # degrees, together
    "jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
    "gray": {"p": 0.1},
    "erase": {"p": 0.5, "min_side": 0.1, "max_side": 0.4},  # one rectangle, sides a fraction of the image
}


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
    return {name: OPS[name].at_strength(params, float(s)) for name, params in recipe.items()}


# --------------------------------------------------------------------------- the ops
# Each op is one class: its parameters at strength s, its per-image random draw (on the host, from
# a stream of its own), then either a 3x3 map of output to input coordinates (geometric ops: all of
# them become one warp) or its pixel work on the device; and its albumentations twin for the
# per-image backend. Coordinates are normalised to [-1, 1] (grid_sample's, align_corners=False).
_GRAY = (0.299, 0.587, 0.114)  # luma weights (ITU-R 601, as cv2/albumentations use for grey)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))  # hue rotates I/Q
_YIQ2RGB = torch.linalg.inv(torch.tensor(_RGB2YIQ, dtype=torch.float64)).tolist()


class BatchOp:
    """One augmentation op (subclasses are registered in OPS under their RECIPE name)."""

    name = ""
    unscaled: tuple[str, ...] = ()  # parameters that do not grow with strength

    def at_strength(self, params: dict, s: float) -> dict:
        return {k: (v if k in self.unscaled else v * s) for k, v in params.items()}

    def active(self, p: dict) -> bool:
        return p["p"] > 0

    def columns(self, p: dict) -> int:
        """Uniforms drawn per image."""
        return 1

    def draw(self, u: torch.Tensor, p: dict) -> dict[str, torch.Tensor]:
        """Per-image parameters (host tensors, the image first: BatchAugment draws many batches at
        once and slices them) from `u` (n, columns) uniforms in [0, 1)."""
        return {"on": u[:, 0] < p["p"]}

    def matrix(self, d: dict) -> torch.Tensor | None:
        """Geometric ops: (n, 3, 3) output -> input coordinates. Pixel ops: None."""
        return None

    def device_params(self, d: dict) -> dict[str, torch.Tensor]:
        """What `pixels` needs on the device (host tensors; they travel in the batch's one copy)."""
        return {}

    def pixels(self, x: torch.Tensor, dev: dict, d: dict) -> torch.Tensor:
        """The op on float images (n, 3, H, W) in [0, 255]; `d` (host) may skip work no image drew."""
        return x

    def albumentations(self, A, p: dict, size: int) -> list:
        """The same op for the per-image backend (albumentations `A`)."""
        return []


def _mat(a, b, c, d, e, f) -> torch.Tensor:
    """(n, 3, 3) affine maps [[a, b, c], [d, e, f], [0, 0, 1]] from (n,) entries."""
    zero = torch.zeros_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, torch.ones_like(a)], 1).view(-1, 3, 3)


class Crop(BatchOp):
    """RandomResizedCrop: the window's area fraction and log aspect ratio drawn until it fits (the
    first of 10 tries that does; else the whole image), as torchvision and albumentations do."""

    name, unscaled, tries = "crop", ("p",), 10

    def columns(self, p: dict) -> int:
        return 2 * self.tries + 2

    def draw(self, u: torch.Tensor, p: dict) -> dict:
        k = self.tries
        area = (1.0 - p["area"]) + p["area"] * u[:, :k]
        lo, hi = math.log(1 - p["squeeze"]), math.log(1 + p["stretch"])
        ratio = (lo + (hi - lo) * u[:, k : 2 * k]).exp()
        w, h = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (w <= 1) & (h <= 1)
        first = fits.float().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
        ok = fits.any(1)
        w = torch.where(ok, w.gather(1, first).squeeze(1), 1.0)
        h = torch.where(ok, h.gather(1, first).squeeze(1), 1.0)
        return {"w": w, "h": h, "cx": (2 * u[:, 2 * k] - 1) * (1 - w), "cy": (2 * u[:, 2 * k + 1] - 1) * (1 - h)}

    def matrix(self, d: dict) -> torch.Tensor:
        zero = torch.zeros_like(d["w"])
        return _mat(d["w"], zero, d["cx"], zero, d["h"], d["cy"])

    def albumentations(self, A, p: dict, size: int) -> list:
        # s = 0: scale (1, 1) and ratio (1, 1) -> the whole image, only resized
        scale, ratio = (1.0 - p["area"], 1.0), (1 - p["squeeze"], 1 + p["stretch"])
        return [A.RandomResizedCrop(size=(size, size), scale=scale, ratio=ratio, p=p["p"])]


class Flip(BatchOp):
    name = "flip"

    def matrix(self, d: dict) -> torch.Tensor:
        sign = torch.where(d["on"], -1.0, 1.0)
        zero = torch.zeros_like(sign)
        return _mat(sign, zero, zero, zero, torch.ones_like(sign), zero)

    def albumentations(self, A, p: dict, size: int) -> list:
        return [A.HorizontalFlip(p=p["p"])]


class Affine(BatchOp):
    """Rotation and shear together (one albumentations Affine), degrees uniform in +-rotate, +-shear."""

    name = "affine"

    def columns(self, p: dict) -> int:
        return 3

    def draw(self, u: torch.Tensor, p: dict) -> dict:
        on = u[:, 0] < p["p"]
        rot = torch.where(on, (2 * u[:, 1] - 1) * p["rotate"], 0.0) * (math.pi / 180)
        shear = torch.where(on, (2 * u[:, 2] - 1) * p["shear"], 0.0) * (math.pi / 180)
        return {"on": on, "rot": rot, "shear": shear}

    def matrix(self, d: dict) -> torch.Tensor:
        cos, sin, t = d["rot"].cos(), d["rot"].sin(), d["shear"].tan()
        return _mat(cos, cos * t - sin, 0 * t, sin, sin * t + cos, 0 * t)

    def albumentations(self, A, p: dict, size: int) -> list:
        rotate, shear = (-p["rotate"], p["rotate"]), (-p["shear"], p["shear"])
        return [A.Affine(rotate=rotate, shear=shear, border_mode=0, p=p["p"])]


def _jitter_basis() -> torch.Tensor:
    """(6, 3, 3): Jitter's colour matrix, YIQ2RGB @ hue turn @ RGB2YIQ @ saturation blend, is linear
    in (1, cos h, sin h) x (sat, 1 - sat); these are the six constant matrices it weights per image.
    Weighted element-wise instead of three batched 3x3 products, the op's draw takes 40 % of the
    host time (2.7 against 7.0 ms for 16k images, one thread of an AMD EPYC): it counts now that
    BatchAugment draws a whole chunk of batches at once."""
    f64 = torch.float64
    to_rgb, to_yiq = torch.tensor(_YIQ2RGB, dtype=f64), torch.tensor(_RGB2YIQ, dtype=f64)
    # the turn of the I/Q plane [[1, 0, 0], [0, c, -s], [0, s, c]] = turn[0] + c turn[1] + s turn[2]
    turn = [[[1, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, -1], [0, 1, 0]]]
    hue = to_rgb @ torch.tensor(turn, dtype=f64) @ to_yiq
    grey = torch.tensor(_GRAY, dtype=f64).expand(3, 3)  # each row the luma weights: the blend's target
    return torch.cat([hue, hue @ grey]).float()


class Jitter(BatchOp):
    """ColorJitter: brightness, saturation and hue compose into one 3x3 colour matrix per image
    (saturation blends with grey, hue rotates the YIQ chroma plane), then contrast blends towards
    the image's mean grey; factors uniform in [1 - a, 1 + a], hue in +-hue turns."""

    name = "jitter"

    def at_strength(self, params: dict, s: float) -> dict:
        out = super().at_strength(params, s)
        return {**out, "hue": min(out["hue"], 0.5)}

    def columns(self, p: dict) -> int:
        return 5

    def draw(self, u: torch.Tensor, p: dict) -> dict:
        on = u[:, 0] < p["p"]

        def factor(col: int, amount: float) -> torch.Tensor:
            return torch.where(on, 1 - amount + 2 * amount * u[:, col], 1.0)

        bright, contrast, sat = factor(1, p["brightness"]), factor(2, p["contrast"]), factor(3, p["saturation"])
        hue = torch.where(on, (2 * u[:, 4] - 1) * p["hue"], 0.0) * (2 * math.pi)
        # weights of _JITTER_BASIS: (1, cos, sin) of the hue times (sat, 1 - sat), times brightness
        turn = torch.stack([torch.ones_like(hue), hue.cos(), hue.sin()], 1)
        w = torch.cat([turn * sat.view(-1, 1), turn * (1 - sat).view(-1, 1)], 1) * bright.view(-1, 1)
        colour = w[:, 0, None, None] * _JITTER_BASIS[0]
        for k in range(1, len(_JITTER_BASIS)):  # element-wise, in a fixed order: exact for any n
            colour = colour + w[:, k, None, None] * _JITTER_BASIS[k]
        return {"on": on, "colour": colour, "contrast": contrast}

    def device_params(self, d: dict) -> dict:
        return {"colour": d["colour"], "contrast": d["contrast"], "gray": torch.tensor(_GRAY)}

    def pixels(self, x: torch.Tensor, dev: dict, d: dict) -> torch.Tensor:
        if not bool(d["on"].any()):  # a host tensor: no image of this batch drew it
            return x
        n = x.shape[0]
        x = torch.einsum("nij,njhw->nihw", dev["colour"], x)
        mean = (x.mean((2, 3)) * dev["gray"]).sum(1).view(n, 1, 1, 1)
        return (x - mean) * dev["contrast"].view(n, 1, 1, 1) + mean

    def albumentations(self, A, p: dict, size: int) -> list:
        keys = ("brightness", "contrast", "saturation", "hue")
        return [A.ColorJitter(**{k: p[k] for k in keys}, p=p["p"])]


_JITTER_BASIS = _jitter_basis()


class Gray(BatchOp):
    name = "gray"

    def device_params(self, d: dict) -> dict:
        return {"on": d["on"].float(), "gray": torch.tensor(_GRAY)}

    def pixels(self, x: torch.Tensor, dev: dict, d: dict) -> torch.Tensor:
        if not bool(d["on"].any()):
            return x
        grey = (x * dev["gray"].view(1, 3, 1, 1)).sum(1, keepdim=True)
        return torch.where(dev["on"].view(-1, 1, 1, 1) > 0, grey.expand_as(x), x)

    def albumentations(self, A, p: dict, size: int) -> list:
        return [A.ToGray(p=p["p"])]


class Erase(BatchOp):
    """One rectangle (CoarseDropout), sides uniform in [min_side, max_side] of the image, filled with
    0; the largest side grows with strength from min_side."""

    name, unscaled = "erase", ("min_side",)

    def at_strength(self, params: dict, s: float) -> dict:
        out = super().at_strength(params, s)
        return {**out, "max_side": params["min_side"] + (params["max_side"] - params["min_side"]) * s}

    def columns(self, p: dict) -> int:
        return 5

    def draw(self, u: torch.Tensor, p: dict) -> dict:
        on = u[:, 0] < p["p"]
        eh = p["min_side"] + (p["max_side"] - p["min_side"]) * u[:, 1]
        ew = p["min_side"] + (p["max_side"] - p["min_side"]) * u[:, 2]
        y0, x0 = u[:, 3] * (1 - eh), u[:, 4] * (1 - ew)
        # fractions of the side: rows y0 <= (i / size) < y0 + eh are erased; an empty range when off
        rect = torch.stack([y0, y0 + eh, x0, x0 + ew], 1)
        return {"on": on, "rect": torch.where(on.view(-1, 1), rect, 0.0)}

    def device_params(self, d: dict) -> dict:
        return {"rect": d["rect"]}

    def pixels(self, x: torch.Tensor, dev: dict, d: dict) -> torch.Tensor:
        if not bool(d["on"].any()):
            return x
        size = x.shape[-1]
        pos = torch.arange(size, device=x.device, dtype=torch.float32).view(1, -1) / size
        r = dev["rect"]
        rows = (pos >= r[:, 0:1]) & (pos < r[:, 1:2])
        cols = (pos >= r[:, 2:3]) & (pos < r[:, 3:4])
        return x.masked_fill((rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1), 0.0)

    def albumentations(self, A, p: dict, size: int) -> list:
        sides = (p["min_side"], p["max_side"])
        return [
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=sides, hole_width_range=sides, fill=0, p=p["p"])
        ]


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
RA_GEOMETRY = RA_OPS[1:6]
RA_MAX = {"shear": 0.3, "translate": 150 / 331, "rotate": 30.0, "enhance": 0.9, "posterize_bits": 4}
_RA_BINS = 101  # torchvision's magnitude bins for the per-image backend: m/10 in steps of 1 %


class RandAugment(BatchOp):
    """n ops per image, each drawn from RA_OPS with a random sign: the geometric ones join the warp,
    the pixel ones run on the batch (each computed once for the images that drew it)."""

    name, unscaled = "randaugment", ("n",)

    def active(self, p: dict) -> bool:
        return p["p"] > 0 and p["m"] > 0

    def columns(self, p: dict) -> int:
        return 1 + 2 * int(p["n"])

    def draw(self, u: torch.Tensor, p: dict) -> dict:
        on, level = u[:, 0] < p["p"], min(p["m"] / 10.0, 1.0)
        ops = [(u[:, 1 + 2 * k] * len(RA_OPS)).long().clamp_(max=len(RA_OPS) - 1) for k in range(int(p["n"]))]
        signs = [torch.where(u[:, 2 + 2 * k] < 0.5, -1.0, 1.0) for k in range(int(p["n"]))]
        ops = torch.stack([torch.where(on, op, 0) for op in ops], 1)  # (n, slots); no RandAugment: identity
        return {"ops": ops, "signs": torch.stack(signs, 1), "level": level}

    def matrix(self, d: dict) -> torch.Tensor:
        ops, signs, level = d["ops"], d["signs"], d["level"]
        m = torch.eye(3).expand(ops.shape[0], 3, 3)
        for k in range(ops.shape[1]):
            op, sign = ops[:, k], signs[:, k]
            is_ = {name: op == RA_OPS.index(name) for name in RA_GEOMETRY}
            shear, shift = sign * RA_MAX["shear"] * level, sign * 2 * RA_MAX["translate"] * level
            angle = sign * RA_MAX["rotate"] * level * (math.pi / 180)
            zero, one = torch.zeros_like(sign), torch.ones_like(sign)
            cos, sin = torch.where(is_["rotate"], angle.cos(), one), torch.where(is_["rotate"], angle.sin(), zero)
            m = m @ _mat(
                cos,
                torch.where(is_["shear_x"], shear, zero) - sin,
                torch.where(is_["translate_x"], shift, zero),
                sin + torch.where(is_["shear_y"], shear, zero),
                cos,
                torch.where(is_["translate_y"], shift, zero),
            )
        return m

    @staticmethod
    def _drawn(d: dict) -> list[tuple[int, str, torch.Tensor]]:
        """(slot, pixel op, the images that drew it there) for every pixel op of the batch."""
        found = []
        for k in range(d["ops"].shape[1]):
            for i in d["ops"][:, k].unique().tolist():
                if RA_OPS[i] not in ("identity", *RA_GEOMETRY):
                    found.append((k, RA_OPS[i], torch.nonzero(d["ops"][:, k] == i).flatten()))
        return found

    def device_params(self, d: dict) -> dict:
        factor = 1.0 + d["signs"] * RA_MAX["enhance"] * d["level"]  # the enhance ops' blend factor
        params = {"gray": torch.tensor(_GRAY)}
        for k, name, idx in self._drawn(d):  # which images, and their factors: known here, on the host
            params[f"{k}.{name}"] = {"idx": idx, "f": factor[idx, k]}
        return params

    def pixels(self, x: torch.Tensor, dev: dict, d: dict) -> torch.Tensor:
        """Slot by slot, each pixel op computed on the images that drew it only."""
        slots = {}
        for k, name, _ in self._drawn(d):
            slots.setdefault(k, []).append(name)
        for k, names in sorted(slots.items()):
            out = x.clone()
            for name in names:
                p = dev[f"{k}.{name}"]
                idx = p["idx"].long()
                y = _ra_pixel_op(name, x.index_select(0, idx), p["f"].view(-1, 1, 1, 1), d["level"], dev["gray"])
                out.index_copy_(0, idx, y.clamp(0, 255))
            x = out
        return x

    def albumentations(self, A, p: dict, size: int) -> list:
        return [_randaugment_op(A)(int(p["n"]), p["m"], p=p["p"])]


def _ra_pixel_op(name: str, x: torch.Tensor, f: torch.Tensor, level: float, gray: torch.Tensor) -> torch.Tensor:
    """One RandAugment pixel op on the whole batch (torchvision's definitions); `f` (n, 1, 1, 1) is the
    enhance ops' factor, `gray` the (3,) luma weights on the device."""
    if name == "brightness":
        return x * f
    if name in ("color", "contrast"):
        grey = (x * gray.view(1, 3, 1, 1)).sum(1, keepdim=True)
        base = grey if name == "color" else grey.mean((2, 3), keepdim=True)
        return base + f * (x - base)
    if name == "sharpness":  # PIL's ImageFilter.SMOOTH (3x3, centre 5 of 13), borders kept
        kernel = torch.ones(3, 3, device=x.device)
        kernel[1, 1] = 5.0
        blur = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), (kernel / 13).view(1, 1, 3, 3), padding=1).view_as(x)
        inner = torch.zeros_like(x[:1, :1], dtype=torch.bool)
        inner[..., 1:-1, 1:-1] = True
        blur = torch.where(inner, blur, x)
        return blur + f * (x - blur)
    if name == "posterize":
        step = 2.0 ** round(RA_MAX["posterize_bits"] * level)  # 8 -> 8 - 4 m/10 bits
        return torch.floor(x / step) * step
    if name == "solarize":
        return torch.where(x >= 255.0 * (1.0 - level), 255.0 - x, x)
    if name == "autocontrast":
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) * 255.0 / (hi - lo).clamp(min=1e-6), x)
    if name == "equalize":
        from torchvision.transforms.v2 import functional as TF

        return TF.equalize(x.round().clamp(0, 255).to(torch.uint8)).float()
    raise KeyError(name)


# --aug_ops / RECIPE name -> op; RECIPE's order is the order of application
OPS: dict[str, BatchOp] = {op.name: op for op in (Crop(), Flip(), RandAugment(), Affine(), Jitter(), Gray(), Erase())}


# --------------------------------------------------------------------------- the per-image backend
def require_albumentations():
    """albumentations, needed by --aug_backend albumentations only (the GPU machines' images often
    lack it); a one-line error naming the install when it is missing."""
    try:
        import albumentations
    except ImportError:
        raise UserError(
            "--aug_backend albumentations needs the albumentations package, which is not installed: "
            "pip install albumentations==2.0.8 (as in requirements.txt), or use --aug_backend torch (the default)"
        ) from None
    return albumentations


def train_pipeline(img_size: int, strength: float, recipe: dict | None = None):
    """The recipe at strength s, per image with albumentations (+ torchvision's RandAugment): an
    albumentations Compose of each op's twin, in RECIPE order."""
    A = require_albumentations()
    ops = []
    for name, params in at_strength(recipe or RECIPE, float(strength)).items():
        if OPS[name].active(params):
            ops += OPS[name].albumentations(A, params, img_size)
    return A.Compose(ops)


@functools.cache
def _randaugment_op(A):
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

    return RandAugmentOp


# --------------------------------------------------------------------------- the batched backend
# Batches whose parameters are drawn together: per op one generator and one vectorised draw, and
# one copy to the device, for this many batches. A constant, never a setting: which chunk a batch
# falls in decides its draws, so a run and its resumption must cut epochs into the same chunks.
# 16: the host's draw per batch falls from ~1.1 ms (one at a time) to ~0.3-0.4 ms (batches of
# 256-512, one core of a 2-core AMD EPYC, bench/augment.py), while the batch that draws its chunk
# takes ~5-6 ms, about what a GPU's launch queue holds of 3-ms steps; at 32 it took 9-15 ms, long
# enough to drain the queue once a chunk, for ~0.05 ms per batch more saved
CHUNK_BATCHES = 16

Drawn = list[tuple[BatchOp, dict]]  # the active ops of a batch, each with its host parameters


@dataclass
class _Chunk:
    """Every active op's host parameters for CHUNK_BATCHES consecutive batches of `rows` images
    (batch j of the chunk holds rows j * rows .. (j + 1) * rows), sliced per batch, and their device
    copy, made on the first call that needs it."""

    key: tuple  # (epoch, strength, chunk index)
    rows: int
    matrices: dict[str, torch.Tensor]  # geometric op -> (CHUNK_BATCHES * rows, 3, 3)
    batches: list[tuple[Drawn, torch.Tensor]]  # per batch: its ops' parameters, its warp (rows, 2, 3)
    device: torch.device | None = None
    on_device: dict | None = None  # batch j of the chunk -> its theta and device parameters there


class BatchAugment:
    """The recipe on a whole uint8 batch (B, 3, H, W) on its device, in torch.

    Random parameters are drawn on the host, a chunk of CHUNK_BATCHES consecutive batches at a
    time: per op one vectorised draw for all of the chunk's images, from a generator of the op's own
    seeded by (seed, epoch, chunk index, rank, op), so adding an op changes no other op's draws.
    The uniforms are laid out image-major (image i of every batch of the chunk before image i + 1
    of any), so an image's parameters depend only on (seed, epoch, batch index, its place in the
    batch, rank, op) — not on the batch size, nor on which batches this process drew before: a run
    resumed mid-chunk, or at a smaller last batch (the first n images of a full one), augments each
    batch exactly as the uninterrupted run did.
    The geometric ops' maps are composed on the host into one affine map per image, the pixel ops'
    parameters packed beside it, and the whole chunk reaches the device in one non-blocking copy
    from pinned memory; each batch then takes its slice: the device runs one grid_sample straight
    to the output size and each pixel op that some image of the batch drew (a few elementwise
    kernels each), and the host never waits for it. A batch with `views` (given parameters of some
    ops) or a smaller one gets a copy of its own. Same ranges and probabilities as the
    albumentations pipeline (tests/test_recipe.py compares the two). Returns float images in
    [0, 255] (``Normalize`` accepts both)."""

    def __init__(self, seed: int = 0, rank: int = 0, recipe: dict | None = None) -> None:
        self.seed, self.rank, self.recipe = seed, rank, recipe or RECIPE
        self.epoch, self.strength, self.size = 0, 0.0, 64
        self._chunk: _Chunk | None = None

    def set_epoch(self, epoch: int, strength: float, size: int) -> None:
        self.epoch, self.strength, self.size = int(epoch), float(strength), int(size)
        self._chunk = None  # drawn for the previous epoch and strength

    def draw(self, n: int, batch_index: int, views: dict[str, dict] | None = None) -> tuple[Drawn, torch.Tensor]:
        """(the active ops with their host parameters, the composed (n, 2, 3) warp) for this batch.
        `views`: given parameters of some ops (op name -> its draw), used instead of drawing them
        (the crops and flips cached soft labels were computed on)."""
        chunk = self._chunk_of(n, batch_index)
        j = batch_index % CHUNK_BATCHES
        drawn, theta = chunk.batches[j]
        if n < chunk.rows:  # a smaller (last) batch: the first n images of a full one
            drawn, theta = [(op, _rows(d, 0, n)) for op, d in drawn], theta[:n]
        if views is None:
            return drawn, theta
        lo = j * chunk.rows
        return self._with_views(drawn, {k: m[lo : lo + n] for k, m in chunk.matrices.items()}, views, n)

    def _chunk_of(self, n: int, batch_index: int) -> _Chunk:
        """The chunk holding batch `batch_index`, drawn now unless it is the one cached."""
        key = (self.epoch, self.strength, batch_index // CHUNK_BATCHES)
        if self._chunk is None or self._chunk.key != key or self._chunk.rows < n:
            self._chunk = self._fill(key, n)  # a larger batch redraws: its first rows are the same
        return self._chunk

    def _fill(self, key: tuple, rows: int) -> _Chunk:
        """Draw chunk `key` for batches of `rows` images: each active op once, the warps composed."""
        ops, matrices = [], {}
        for name, params in at_strength(self.recipe, self.strength).items():
            op = OPS[name]
            if not op.active(params):
                continue
            d = op.draw(self._uniforms(name, key[2], rows, op.columns(params)), params)
            m = op.matrix(d)
            if m is not None:
                matrices[name] = m
            ops.append((op, d))
        theta = _compose(list(matrices.values()), CHUNK_BATCHES * rows)
        batches = []
        for j in range(CHUNK_BATCHES):
            lo, hi = j * rows, (j + 1) * rows
            batches.append(([(op, _rows(d, lo, hi)) for op, d in ops], theta[lo:hi]))
        return _Chunk(key, rows, matrices, batches)

    def _uniforms(self, name: str, chunk: int, rows: int, columns: int) -> torch.Tensor:
        """(CHUNK_BATCHES * rows, columns) uniforms in [0, 1) for op `name`, batch after batch, from
        the op's stream for this chunk. Drawn image-major: the first n images of each batch are the
        same whatever `rows` is (torch's CPU generator fills a tensor in order)."""
        key = [self.seed, self.epoch, chunk, self.rank, zlib.crc32(name.encode())]
        seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(rows, CHUNK_BATCHES, columns, generator=g, dtype=torch.float64)
        return u.transpose(0, 1).reshape(-1, columns).float()

    def _with_views(
        self, drawn: Drawn, matrices: dict[str, torch.Tensor], views: dict[str, dict], n: int
    ) -> tuple[Drawn, torch.Tensor]:
        """The batch's draws with the given parameters of `views` in their ops' places (in RECIPE
        order, as drawn ones), and the warp composed again from both."""
        mine = {op.name: (op, d) for op, d in drawn}
        out, maps = [], []
        for name in self.recipe:
            if name in views:
                op, d = OPS[name], views[name]
                m = op.matrix(d)
            elif name in mine:
                (op, d), m = mine[name], matrices.get(name)
            else:
                continue
            if m is not None:
                maps.append(m)
            out.append((op, d))
        return out, _compose(maps, n)

    def _on_device(self, n: int, batch_index: int, views: dict | None, device: torch.device):
        """(the batch's host parameters, their device copy): a slice of its chunk's one copy for a
        full batch without views, a copy of its own otherwise (a view batch's warp is its own)."""
        drawn, theta = self.draw(n, batch_index, views)
        chunk = self._chunk
        if views is not None or n != chunk.rows:
            return drawn, _to_device(_device_tree(drawn, theta), device)
        if chunk.device != device:
            trees = {j: _device_tree(*batch) for j, batch in enumerate(chunk.batches)}
            chunk.on_device, chunk.device = _to_device(trees, device), device
        return drawn, chunk.on_device[batch_index % CHUNK_BATCHES]

    def __call__(self, images: torch.Tensor, batch_index: int, views: dict[str, dict] | None = None) -> torch.Tensor:
        x = images.float()
        if self.strength == 0 and views is None and x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x  # the identity: nothing to draw or resample
        drawn, dev = self._on_device(x.shape[0], batch_index, views, x.device)
        x = warp(x, dev["theta"], self.size)
        for op, d in drawn:
            x = op.pixels(x, dev[op.name], d)
        return x.clamp_(0, 255)


def _rows(d: dict, lo: int, hi: int) -> dict:
    """Images lo..hi of an op's parameters: its per-image tensors sliced, anything else (a scalar
    such as RandAugment's level) kept."""
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in d.items()}


def _compose(matrices: list[torch.Tensor], n: int) -> torch.Tensor:
    """The (n, 2, 3) warp of (n, 3, 3) output -> input maps applied in list order."""
    theta = matrices[0] if matrices else torch.eye(3).expand(n, 3, 3)
    for m in matrices[1:]:
        theta = theta @ m
    return theta[:, :2, :]


def _device_tree(drawn: Drawn, theta: torch.Tensor) -> dict:
    """What a batch needs on the device: its warp and each op's device parameters (host tensors)."""
    return {"theta": theta, **{op.name: op.device_params(d) for op, d in drawn}}


def _to_device(tree: dict, device: torch.device) -> dict:
    """A nested dict of host tensors on `device` through one copy: packed into one float32 buffer
    (pinned when the device is a GPU), copied without blocking, then viewed back into shape."""
    leaves, shapes = [], []

    def flatten(node):
        if isinstance(node, dict):
            for v in node.values():
                flatten(v)
        else:
            leaves.append(node.reshape(-1).float())
            shapes.append(node.shape)

    flatten(tree)
    flat = torch.cat(leaves) if leaves else torch.zeros(0)
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    parts = iter(flat.split([int(np.prod(s)) for s in shapes]))

    def rebuild(node):
        if isinstance(node, dict):
            return {k: rebuild(v) for k, v in node.items()}
        return next(parts).view(node.shape)

    return rebuild(tree)


def warp(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample (n, 3, H, W) through per-image affine maps theta (n, 2, 3) (output -> input, in
    [-1, 1] coordinates) to (n, 3, size, size), bilinear, zeros outside. (On a GPU with TF32 on,
    affine_grid's batched product rounds the coordinates by ~0.01 px: harmless in training.)"""
    grid = F.affine_grid(theta, [x.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) on the device -> float (B, 3, H, W), ImageNet mean/std.
    Batches travel from the loader as uint8: 4x less to copy than float32."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std
