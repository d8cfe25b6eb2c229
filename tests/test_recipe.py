"""One recipe, two backends: the per-image albumentations pipeline and the batched torch
BatchAugment read the same table (transforms.RECIPE), and here many samples from each, one op at
a time on probe images made to measure that op, must show the same statistics at several
strengths: flip rate, crop area and aspect ratio, rotation, colour factors, grey rate and erased
area. If either backend drifts from the table, these fail. Also: --aug_ops and RandAugment."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import transforms as T

N = 400  # samples per backend per case: a rate's standard error is at most 0.025
OFF = {
    "flip.p": 0,
    "affine.p": 0,
    "jitter.p": 0,
    "gray.p": 0,
    "erase.p": 0,
    "crop.area": 0,
    "crop.squeeze": 0,
    "crop.stretch": 0,
}


def only(**on) -> dict:
    """The recipe with every op off except the given parameters ("flip_p" means flip.p)."""
    settings = {**OFF, **{k.replace("_", ".", 1): v for k, v in on.items()}}
    return T.build_recipe(",".join(f"{k}={v}" for k, v in settings.items()))


def albumentations(image: np.ndarray, recipe: dict, s: float) -> np.ndarray:
    pipeline = T.train_pipeline(image.shape[0], s, recipe)
    out = []
    for i in range(N):
        pipeline.set_random_state(np.random.default_rng(i), random.Random(i))
        out.append(pipeline(image=image)["image"])
    return np.stack(out).astype(np.float32)  # (N, H, W, 3)


def batched(image: np.ndarray, recipe: dict, s: float) -> np.ndarray:
    aug = T.BatchAugment(seed=7, recipe=recipe)
    aug.set_epoch(0, s, image.shape[0])
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).expand(N, -1, -1, -1).contiguous()
    return aug(x, 0).round().permute(0, 2, 3, 1).numpy()


BACKENDS = {"albumentations": albumentations, "torch": batched}


def both(image, recipe, s, stat):
    return {name: stat(fn(image, recipe, s)) for name, fn in BACKENDS.items()}


def coordinates(size: int = 64) -> np.ndarray:
    """R = source column, G = source row (0..255), B = 128: where each output pixel came from."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([xx * 255 / (size - 1), yy * 255 / (size - 1), np.full_like(xx, 128)], -1).round().astype(np.uint8)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_flip_rate(s):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = 255

    def rate(out):
        return float((out[:, :, 32:].mean((1, 2, 3)) > out[:, :, :32].mean((1, 2, 3))).mean())

    got = both(image, only(flip_p=0.5), s, rate)
    assert got["albumentations"] == pytest.approx(0.5 * s, abs=0.08)
    assert got["torch"] == pytest.approx(0.5 * s, abs=0.08)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_crop_area_and_aspect_ratio(s):
    def sides(out):  # width and height of the source window, from the coordinate image's span
        w = (out[..., 0].max((1, 2)) - out[..., 0].min((1, 2))) / 255
        h = (out[..., 1].max((1, 2)) - out[..., 1].min((1, 2))) / 255
        return w, h

    def stats(out):
        w, h = sides(out)
        return {
            "area": float((w * h).mean()),
            "log_ratio": float(np.log(w / h).mean()),
            "spread": float(np.log(w / h).std()),
        }

    recipe = only(crop_area=0.65, crop_squeeze=0.25, crop_stretch=0.33)
    got = both(coordinates(), recipe, s, stats)
    a, t = got["albumentations"], got["torch"]
    expected_area = 1 - 0.65 * s / 2  # the mean of U(1 - 0.65 s, 1), before windows that do not fit
    assert a["area"] == pytest.approx(t["area"], abs=0.05) and t["area"] == pytest.approx(expected_area, abs=0.08)
    assert a["log_ratio"] == pytest.approx(t["log_ratio"], abs=0.05)
    assert a["spread"] == pytest.approx(t["spread"], rel=0.3)


def test_rotation_angles():
    def angles(out):  # the direction in which the source column grows, in degrees, at the centre
        centre = out[:, 24:40, 24:40, 0]
        dx = np.diff(centre, axis=2).mean((1, 2))
        dy = np.diff(centre, axis=1).mean((1, 2))
        theta = np.degrees(np.abs(np.arctan2(dy, dx)))
        return {"rate": float((theta > 1.0).mean()), "mean": float(theta[theta > 1.0].mean())}

    got = both(coordinates(), only(affine_p=0.5, affine_rotate=15, affine_shear=0), 1.0, angles)
    for name, g in got.items():
        assert g["rate"] == pytest.approx(0.5 * 0.94, abs=0.08), name  # |angle| <= 1 degree counts as none
        assert g["mean"] == pytest.approx(8.0, abs=1.0), name  # |U(-15, 15)| given > 1 degree: 8


