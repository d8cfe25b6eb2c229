"""Export a trained checkpoint for deployment, verified on real images: ONNX and a torch.export
program (.pt2), each with a JSON beside it.

    python export.py RUN_OR_CHECKPOINT [--out DIR] [--formats onnx,pt2] [--opset 20] [--verify 1000] [--data_dir DIR]

What is exported: float32 RGB images (batch, 3, H, W) holding pixel values 0..255 (decoded and
resized as predict.py does; H = W = the run's evaluation size) -> logits (batch, classes). ImageNet's
mean/std normalisation is inside the graph, so a deployment can neither forget it nor apply it
twice; the batch dimension is dynamic. Both files compute in fp32: the run may have trained and
evaluated under bf16 autocast, but fp32 is what every runtime runs, and it is a little more exact.
The JSON holds the class ids (index = output), their names, the input size, layout, range and the
mean/std inside the graph, the run's best val top-1, the versions and the verification figures.

Verification: on up to --verify images of the run's val split (its dataset, or --data_dir), the
exported model and torch (the same weights in fp32, eager, the same inputs) must give the same top-1
for >= 99.9 % of the images and every probability within PROB_TOL; the figures are printed and
written into each JSON. A failed verification is an error; the files stay, for inspection.

Why .pt2 and not TorchScript: torch.jit.trace / torch.jit.load are deprecated in the torch this
toolkit pins (a FutureWarning says to switch to torch.export). Load a .pt2 with
``torch.export.load(path).module()``; an .onnx with ``onnxruntime.InferenceSession(path)``.

ONNX needs the optional packages onnx, onnxscript (torch's exporter) and onnxruntime (the check):
``pip install -r requirements-extra.txt``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import batch_manager
import predict
from tin.data.readers import hold_out_val, read_dataset
from tin.run import load
from tin.run.folder import setup_logging
from tin.runtime import hardware
from transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from utils import UserError, write_json

log = logging.getLogger("tin")

FORMATS = ("onnx", "pt2")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
DEFAULT_OPSET = 20  # torch's exporter's own default; onnxruntime >= 1.17 runs it
MIN_OPSET = 18  # the oldest torch's torch.export-based exporter writes
# fp32 against fp32: the runtimes differ only in kernels and summation order (~1e-7 relative per
# operation). Measured: at most 1.3e-5 in a logit and 1.5e-6 in a probability over the catalogue
# (mobilenetv2, random weights), 6.6e-7 in a probability for a trained resnet9_slim. 1e-4 leaves
# room above those, while a real export fault (a missed normalisation, swapped channels, a layer in
# train mode, reduced precision: bf16 is 7e-3 away) moves probabilities by 1e-3 to 1e-2 or more.
PROB_TOL = 1e-4
MIN_AGREEMENT = 0.999  # top-1: a near-tie may flip on a summation-order difference, rarely


class Deployable(torch.nn.Module):
    """What is exported: float RGB pixel values 0..255, (B, 3, H, W) -> logits (B, C); the
    normalisation the model was trained with is inside."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def deployable(model: torch.nn.Module) -> Deployable:
    """`model` in fp32, the plain memory format and eval mode, wrapped with its normalisation."""
    return Deployable(model.float().to(memory_format=torch.contiguous_format)).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX and a torch.export program, verified.")
    p.add_argument("checkpoint", help="a run folder (its best.pth.tar) or a .pth.tar file")
    p.add_argument("--out", default=None, help="output folder (default: RUN_FOLDER/export)")
    p.add_argument("--formats", default="onnx,pt2", help="comma-separated: onnx, pt2 (default both)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--verify", type=int, default=1000, help="val images to verify on (0 = skip; default 1000)")
    p.add_argument("--data_dir", default=None, help="dataset root for verification (default: the run's)")
    p.add_argument("--batch_size", type=int, default=100, help="images per verification batch")
    args = p.parse_args(argv)
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in args.formats if f not in FORMATS]
    if bad or not args.formats:
        hint = " (TorchScript is deprecated by torch; pt2 is its successor)" if "torchscript" in bad else ""
        raise UserError(f"--formats {','.join(bad) or '(empty)'}: choose from {', '.join(FORMATS)}{hint}")
    if args.verify < 0 or args.batch_size < 1:
        raise UserError(f"--verify must be >= 0 and --batch_size >= 1 (got {args.verify}, {args.batch_size})")
    return args


# --------------------------------------------------------------------------- optional packages
def require_onnx() -> dict[str, str]:
    """{package: version} of ONNX_PACKAGES, or a one-line error naming the install."""
    found, missing = {}, []
    for name in ONNX_PACKAGES:
        try:
            found[name] = importlib.import_module(name).__version__
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f"ONNX export needs {', '.join(ONNX_PACKAGES)} (missing here: {', '.join(missing)}); install them with "
            "`pip install -r requirements-extra.txt` (or `pip install onnx onnxscript onnxruntime`), "
            "or pass --formats pt2"
        )
    return found


