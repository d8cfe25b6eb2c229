"""Progressive augmentation: the schedule, pipelines, strength reaching workers and the mixer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader

import batch_manager as bm
import transforms as T
from conftest import loaders_for
from tin.augment import mixing
from tin.data.readers import read_tiny_imagenet


def test_strength_schedules():
    assert T.strength_at(0, 100) == 0.0
    assert T.strength_at(50, 100) == pytest.approx(1 - math.cos(math.pi / 4))
    assert T.strength_at(100, 100) == pytest.approx(1.0)
    values = [T.strength_at(e, 10) for e in range(10)]
    assert values == sorted(values) and values[-1] < 1
    assert T.strength_at(3, 10, "linear") == pytest.approx(0.3)
    assert T.strength_at(7, 10, "constant", 0.4) == pytest.approx(0.4)
    assert T.strength_at(10, 10, "cosine", 0.5) == pytest.approx(0.5)


def test_zero_strength_is_identity_and_full_strength_is_not():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    weak = T.train_pipeline(64, 0.0)
    assert np.array_equal(weak(image=image)["image"], image)
    strong = T.train_pipeline(64, 1.0)
    changed = sum(not np.array_equal(strong(image=image)["image"], image) for _ in range(10))
    assert changed >= 8
    assert T.train_pipeline(32, 1.0)(image=image)["image"].shape == (32, 32, 3)


class FillWithStrength:
    """A spy pipeline: paints the image with round(255 * strength) it was built with."""

    def __init__(self, strength: float, size: int) -> None:
        self.strength = strength

    def set_random_state(self, *args) -> None:
        pass

    def __call__(self, image):
        return {"image": np.full_like(image, round(255 * self.strength))}


def test_strength_reaches_persistent_workers_without_rebuilding(tiny_data):
    data = read_tiny_imagenet(tiny_data)
    dataset = bm.AugmentedDataset(data.train.subset(range(8)), FillWithStrength)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    seen_workers = []
    for strength in (0.2, 0.7, 1.0):
        dataset.set_epoch(1, strength)
        values = {int(v) for x, _ in loader for v in x.unique()}
        assert values == {round(255 * strength)}
        seen_workers.append(loader._iterator._workers[0].pid)
    assert len(set(seen_workers)) == 1  # the same worker processes served every epoch


def test_augmentation_depends_on_seed_epoch_index_not_on_workers(tiny_data):
    def batches(workers, epoch, seed=3):
        loaders = loaders_for(tiny_data, batch_size=16, workers=workers, seed=seed)
        loaders.set_epoch(epoch, 1.0)
        return torch.cat([x for x, _ in loaders.train])

    a, b = batches(0, 1), batches(2, 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, batches(0, 2))


def test_mixer_probability_and_alphas_follow_strength():
    mixer = mixing.build_mixer(0.8, 1.0, 0.9, 0.1, num_classes=5)
    for s in (0.0, 0.25, 1.0):
        mixer.set_strength(s)
        assert mixer.mixup.mix_prob == pytest.approx(0.9 * s)
        assert mixer.mixup.mixup_alpha == pytest.approx(0.8 * s)
        assert mixer.mixup.cutmix_alpha == pytest.approx(1.0 * s)
    assert mixing.build_mixer(0.0, 0.0, 1.0, 0.1, 5) is None and mixing.build_mixer(0.8, 1.0, 0.0, 0.1, 5) is None


def test_mixed_targets_sum_to_one_and_strength_zero_does_not_mix():
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 5
    mixer = mixing.build_mixer(0.8, 1.0, 1.0, 0.1, num_classes=5)
    mixer.set_strength(0.0)
    x0, t0 = mixing.soft_targets(x.clone(), y, mixer, 5, 0.1)
    assert torch.equal(x0, x) and torch.equal(t0.argmax(1), y)
    mixer.set_strength(1.0)
    mixed_any = False
    for _ in range(5):
        xm, tm = mixing.soft_targets(x.clone(), y, mixer, 5, 0.1)
        assert torch.allclose(tm.sum(1), torch.ones(8))
        mixed_any |= not torch.equal(xm, x)
    assert mixed_any
    _, plain = mixing.soft_targets(x, y, None, 5, 0.1)
    assert torch.allclose(plain.sum(1), torch.ones(8)) and plain.max() == pytest.approx(0.92)


def test_normalize_on_device_matches_float_math():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(T.IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(T.Normalize()(x), expected, atol=1e-5)


def test_training_size_grows_to_img_size_in_multiples_of_8():
    sizes = [T.train_size_at(e, 10, 64, 32, until=0.75) for e in range(10)]
    assert sizes[0] == 32 and sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert sizes[7:] == [64, 64, 64] and 64 not in sizes[:5]
    assert {T.train_size_at(e, 10, 64, 0) for e in range(10)} == {64}  # off
    assert T.train_size_at(0, 1, 64, 32) == 32


def _batch(n=16, size=64, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_batch_augment_is_identity_at_zero_strength_and_resizes_like_bilinear():
    x = _batch()
    aug = T.BatchAugment(seed=1)
    aug.set_epoch(3, 0.0, 64)
    assert torch.equal(aug(x, 0), x.float())
    aug.set_epoch(3, 0.0, 32)  # progressive resizing: the whole image, resampled
    expected = torch.nn.functional.interpolate(x.float(), size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(aug(x, 0), expected, atol=1e-3)


def test_batch_augment_depends_on_seed_epoch_and_batch_only():
    x = _batch()
    aug = T.BatchAugment(seed=1)
    aug.set_epoch(2, 1.0, 48)
    a = aug(x, 5)
    assert a.shape == (16, 3, 48, 48) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 255
    assert torch.equal(a, aug(x, 5))  # a resumed run re-creates batch 5 exactly
    assert not torch.equal(a, aug(x, 6))
    aug.set_epoch(3, 1.0, 48)
    assert not torch.equal(a, aug(x, 5))
    other = T.BatchAugment(seed=1, rank=1)  # another process of a torchrun job draws its own
    other.set_epoch(2, 1.0, 48)
    assert not torch.equal(a, other(x, 5))


def test_batch_augment_changes_most_images_at_full_strength_and_keeps_greys_grey():
    grey = _batch(64)[:, :1].expand(-1, 3, -1, -1).contiguous()  # R = G = B everywhere
    aug = T.BatchAugment(seed=0)
    aug.set_epoch(1, 1.0, 64)
    out = aug(grey, 0)
    changed = (out != grey.float()).flatten(1).any(1).float().mean()
    assert changed > 0.9
    # saturation, hue and grey act on colour only: the colour matrices map grey to grey
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-2) and torch.allclose(out[:, 1], out[:, 2], atol=1e-2)


def test_batch_augment_flips_about_half_the_images_at_full_strength():
    # a left-bright / right-dark image: a flip makes the right half the brighter one
    x = torch.zeros(400, 3, 64, 64, dtype=torch.uint8)
    x[..., :32] = 255
    aug = T.BatchAugment(seed=0)
    aug.set_epoch(0, 1.0, 64)
    out = aug(x, 0)
    flipped = (out[..., 32:].mean((1, 2, 3)) > out[..., :32].mean((1, 2, 3))).float().mean()
    assert 0.4 < flipped < 0.62  # p = 0.5 x s; colour jitter, crops and greying keep the sides apart


def test_torch_backend_loader_gives_stored_uint8_images(tiny_data, tmp_path):
    plain = loaders_for(tiny_data, batch_size=4, img_size=32, use_cache=True, cache_dir=tmp_path)
    fast = bm.build_loaders(plain.data, 32, 4, 0, 0, aug_backend="torch")
    x, y = next(iter(fast.train))
    assert x.dtype == torch.uint8 and x.shape[-1] == 64  # resized by the augmentation, on the device
    first = list(fast.train.sampler)[:4]  # the batch was gathered in one go: same as image by image
    assert torch.equal(x, torch.stack([fast.train.dataset[i][0] for i in first]))
    assert y.tolist() == [fast.train.dataset[i][1] for i in first]
    assert fast.augment is not None and plain.augment is None
    fast.set_epoch(1, 0.5, size=16)
    assert (fast.augment.epoch, fast.augment.strength, fast.augment.size) == (1, 0.5, 16)
    v, _ = next(iter(fast.val))
    assert v.shape[-1] == 32  # evaluation: resized in the loader to img_size


def _augment(seed=4, rank=1, epoch=2, strength=1.0, randaugment=True):
    aug = T.BatchAugment(seed=seed, rank=rank, recipe=T.build_recipe(randaugment=randaugment))
    aug.set_epoch(epoch, strength, 24)
    return aug


def test_batch_augment_resumed_at_any_batch_draws_what_the_uninterrupted_run_drew():
    """Parameters come in chunks of CHUNK_BATCHES batches; a run resumed in the middle of one, in a
    later one, or at a smaller last batch augments that batch as the run that drew all before it."""
    c = T.CHUNK_BATCHES
    x = _batch(8, 32)
    last = c + 6  # the epoch's last batch: 5 images
    run = _augment()
    whole = [run(x, b) for b in range(last)] + [run(x[:5], last)]
    for b in (5, c + 3, last):  # mid first chunk, mid second chunk, the smaller last batch
        assert torch.equal(_augment()(x[:5] if b == last else x, b), whole[b]), b
    assert torch.equal(run(x, 5), whole[5])  # back to a chunk no longer cached
    assert torch.equal(_augment().draw(5, 7)[1], run.draw(8, 7)[1][:5])  # an image's draw: not the batch size's
    run.set_epoch(2, 0.5, 24)  # a new strength: the cached chunk is not reused
    half = run(x, 5)
    assert torch.equal(half, _augment(strength=0.5)(x, 5)) and not torch.equal(half, whole[5])


def test_batch_parameters_differ_across_batches_chunks_epochs_ranks_and_seeds():
    c = T.CHUNK_BATCHES

    def theta(aug, b):
        return aug.draw(8, b)[1]

    aug = _augment(randaugment=False)
    seen = [theta(aug, b) for b in (0, 1, c - 1, c, 2 * c + 1)]  # within a chunk and across chunks
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1 :])
    for other in (_augment(epoch=3), _augment(rank=0), _augment(seed=5)):
        other_seen = [theta(other, b) for b in (0, 1, c - 1, c, 2 * c + 1)]
        assert all(not torch.equal(a, b) for a, b in zip(seen, other_seen, strict=True))


def test_views_replace_their_ops_draws_and_keep_the_others():
    """Cached soft labels' crops and flips (`views`) take those ops' places, in RECIPE order, even
    where the op is off; every other op keeps its own draw, and the batch is the same resumed."""
    n, x = 8, _batch(8, 32)
    views = {
        "crop": {"w": torch.full((n,), 0.5), "h": torch.full((n,), 0.6), "cx": torch.zeros(n), "cy": torch.zeros(n)},
        "flip": {"on": torch.arange(n) % 2 == 0},
    }
    aug = _augment(randaugment=False)
    drawn = {op.name: d for op, d in aug.draw(n, 3)[0]}
    given, theta = aug.draw(n, 3, views)
    assert [op.name for op, _ in given] == list(drawn) == ["crop", "flip", "affine", "jitter", "gray", "erase"]
    given = {op.name: d for op, d in given}
    assert given["crop"] is views["crop"] and given["flip"] is views["flip"]
    for name in ("affine", "jitter", "gray", "erase"):
        assert all(torch.equal(given[name][k], v) for k, v in drawn[name].items()), name
    crop, flip, affine = (T.OPS[k].matrix(given[k]) for k in ("crop", "flip", "affine"))
    assert torch.allclose(theta, (crop @ flip @ affine)[:, :2])
    assert torch.equal(_augment(randaugment=False)(x, 3, views), aug(x, 3, views))
    aug.set_epoch(0, 0.0, 24)  # strength 0: flip is off, its view still applies
    assert [op.name for op, _ in aug.draw(n, 3, views)[0]] == ["crop", "flip"]


def test_mixer_mixes_image_i_with_image_b_minus_1_minus_i_into_soft_targets_that_sum_to_one():
    b = 6
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 8, 8).contiguous()  # image i is all i
    y = torch.arange(b) % 5
    own, partner = (mixup_target(t, 5, 1.0, 0.1) for t in (y, y.flip(0)))
    np.random.seed(0)
    for mixup_alpha, cutmix_alpha in ((0.8, 0.0), (0.0, 1.0)):
        mixer = mixing.build_mixer(mixup_alpha, cutmix_alpha, 1.0, 0.1, num_classes=5)
        mixer.set_strength(1.0)
        out, target = mixer(x.clone(), y)
        lam = mixer.lam
        assert 0 < lam < 1
        assert torch.allclose(target, lam * own + (1 - lam) * partner) and torch.allclose(target.sum(1), torch.ones(b))
        if mixup_alpha:
            assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0))
        else:  # one box, pasted from the partner into every image; lam is the area outside it
            from_partner = out == x.flip(0)
            assert torch.all(from_partner | (out == x))
            assert from_partner.float().mean((1, 2, 3)).tolist() == pytest.approx([1 - lam] * b)


@pytest.mark.skipif(not hasattr(Mixup, "_mix_batch"), reason="this timm has no Mixup._mix_batch to compare with")
def test_mixer_mixes_as_timms_private_mix_batch_does():
    x, y = torch.randn(6, 3, 16, 16), torch.arange(6) % 5
    for alphas in ((0.8, 1.0), (0.8, 0.0), (0.0, 1.0)):
        mixer = mixing.build_mixer(*alphas, 0.7, 0.1, num_classes=5)
        mixer.set_strength(0.9)
        for seed in range(6):
            np.random.seed(seed)
            ours, _ = mixer(x.clone(), y)
            np.random.seed(seed)
            theirs = x.clone()
            lam = mixer.mixup._mix_batch(theirs)
            assert torch.equal(ours, theirs) and mixer.lam == float(lam), (alphas, seed)
