"""export.py: ONNX and torch.export files that give the run's predictions, with a JSON a
deployment can use on its own, verified on real val images; every catalogue family exports."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

import arch
import export
import predict
from conftest import NAMES, WNIDS, odd_images
from tin.run import load
from utils import UserError


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime", reason="ONNX export needs requirements-extra.txt (make extras)")


@pytest.fixture(scope="module")
def exported(ort, trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    infos = export.run([str(trained_run), "--out", str(out), "--verify", "20", "--batch_size", "8"])
    return out, infos


def test_export_writes_verified_files_with_what_a_deployment_needs(exported, trained_run, ort):
    out, _ = exported
    info = json.loads((out / "model.onnx.json").read_text())
    best = json.loads((trained_run / "best_results.json").read_text())
    assert [info["names"][info["classes"].index(w)] for w in WNIDS] == NAMES
    assert info["input"]["shape"] == ["batch", 3, 32, 32] and info["input"]["mean"] == [0.485, 0.456, 0.406]
    assert info["run_val_top1"] == pytest.approx(best["val_top1"])
    for fmt in ("onnx", "pt2"):
        figures = json.loads((out / f"model.{fmt}.json").read_text())["verification"]
        assert figures["images"] == 20 and figures["passed"]
        assert figures["max_abs_prob_diff"] <= export.PROB_TOL and figures["top1_agreement"] >= export.MIN_AGREEMENT
    session = ort.InferenceSession(str(out / "model.onnx"))
    for batch in (1, 5):  # the batch dimension is dynamic
        x = np.random.default_rng(0).uniform(0, 255, (batch, 3, 32, 32)).astype(np.float32)
        assert session.run(None, {"images": x})[0].shape == (batch, 4)


def test_onnx_model_gives_predict_pys_top1(exported, trained_run, tmp_path, ort):
    out, infos = exported
    images = odd_images(tmp_path / "photos")
    csv_path = predict.run([str(trained_run), str(tmp_path / "photos"), "--out", str(tmp_path / "p.csv")])
    with open(csv_path, newline="") as fh:
        expected = {r["path"]: r["wnid_1"] for r in csv.DictReader(fh)}
    cfg = load.load_model(trained_run / "best.pth.tar", torch.device("cpu")).cfg
    session = ort.InferenceSession(str(out / "model.onnx"))
    paths = [p for name, p in images.items() if name != "corrupt.jpg"]
    x = np.stack([predict.load_image(p, predict.store_of(cfg), cfg.eval_px) for p in paths]).transpose(0, 3, 1, 2)
    logits = session.run(None, {"images": x.astype(np.float32)})[0]
    got = {str(p): infos["onnx"]["classes"][k] for p, k in zip(paths, logits.argmax(1), strict=True)}
    assert got == expected


def test_missing_onnxruntime_is_a_one_line_error(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails as if not installed
    with pytest.raises(UserError, match=r"pip install -r requirements-extra.txt") as err:
        export.run([str(trained_run), "--out", str(tmp_path)])
    assert "onnxruntime" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written


FAMILIES = {}
for name, spec in arch.REGISTRY.items():
    FAMILIES.setdefault(spec.family, name)  # the first of each family: resnet18, vit_small, ...
FAMILIES["vit"] = "vit_tiny"  # the small one: the same ops


def test_nothing_unverified_is_left_where_a_deployment_would_load_it(trained_run, tmp_path, monkeypatch, ort):
    """Without the val images to verify on: one line before any file is written. A model that fails
    verification is kept under a .failed name (no model.onnx / model.pt2 to pick up by mistake)."""
    out = tmp_path / "export"
    with pytest.raises(UserError, match=r"verification needs the run's val images.*--verify 0"):
        export.run([str(trained_run), "--out", str(out), "--data_dir", str(tmp_path / "nowhere")])
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(export, "PROB_TOL", -1.0)  # a real comparison no export can pass
    with pytest.raises(UserError, match=r"disagrees with torch.*model\.onnx\.failed"):
        export.run([str(trained_run), "--out", str(out), "--verify", "8", "--batch_size", "8"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model.onnx.failed", "model.onnx.failed.json", "model.pt2.failed", "model.pt2.failed.json"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19" else n for n in FAMILIES.values()],
)
def test_every_family_exports_and_agrees_with_torch(name, tmp_path, ort):
    """ONNX only: torch's ONNX exporter starts with torch.export, which is all a .pt2 is."""
    torch.manual_seed(0)
    module = export.deployable(arch.build_model(name, 4, 32))
    onnx_file = export.export_onnx(module, 32, tmp_path / "m.onnx")
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    batches = [(images[:1], torch.tensor([0])), (images[1:], torch.arange(5) % 4)]  # two batch sizes
    figures = export.compare(module, {"onnx": export.runner("onnx", onnx_file)}, batches)["onnx"]
    assert figures["max_abs_prob_diff"] <= export.PROB_TOL, figures