def check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(
            f"--opset {opset}: torch's exporter writes {MIN_OPSET}..{newest}; the default is {DEFAULT_OPSET}"
        )


# --------------------------------------------------------------------------- exporting
def _example(size: int) -> tuple[torch.Tensor]:
    return (torch.rand(2, 3, size, size) * 255,)  # 2: a batch of 1 would be specialised, not dynamic


def _dynamic_batch() -> tuple[dict]:
    return ({0: torch.export.Dim("batch")},)


def export_pt2(module: Deployable, size: int, path: Path) -> Path:
    program = torch.export.export(module, _example(size), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, path)
    return path


def export_onnx(module: Deployable, size: int, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    with warnings.catch_warnings():  # the exporter's notes on its own internals
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            _example(size),
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=_dynamic_batch(),
        )
    program.save(str(path))
    return path


EXPORTERS: dict[str, Callable] = {
    "onnx": lambda module, size, path, opset: export_onnx(module, size, path, opset),
    "pt2": lambda module, size, path, opset: export_pt2(module, size, path),
}


def runner(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """float32 (B, 3, H, W) -> logits, through the exported file as a user would load it."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"images": x})[0]
    module = torch.export.load(str(path)).module()

    def run_pt2(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run_pt2


def precision_runner(module: torch.nn.Module, dtype: torch.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """float32 (B, 3, H, W) -> logits of `module` under the run's autocast `dtype`, on the CPU."""

    def run_autocast(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), hardware.autocast(torch.device("cpu"), dtype):
            return module(torch.from_numpy(x)).float().numpy()

    return run_autocast


# --------------------------------------------------------------------------- verifying
def compare(reference: torch.nn.Module, runners: dict[str, Callable], batches) -> dict[str, dict]:
    """Per exported format, against `reference` on the same (uint8 images, labels) batches: the
    largest |probability difference|, the top-1 agreement, top-1 accuracy of both on the labelled
    images (%), and whether it passes (PROB_TOL, MIN_AGREEMENT)."""
    worst = dict.fromkeys(runners, 0.0)
    agree = dict.fromkeys(runners, 0)
    correct = dict.fromkeys([*runners, "torch"], 0)
    seen = labelled = 0
    for images, labels in batches:
        x = images.float().contiguous()
        with torch.inference_mode():
            ref = reference(x).float().softmax(1)
        known = labels >= 0
        correct["torch"] += int((ref.argmax(1) == labels)[known].sum())
        for fmt, fn in runners.items():
            probs = torch.from_numpy(fn(x.numpy())).float().softmax(1)
            worst[fmt] = max(worst[fmt], float((probs - ref).abs().max()))
            agree[fmt] += int((probs.argmax(1) == ref.argmax(1)).sum())
            correct[fmt] += int((probs.argmax(1) == labels)[known].sum())
        seen, labelled = seen + len(x), labelled + int(known.sum())
    return {
        fmt: {
            "images": seen,
            "reference": "torch, the same weights in fp32, eager, on the CPU",
            "max_abs_prob_diff": worst[fmt],
            "prob_tolerance": PROB_TOL,
            "top1_agreement": agree[fmt] / max(seen, 1),
            "min_top1_agreement": MIN_AGREEMENT,
            "top1_percent": 100 * correct[fmt] / labelled if labelled else None,
            "torch_top1_percent": 100 * correct["torch"] / labelled if labelled else None,
            "passed": seen > 0 and worst[fmt] <= PROB_TOL and agree[fmt] / seen >= MIN_AGREEMENT,
        }
        for fmt in runners
    }


def val_batches(cfg, n: int, batch_size: int) -> tuple[DataLoader, str]:
    """(batches of the first `n` images of the run's val split at its evaluation size, where they
    come from)."""
    try:
        data = read_dataset(cfg.dataset, cfg.data_dir)
    except UserError as exc:
        raise UserError(
            f"verification needs the run's val images: {exc}; or pass --data_dir DIR or --verify 0"
        ) from None
    if cfg.val_split:
        data = hold_out_val(data, cfg.val_split, cfg.seed)
    if data.val is None:
        raise UserError(f"{data.root} has no labelled val split to verify on; pass --data_dir DIR or --verify 0")
    split = data.val.subset(list(range(min(n, len(data.val)))))
    dataset = batch_manager.AugmentedDataset(split, size=cfg.eval_px)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=batch_manager.collate), f"val split of {data.root}"