@pytest.mark.parametrize("param, amount", [("brightness", 0.4), ("contrast", 0.4), ("saturation", 0.4)])
def test_colour_jitter_factors(param, amount):
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :32] = (90, 140, 60)
    image[:, 32:] = (150, 110, 170)

    def factors(out):
        left, right = out[:, :, :32].mean((1, 2)), out[:, :, 32:].mean((1, 2))  # (N, 3)
        if param == "brightness":
            f = (left + right).sum(1) / float(image.astype(np.float32).sum((2,)).mean() * 2)
        elif param == "contrast":
            f = (right - left).sum(1) / float((image[0, 32:].astype(np.float32) - image[0, :32]).sum((1,)).mean())
        else:  # saturation: distance from grey of the left half
            grey = left @ np.array([0.299, 0.587, 0.114])
            ref = image[0, 0].astype(np.float32)
            f = np.linalg.norm(left - grey[:, None], axis=1) / np.linalg.norm(
                ref - ref @ np.array([0.299, 0.587, 0.114])
            )
        changed = np.abs(f - 1) > 0.01
        return {"rate": float(changed.mean()), "std": float(f[changed].std())}

    recipe = only(
        jitter_p=0.8,
        **{f"jitter_{k}": (amount if k == param else 0) for k in ("brightness", "contrast", "saturation", "hue")},
    )
    got = both(image, recipe, 1.0, factors)
    for name, g in got.items():
        assert g["rate"] == pytest.approx(0.8 * 0.975, abs=0.08), name  # |f - 1| <= 0.01 counts as unchanged
        assert g["std"] == pytest.approx(amount / 3**0.5, rel=0.2), name  # U(1 - a, 1 + a)


def test_grey_rate():
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = (200, 60, 30)

    def rate(out):
        return float((np.abs(out[..., 0] - out[..., 1]).max((1, 2)) < 2).mean())

    got = both(image, only(gray_p=0.1), 1.0, rate)
    assert got["albumentations"] == pytest.approx(0.1, abs=0.05) and got["torch"] == pytest.approx(0.1, abs=0.05)


@pytest.mark.parametrize("s", [0.5, 1.0])
def test_erased_rectangles(s):
    image = np.full((64, 64, 3), 200, np.uint8)

    def stats(out):
        hole = (out.max(3) < 10).mean((1, 2))  # erased fraction of each image
        return {"rate": float((hole > 0).mean()), "area": float(hole[hole > 0].mean())}

    got = both(image, only(erase_p=0.5), s, stats)
    side = 0.1 + 0.3 * s / 2  # mean side: U(0.1, 0.1 + 0.3 s)
    for name, g in got.items():
        assert g["rate"] == pytest.approx(0.5 * s, abs=0.08), name
        assert g["area"] == pytest.approx(side**2, rel=0.2), name
    assert got["albumentations"]["area"] == pytest.approx(got["torch"]["area"], rel=0.2)


def test_aug_ops_overrides_are_checked():
    assert T.build_recipe("flip.p=0.2, affine.rotate=30")["affine"] == {"p": 0.5, "rotate": 30.0, "shear": 8.0}
    for bad, fragment in [
        ("flop.p=1", "no such op parameter"),
        ("flip.p", "expected op.param=value"),
        ("flip.p=2", "at most 1"),
        ("flip.p=x", "not a number"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            T.build_recipe(bad)
    assert T.RECIPE["flip"]["p"] == 0.5  # the table itself is never modified


def test_randaugment_in_both_backends_changes_images_and_keeps_zero_strength_identity():
    recipe = T.build_recipe(randaugment=True, n=2, m=9)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain, with_ra = only(), {**only(), "randaugment": recipe["randaugment"]}
    for name, fn in BACKENDS.items():
        out = fn(image, with_ra, 1.0)
        changed = float((np.abs(out - image.astype(np.float32)).max((1, 2, 3)) > 2).mean())
        assert changed > 0.8, name  # 2 ops of 14, identity among them: most images change
        assert np.array_equal(fn(image, with_ra, 0.0), fn(image, plain, 0.0)), name  # s = 0: magnitude 0
    aug = T.BatchAugment(seed=1, recipe=recipe)
    aug.set_epoch(2, 1.0, 48)
    x = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).expand(8, -1, -1, -1).contiguous()
    assert torch.equal(aug(x, 3), aug(x, 3)) and aug(x, 3).shape == (8, 3, 48, 48)
