"""Model registry: short names -> models configured for the input resolution.

``build_model(name, num_classes, img_size, drop_rate=..., attn_drop_rate=..., drop_path_rate=...,
pretrained=False, pretrained_path=None)`` returns an ``nn.Module`` mapping (B, 3, img_size,
img_size) float images to (B, num_classes) logits. Models know nothing about config, devices or data.

- timm models by short name (the seeds' catalogue), or any timm model as ``timm:NAME``.
- Transformers run at the requested resolution natively: at 64x64 ViT/DeiT use 8x8 patches (an
  8x8 token grid, like 224 with 16x16 patches has 14x14) and Swin uses 4x4 windows (a 7x7 window
  does not tile the 16x16 -> 2x2 stage grids of a 64x64 input).
- Small-image ResNets (arch/resnet.py): ``resnetNN_cifar`` (3x3 stride-1 stem, no max-pool) and
  ``resnetNN_s2`` (one stride-2 3x3 conv). ``budget_cnn`` (arch/budget.py): under 1 M parameters.
- ``resnet9`` / ``resnet9_slim`` (arch/resnet9.py): Myrtle's ResNet-9 with a 2x2 patch stem, the
  CPU speed-run's model (widths from 64 / 48).
- Any width of the two small families by name: ``resnet9_wN`` (first stage N channels) and
  ``budget_cnn_wN`` (budget_cnn's stage widths scaled by N/96); ``fit_width(name, max_params, ...)``
  gives the widest that stays within a parameter budget (``--fit_params``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch

from arch.budget import BudgetNet
from arch.resnet import small_image_resnet
from arch.resnet9 import ResNet9
from utils import UserError

log = logging.getLogger("tin")

DROP_KNOBS = ("drop_rate", "attn_drop_rate", "drop_path_rate")
_CNN = ("drop_rate", "drop_path_rate")


@dataclass(frozen=True)
class ArchSpec:
    """Everything the toolkit knows about a model, in one place: how to build it, which drop knobs
    it takes, how it adapts to the input size, which learning-rate recipe it starts from (`lr_group`:
    a group of tin/optim.py's LR_RECIPES) and whether its input grid is fixed at build time (a
    transformer's position embedding: it cannot be evaluated at another --eval_size)."""

    name: str
    timm_name: str  # the timm model it is built from ("" for this project's own models)
    family: str
    knobs: tuple[str, ...]  # which of DROP_KNOBS the model accepts
    local: Callable[..., torch.nn.Module] | None = None  # builder when not plain timm
    lr_group: str = "timm"  # --lr_base auto: "cnn", "mobile", "small", "vit", "swin"; "timm": not measured
    fixed_grid: bool = False  # built for one input size (position embeddings, windows): no --eval_size

    def resolution_kwargs(self, img_size: int) -> dict:
        if self.family == "vit":
            # patch 16 at 224, 8 at 64, 4 at 32: keeps a token grid of about 8x8 or more
            patch = 16 if img_size >= 128 else max(2, img_size // 8)
            return {"img_size": img_size, "patch_size": patch}
        if self.family == "swin":
            return {"img_size": img_size, "window_size": 7 if img_size >= 224 else 4}
        return {}


def _specs() -> list[ArchSpec]:
    specs = [ArchSpec(f"resnet{d}", f"resnet{d}", "resnet", _CNN, lr_group="cnn") for d in (18, 34, 50, 101, 152)]
    vit = {"lr_group": "vit", "fixed_grid": True}
    specs += [
        ArchSpec("vit_small", "vit_small_patch16_224", "vit", DROP_KNOBS, **vit),
        ArchSpec("deit_small", "deit_small_patch16_224", "vit", DROP_KNOBS, **vit),
        ArchSpec("vit_tiny", "vit_tiny_patch16_224", "vit", DROP_KNOBS, **vit),
        ArchSpec("swin_tiny", "swin_tiny_patch4_window7_224", "swin", DROP_KNOBS, lr_group="swin", fixed_grid=True),
        ArchSpec("efficientnet_b0", "efficientnet_b0", "efficientnet", _CNN, lr_group="mobile"),
        ArchSpec("mobilenetv2_100", "mobilenetv2_100", "mobilenet", _CNN, lr_group="mobile"),
        ArchSpec("vgg19", "vgg19", "vgg", ("drop_rate",), lr_group="cnn"),
    ]
    for d in (18, 34, 50):
        for stem in ("cifar", "s2"):
            builder = partial(small_image_resnet, f"resnet{d}", stem)
            specs.append(
                ArchSpec(f"resnet{d}_{stem}", f"resnet{d}", "resnet-small", _CNN, local=builder, lr_group="cnn")
            )
    specs.append(ArchSpec("budget_cnn", "", "budget", _CNN, local=BudgetNet, lr_group="small"))
    for name, width in (("resnet9", 64), ("resnet9_slim", 48)):
        specs.append(
            ArchSpec(name, "", "resnet9", ("drop_rate",), local=partial(ResNet9, width=width), lr_group="small")
        )
    return specs


REGISTRY: dict[str, ArchSpec] = {s.name: s for s in _specs()}

# Families with a width knob: name -> (the family's name with any width, its registry default width,
# that width's builder). A budget sizes them by width alone: their depth is their design.
WIDTHS: dict[str, tuple[str, int, Callable[[int], Callable[..., torch.nn.Module]]]] = {
    "resnet9": ("resnet9_w{}", 64, lambda w: partial(ResNet9, width=w)),
    "budget_cnn": ("budget_cnn_w{}", 96, lambda w: partial(BudgetNet, widths=scaled_budget_widths(w))),
}
_WIDTH_NAME = re.compile(r"^(resnet9|budget_cnn)_w(\d+)$")
WIDTH_STEP = 4  # --fit_params tries widths in steps of 4: channel counts the vector units handle well


def scaled_budget_widths(width: int) -> tuple[int, ...]:
    """budget_cnn's stage widths (96, 192, 288, 368) scaled to a first stage of `width`, each a
    multiple of 4 (a bottleneck's middle is a quarter of its width)."""
    return tuple(max(4, 4 * round(w * width / 96 / 4)) for w in (96, 192, 288, 368))


def _width_spec(name: str) -> ArchSpec | None:
    """`resnet9_w24`, `budget_cnn_w80`: a registry family at that width (None: no such name)."""
    m = _WIDTH_NAME.match(name)
    if m is None or not 4 <= int(m.group(2)) <= 1024:
        return None
    base = REGISTRY[m.group(1)]
    return dataclasses.replace(base, name=name, local=WIDTHS[m.group(1)][2](int(m.group(2))))


def width_family(name: str) -> str | None:
    """The width family of `name` (resnet9_slim and resnet9_w24 are resnet9's), or None."""
    m = _WIDTH_NAME.match(name)
    if m:
        return m.group(1)
    return {"resnet9": "resnet9", "resnet9_slim": "resnet9", "budget_cnn": "budget_cnn"}.get(name)


def fit_width(name: str, max_params: int, num_classes: int, img_size: int = 64) -> tuple[str, int]:
    """(the widest `name`-family model with at most `max_params` parameters, its parameters): widths
    in steps of WIDTH_STEP, counted on the meta device (instant). UserError when the family has no
    width knob or not even its narrowest fits."""
    family = width_family(name)
    if family is None:
        raise UserError(
            f"--fit_params sizes a family by its width: {', '.join(WIDTHS)} (and their _wN forms) have one, "
            f"--arch {name} does not; pass --arch resnet9 (or set --max_params to check {name} as it is)"
        )
    pattern = WIDTHS[family][0]
    widths = range(WIDTH_STEP, 1025, WIDTH_STEP)
    lo, hi = -1, len(widths)  # bisection: parameters grow with the width
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = count_params(pattern.format(widths[mid]), num_classes, img_size) <= max_params
        lo, hi = (mid, hi) if fits else (lo, mid)
    if lo < 0:
        smallest = count_params(pattern.format(WIDTH_STEP), num_classes, img_size)
        raise UserError(
            f"--fit_params {max_params:,}: even {pattern.format(WIDTH_STEP)} has {smallest:,} parameters with "
            f"{num_classes} classes; raise --fit_params"
        )
    best = pattern.format(widths[lo])
    return best, count_params(best, num_classes, img_size)


def list_archs() -> list[str]:
    return list(REGISTRY)


def resolve(name: str | ArchSpec) -> ArchSpec:
    """A registry entry, or an ad-hoc one for ``timm:NAME``; unknown names list the valid ones. A
    spec is itself: a caller that resolved the name once passes the spec on."""
    if isinstance(name, ArchSpec):
        return name
    if name.startswith("timm:"):
        timm_name = name.removeprefix("timm:")
        if not timm.is_model(timm_name):
            close = timm.list_models(f"*{timm_name.split('_')[0]}*")[:8]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise UserError(f"--arch {name}: timm has no model {timm_name!r}{hint}; see timm.list_models()")
        return ArchSpec(name, timm_name, "timm", DROP_KNOBS)  # what it really takes shows when building
    spec = REGISTRY.get(name) or _width_spec(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(REGISTRY), n=2, cutoff=0.6)
        guess = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(
            f"unknown --arch {name!r}; {guess}the catalogue: python main.py --list_archs (any timm model: timm:NAME; "
            "any width: resnet9_wN, budget_cnn_wN)"
        )
    return spec


def _create_timm(timm_name: str, num_classes: int, knobs: dict, **extra) -> torch.nn.Module:
    """timm.create_model; a drop knob the model's class does not take is reported and left out."""
    knobs = dict(knobs)
    while True:
        try:
            return timm.create_model(timm_name, num_classes=num_classes, **knobs, **extra)
        except TypeError as exc:
            bad = next((k for k in knobs if f"'{k}'" in str(exc)), None)
            if bad is None:
                raise
            if knobs.pop(bad):
                log.info("%s has no --%s; that flag is ignored for this model", timm_name, bad)


def build_model(
    name: str | ArchSpec,
    num_classes: int,
    img_size: int = 64,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    pretrained_path: str | None = None,
) -> torch.nn.Module:
    """Build a model; drop knobs it lacks are left out (unused_knobs names them for a message)."""
    spec = resolve(name)
    requested = {"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate}
    kwargs = {k: v for k, v in requested.items() if k in spec.knobs}
    if pretrained_path and _toolkit_checkpoint(
        pretrained_path, spec.name
    ):  # a run of ours: every tensor, head included
        model = build_model(spec, num_classes, img_size, drop_rate, attn_drop_rate, drop_path_rate)
        load_matching(model, pretrained_path)
        return model
    weights = _pretrained_kwargs(spec, pretrained, pretrained_path)
    if not spec.timm_name:  # this project's own models
        model = spec.local(num_classes=num_classes, **kwargs)
        if pretrained_path:
            load_matching(model, pretrained_path)
        return model
    if spec.local is not None:
        return spec.local(num_classes=num_classes, **kwargs, **weights)
    return _create_timm(spec.timm_name, num_classes, kwargs, **spec.resolution_kwargs(img_size), **weights)


def unused_knobs(name: str | ArchSpec, **values: float) -> list[str]:
    """The drop knobs given a non-zero value that model `name` does not have."""
    spec = resolve(name)
    return [k for k, v in values.items() if v and k not in spec.knobs]


def _toolkit_checkpoint(path: str, arch: str) -> bool:
    """Is `path` a best.pth.tar / last.pth.tar written by main.py? (Then a new run starts from all
    its weights: fine-tuning, or a longer schedule than the run had.) Another arch's is refused."""
    if not str(path).endswith(".pth.tar") or not Path(path).is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours: timm's loader gives its own message
        return False
    if not (isinstance(ckpt, dict) and {"state_dict", "config", "classes"} <= set(ckpt)):
        return False
    trained = ckpt["config"].get("arch")
    if trained != arch:
        raise UserError(
            f"--pretrained_path {path} holds a {trained} run's weights, not {arch}'s; pass --arch {trained}"
        )
    return True


def _pretrained_kwargs(spec: ArchSpec, pretrained: bool, path: str | None) -> dict:
    if path:
        if not Path(path).is_file():
            raise UserError(f"--pretrained_path {path} does not exist")
        if not spec.timm_name:  # this project's own models
            return {}
        # timm loads the file with weights_only=True, drops a classifier of another size (the head
        # is re-initialised) and resizes position embeddings / patch kernels to this resolution.
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    if not pretrained:
        return {}
    if not spec.timm_name:  # this project's own models
        raise UserError(f"{spec.name} has no published weights; pass --pretrained_path FILE or train from scratch")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(
            f"--pretrained needs the Hugging Face hub for {spec.timm_name}'s ImageNet weights, and it cannot be "
            "reached from here; download them on an online machine and pass --pretrained_path FILE (.safetensors or "
            ".pth)"
        )
    return {"pretrained": True}


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_matching(model: torch.nn.Module, path: str) -> None:
    """Load every tensor of `path` whose name and shape match; the rest (e.g. another head) keep
    their fresh initialisation. Safetensors or a (weights-only) torch checkpoint."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    log.info(
        "loaded %d tensors from %s; %d kept their initialisation: %s",
        len(usable),
        path,
        len(skipped),
        ", ".join(skipped[:6]),
    )


def model_stats(model: torch.nn.Module, img_size: int) -> tuple[int, float]:
    """(parameters, GFLOPs per image) — torch's flop counter, a multiply-add counted as 2 FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return params, counter.get_total_flops() / 1e9


def on_meta(name: str | ArchSpec, num_classes: int, img_size: int) -> torch.nn.Module:
    """The model with shapes but no values (torch's meta device): for counting, instantly."""
    with torch.device("meta"):
        return build_model(name, num_classes, img_size)


def count_params(name: str | ArchSpec, num_classes: int, img_size: int = 64) -> int:
    return sum(p.numel() for p in on_meta(name, num_classes, img_size).parameters())


def smallest(num_classes: int, img_size: int = 64) -> list[tuple[str, int]]:
    """(name, parameters) of the catalogue, smallest first: what fits a parameter budget."""
    return sorted(((name, count_params(name, num_classes, img_size)) for name in REGISTRY), key=lambda r: r[1])


def catalogue(img_size: int = 64, num_classes: int = 200) -> list[dict]:
    """One row per registry entry: name, family, params, GFLOPs at img_size, drop_path support (built
    on the meta device: seconds for the whole catalogue)."""
    rows = []
    for spec in REGISTRY.values():
        params, gflops = model_stats(on_meta(spec.name, num_classes, img_size), img_size)
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "params": params,
                "gflops": round(gflops, 3),
                "drop_path": "drop_path_rate" in spec.knobs,
            }
        )
    return rows


def print_catalogue(img_size: int, fmt: str) -> None:
    """`main.py --list_archs`: the catalogue as a table or CSV."""
    rows = catalogue(img_size)
    if fmt == "csv":
        print("name,family,params,gflops,drop_path")
        for r in rows:
            print(f"{r['name']},{r['family']},{r['params']},{r['gflops']},{str(r['drop_path']).lower()}")
        return
    print(f"{'name':<18}{'family':<14}{'params':>14}{f'GFLOPs@{img_size}':>14}  drop-path")
    for r in rows:
        drop_path = "yes" if r["drop_path"] else "no"
        print(f"{r['name']:<18}{r['family']:<14}{r['params']:>14,}{r['gflops']:>14.3f}  {drop_path}")
    print("any other timm model: --arch timm:NAME   (GFLOPs: torch's flop counter, a multiply-add = 2 FLOPs)")
    print("any width: --arch resnet9_wN / budget_cnn_wN; the widest under a budget: --arch resnet9 --fit_params N")