def verify(m: load.Loaded, module: Deployable, files: dict[str, Path], infos: dict[str, dict], batches) -> None:
    """compare() on the run's val images; the figures go into `infos` and on the console. The run's own
    precision (bf16 autocast, say) is measured against fp32 too: what the exported fp32 model may
    differ by from the run's own figures, and why the check is against torch in fp32."""
    batches, where = batches
    runners = {fmt: runner(fmt, f) for fmt, f in files.items()}
    if m.amp_dtype is not None:
        runners["as_run"] = precision_runner(module, m.amp_dtype)
    figures = compare(module, runners, batches)
    as_run = figures.pop("as_run", None)
    if as_run is not None:
        as_run = {"precision": str(m.amp_dtype).removeprefix("torch."), **as_run}
        for key in ("reference", "prob_tolerance", "min_top1_agreement", "passed", "torch_top1_percent"):
            as_run.pop(key)
        log.info(
            "the run's own precision (%s autocast) against fp32 torch: max |prob diff| %.1e, top-1 agreement %.2f%%",
            as_run["precision"],
            as_run["max_abs_prob_diff"],
            100 * as_run["top1_agreement"],
        )
    for fmt, fig in figures.items():
        infos[fmt]["verification"] = {"source": where, **fig, "run_precision_vs_fp32": as_run}
        log.info(
            "%s against torch on %d images (%s): max |prob diff| %.1e (tolerance %.0e), "
            "top-1 agreement %.2f%% (>= %.1f%%), top-1 %.2f%% (torch %.2f%%): %s",
            fmt,
            fig["images"],
            where,
            fig["max_abs_prob_diff"],
            PROB_TOL,
            100 * fig["top1_agreement"],
            100 * MIN_AGREEMENT,
            fig["top1_percent"] or 0.0,
            fig["torch_top1_percent"] or 0.0,
            "passed" if fig["passed"] else "FAILED",
        )


# --------------------------------------------------------------------------- the command
def _resize_note(cfg) -> str:
    store, size = predict.store_of(cfg), cfg.eval_px
    steps = {
        None: f"to {size}x{size} (cv2 bilinear)",
        size: f"to {size}x{size} (PIL bilinear)",
    }.get(store, f"to {store}x{store} (PIL bilinear), then to {size}x{size} (cv2 bilinear)")
    return f"as predict.py and the run's evaluation: decode to RGB, resize {steps}"


def describe(m: load.Loaded, fmt: str, path: Path, versions: dict) -> dict:
    """The JSON beside an exported file: everything needed to use it without this toolkit."""
    size, names = m.cfg.eval_px, m.names or {}
    return {
        "file": path.name,
        "format": {"onnx": "ONNX", "pt2": "torch.export program (torch.export.load(path).module())"}[fmt],
        "arch": m.cfg.arch,
        "checkpoint": str(m.path),
        "classes": m.classes,
        "names": [names.get(c, c) for c in m.classes],
        "input": {
            "name": "images",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "range": "0..255: pixel values as float, not normalised",
            "normalisation": "inside the model: (x / 255 - mean) / std",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "resize": _resize_note(m.cfg),
        },
        "output": {"name": "logits", "shape": ["batch", len(m.classes)], "probabilities": "softmax over axis 1"},
        "precision": "fp32",
        "run_val_top1": m.best.get("val_top1"),
        "run_best_epoch": m.best.get("best_epoch"),
        "versions": versions,
    }


def run(argv: list[str] | None = None) -> dict[str, dict]:
    """Export and verify; returns {format: its JSON}."""

    args = parse_args(argv)
    setup_logging()
    versions = {"torch": torch.__version__}
    if "onnx" in args.formats:
        versions.update(require_onnx())
        check_opset(args.opset)
    source = Path(args.checkpoint)
    path = source / "best.pth.tar" if source.is_dir() else source
    m = load.load_model(path, torch.device("cpu"), **({"data_dir": args.data_dir} if args.data_dir else {}))
    module = deployable(m.model)
    # the images to verify on are found before anything is written: no unverified file is left
    # where a deployment would pick it up when they are missing
    batches = val_batches(m.cfg, args.verify, args.batch_size) if args.verify else None
    out = Path(args.out) if args.out else path.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    files, infos = {}, {}
    for fmt in args.formats:
        files[fmt] = EXPORTERS[fmt](module, m.cfg.eval_px, out / f"model.{fmt}", args.opset)
        infos[fmt] = describe(m, fmt, files[fmt], versions) | ({"opset": args.opset} if fmt == "onnx" else {})
        log.info("wrote %s (%.1f MB)", files[fmt], files[fmt].stat().st_size / 1e6)
    if batches is not None:
        verify(m, module, files, infos, batches)
    failed = [fmt for fmt, info in infos.items() if not info.get("verification", {"passed": True})["passed"]]
    for fmt in failed:  # kept for inspection under a name no deployment loads
        files[fmt] = files[fmt].replace(files[fmt].with_name(files[fmt].name + ".failed"))
    for fmt, info in infos.items():
        write_json(info, files[fmt].with_name(files[fmt].name + ".json"))
    if failed:
        raise UserError(
            f"the exported {', '.join(failed)} model disagrees with torch beyond the tolerances: kept for inspection "
            f"as {', '.join(str(files[f]) for f in failed)} (figures in their .json); report it with the JSON"
        )
    return infos


if __name__ == "__main__":
    try:
        run()
    except UserError as exc:
        sys.exit(f"error: {exc}")
