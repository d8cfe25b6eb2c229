"""See what a model learned, and what a dataset holds (analyze.py is its command line; the end of
every training run calls ``analyze_run``).

`run` (also done at the end of every training run) writes into the run folder: curves.png,
confusion_matrix.png (classes ordered so that confusions cluster) + top_confusions.csv,
features/{logits,labels,features}.pt, tsne.png, misclassified.png and per_class_accuracy.csv,
and logs the best and worst 10 classes. `dataset` writes size_distribution_histograms.png,
split_image_counts.png, class_balance.png, sample_grid.png and dataset_summary.json.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import arch  # noqa: E402
import batch_manager  # noqa: E402
from tin.checkpoint import load_checkpoint  # noqa: E402
from tin.config.schema import RESOLVED_KEY, from_saved  # noqa: E402
from tin.data.readers import read_dataset, short_name  # noqa: E402
from tin.run import page  # noqa: E402
from tin.run.submission import write_csv  # noqa: E402
from tin.runtime import hardware  # noqa: E402
from transforms import Normalize  # noqa: E402
from utils import UserError  # noqa: E402
from val import infer, per_class_accuracy  # noqa: E402

log = logging.getLogger("tin")


# --------------------------------------------------------------------------- training curves
def plot_curves(metrics_csv: Path, out: Path) -> Path:
    rows = list(csv.DictReader(open(metrics_csv)))
    if not rows:
        raise UserError(f"{metrics_csv} has no epochs yet")

    def col(name):
        return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])

    epoch = col("epoch")
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(epoch, col("train_loss"), label="train")
    ax[0].plot(epoch, col("val_loss"), label="val")
    ax[0].set(title="loss", xlabel="epoch")
    ax[1].plot(epoch, col("train_top1"), label="train (unmixed labels)")
    ax[1].plot(epoch, col("val_top1"), label="val top-1")
    ax[1].plot(epoch, col("val_top5"), label="val top-5", alpha=0.6)
    if "ema_val_top1" in rows[0]:
        ax[1].plot(epoch, col("ema_val_top1"), label="EMA val top-1")
    ax[1].set(title="accuracy (%)", xlabel="epoch")
    ax[2].plot(epoch, col("lr"), color="tab:red", label="learning rate")
    ax[2].set(title="schedules", xlabel="epoch", ylabel="learning rate")
    twin = ax[2].twinx()
    twin.plot(epoch, col("aug_strength"), color="tab:green", label="aug strength")
    twin.set(ylabel="augmentation strength", ylim=(0, 1.05))
    for a in ax[:2]:
        a.legend()
        a.grid(alpha=0.3)
    ax[2].legend(loc="upper left")
    twin.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- confusions
def confusion(preds: torch.Tensor, labels: torch.Tensor, n: int) -> np.ndarray:
    return np.bincount(labels.numpy() * n + preds.numpy(), minlength=n * n).reshape(n, n)


def cluster_order(cm: np.ndarray) -> np.ndarray:
    """Class order that puts classes confused with each other side by side (average-linkage
    clustering of the symmetrised, row-normalised confusion)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    sim = (rates + rates.T) / 2
    np.fill_diagonal(sim, 0)
    dist = 1.0 - sim / max(sim.max(), 1e-12)
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


READABLE = 40  # classes whose names a confusion matrix can print legibly


def plot_confusion(cm: np.ndarray, names: list[str], out: Path, title: str = "") -> Path:
    """Rows normalised, sqrt colour, classes clustered so confusions sit side by side. Up to READABLE
    classes get their names on the axes; beyond that the picture shows the structure (the pairs are
    in top_confusions.csv, the most confused classes legible in confusion_top.png)."""
    order = cluster_order(cm) if len(cm) > 2 else np.arange(len(cm))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    shown = rates[np.ix_(order, order)]
    size = min(max(6, len(cm) * 0.09), 22)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(np.sqrt(shown), cmap="magma_r", vmin=0, vmax=1)  # sqrt: small confusions stay visible
    if len(cm) <= READABLE:
        labels = [short_name(names[i]) for i in order]
        ax.set_xticks(range(len(cm)), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(len(cm)), labels, fontsize=8)
        title = title or "confusion (rows normalised, sqrt colour; clustered order)"
    else:
        ax.set(xticks=[], yticks=[])
        title = title or (
            f"confusion of {len(cm)} classes (rows normalised, sqrt colour, clustered): names of the pairs in "
            "top_confusions.csv, the most confused classes in confusion_top.png"
        )
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, fraction=0.03)
    cbar.set_ticks(np.sqrt([0, 0.05, 0.25, 0.5, 1.0]), labels=["0", "5%", "25%", "50%", "100%"])
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def most_confused(cm: np.ndarray, k: int = 20) -> np.ndarray:
    """The k classes involved in the most confusions (as true or predicted class), for a legible
    confusion matrix of the hard part."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    return np.sort(np.argsort(off.sum(0) + off.sum(1))[::-1][:k])


def top_confusions(cm: np.ndarray, classes: list[str], names: dict[str, str], k: int = 50) -> list[dict]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    rows = []
    for idx in flat:
        t, p = divmod(int(idx), len(cm))
        if off[t, p] == 0:
            break
        rows.append(
            {
                "true": classes[t],
                "true_name": names.get(classes[t], classes[t]),
                "predicted": classes[p],
                "predicted_name": names.get(classes[p], classes[p]),
                "count": int(off[t, p]),
            }
        )
    return rows


# --------------------------------------------------------------------------- features
def plot_tsne(
    features: torch.Tensor,
    labels: torch.Tensor,
    out: Path,
    samples: int = 2000,
    seed: int = 0,
    names: list[str] | None = None,
    highlight: int = 10,
) -> Path:
    """t-SNE of the penultimate features. `highlight` classes (the best-represented in the sample)
    get a colour and a legend entry each; the others are grey dots, so the legend stays readable."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = rng.choice(len(features), size=min(samples, len(features)), replace=False)
    x = features[idx].numpy().astype(np.float32)
    perplexity = min(30, max(2, len(idx) // 4))
    emb = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
    y = labels[idx].numpy()
    counts = np.bincount(y)
    shown = [int(c) for c in np.argsort(counts)[::-1][:highlight] if counts[c] > 0]
    fig, ax = plt.subplots(figsize=(10, 9))
    rest = ~np.isin(y, shown)
    ax.scatter(emb[rest, 0], emb[rest, 1], c="lightgrey", s=4, alpha=0.6, label=f"other classes ({rest.sum()} images)")
    colours = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20")
    for k, c in enumerate(shown):
        mine = y == c
        name = short_name(names[c]) if names is not None else str(c)
        ax.scatter(emb[mine, 0], emb[mine, 1], color=colours(k), s=10, label=name)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    ax.set(title=f"t-SNE of penultimate features ({len(idx)} val images)", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_misclassified(images: list[np.ndarray], captions: list[str], out: Path, title: str | None = None) -> Path:
    cols = 6
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.6 + 0.4))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    if not images:
        fig.text(0.5, 0.5, "no misclassified val images", ha="center", va="center", fontsize=14)
    for ax, image, caption in zip(np.atleast_1d(axes).ravel(), images, captions, strict=False):
        ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title or "most confident mistakes (true → predicted, confidence)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- a run
def analyze_run(
    run_dir: str | Path,
    output_dir: str | Path | None = None,
    tsne_samples: int = 2000,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    full: bool = True,
) -> Path:
    """Curves, per-class accuracy, confusions, mistakes and the run page of a run folder, and with
    `full` the penultimate features (saved) and their t-SNE; the model runs on `device` (main.py
    passes the training device, so a GPU run is analysed on the GPU)."""

    run_dir = Path(run_dir)
    out = Path(output_dir) if output_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / "metrics.csv").is_file():
        plot_curves(run_dir / "metrics.csv", out / "curves.png")
    ckpt = load_checkpoint(run_dir / "best.pth.tar")
    cfg = from_saved(ckpt["config"], trainval=False, resume="", **({"workers": workers} if workers is not None else {}))
    data = batch_manager.prepare_data(**cfg.data_kwargs())
    if data.val is None or data.classes != list(ckpt["classes"]):
        raise UserError(f"{run_dir}: its dataset's labelled val split is needed for the analysis")
    device = torch.device(device)
    model = arch.build_model(cfg.arch, len(data.classes), cfg.img_size)
    model.load_state_dict(ckpt["state_dict"])
    model.to(device)
    val_loader, _ = batch_manager.eval_loaders(data, cfg.eval_px, 256, cfg.workers, pin_memory=device.type == "cuda")
    dtype = hardware.decide_runtime(device, cfg.amp, cfg.amp_dtype).amp_dtype
    res = infer(model, val_loader, Normalize().to(device), device, dtype, features=full)
    if full:
        (out / "features").mkdir(exist_ok=True)
        for key in ("logits", "labels", "features"):
            torch.save(res[key], out / "features" / f"{key}.pt")
    probs = res["logits"].softmax(1)
    preds, labels = probs.argmax(1), res["labels"]
    per_class = per_class_accuracy(preds, labels, data.classes, data.names)
    write_csv(per_class, out / "per_class_accuracy.csv")
    ranked = sorted(per_class, key=lambda r: r["accuracy"])
    log.info("worst classes: %s", "; ".join(f"{short_name(r['name'])} {r['accuracy']:.0f}%" for r in ranked[:10]))
    log.info("best classes: %s", "; ".join(f"{short_name(r['name'])} {r['accuracy']:.0f}%" for r in ranked[::-1][:10]))
    cm = confusion(preds, labels, len(data.classes))
    class_names = [data.names[c] for c in data.classes]
    plot_confusion(cm, class_names, out / "confusion_matrix.png")
    if len(cm) > READABLE:
        hard = most_confused(cm)
        top = f"the {len(hard)} classes in the most confusions (rows normalised among them, clustered)"
        plot_confusion(cm[np.ix_(hard, hard)], [class_names[i] for i in hard], out / "confusion_top.png", top)
    write_csv(top_confusions(cm, data.classes, data.names), out / "top_confusions.csv")
    if full:
        plot_tsne(res["features"], labels, out / "tsne.png", tsne_samples, names=class_names)
    wrong = torch.nonzero(preds != labels).flatten()
    worst = wrong[probs[wrong].max(1).values.argsort(descending=True)][:24].tolist()
    captions = [
        f"{short_name(data.names[data.classes[labels[i]]])}\n→ {short_name(data.names[data.classes[preds[i]]])} "
        f"({100 * probs[i].max():.0f}%)"
        for i in worst
    ]
    plot_misclassified([data.val.image(i) for i in worst], captions, out / "misclassified.png")
    pairs = [
        (data.classes.index(r["true"]), data.classes.index(r["predicted"]))
        for r in top_confusions(cm, data.classes, data.names, 10)
    ]
    examples = {(t, p): [int(i) for i in torch.nonzero((labels == t) & (preds == p)).flatten()[:4]] for t, p in pairs}
    page = run_page(
        run_dir,
        out,
        data,
        per_class,
        examples,
        [(i, c.replace("\n", " ")) for i, c in zip(worst, captions, strict=True)],
    )
    log.info("analysis written to %s (open %s in a browser)", out, page)
    return out


def run_page(run_dir: Path, out: Path, data, per_class: list[dict], examples: dict, mistakes: list) -> Path:
    """out/index.html: the run on one self-contained page (tin/run/page.py): its figures, configuration,
    per-class accuracy (sortable), the most confused pairs with examples, the surest mistakes."""

    results = (
        json.loads((run_dir / "best_results.json").read_text()) if (run_dir / "best_results.json").is_file() else {}
    )
    top1, top5 = results.get("val_top1"), results.get("val_top5")
    facts = [
        ("model", f"{results.get('arch', '?')} ({results.get('params', 0):,} parameters)"),
        ("best val top-1", f"{top1:.2f} %" if top1 is not None else "none (no val)"),
        ("top-5", f"{top5:.2f} %" if top5 is not None else "-"),
        ("epoch", str(results.get("best_epoch", "?"))),
        ("updates", f"{results.get('updates', 0):,}"),
        ("wall time", f"{results.get('wall_time_seconds', 0) / 60:.1f} min"),
        ("device", str(results.get("runtime", {}).get("device_name", "?"))),
        ("precision", str(results.get("runtime", {}).get("precision", "?"))),
    ]
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    facts += source_facts((yaml.safe_load(config_text) or {}).get(RESOLVED_KEY, {}).get("sources") or [])
    name = lambda k: short_name(data.names[data.classes[k]])  # noqa: E731
    pair_rows = []
    for (t, p), idx in examples.items():
        shown = page.thumbnails([(data.val.image(i), f"{name(t)} → {name(p)}") for i in idx])
        pair_rows.append(f"<h3>{html.escape(name(t))} taken for {html.escape(name(p))} ({len(idx)} shown)</h3>{shown}")
    sections = [
        ("", page.facts(facts)),
        ("Training curves", page.figure(out / "curves.png", "training curves")),
        (
            "Per-class accuracy (click a column to sort)",
            page.table(per_class, ["wnid", "name", "accuracy", "count"], "per-class"),
        ),
        ("Most confused pairs, with examples", "".join(pair_rows) or "<p>no confusions</p>"),
        (
            "The surest mistakes (true → predicted, confidence)",
            page.thumbnails([(data.val.image(i), c) for i, c in mistakes]),
        ),
        (
            "Confusion matrix",
            page.figure(out / "confusion_matrix.png", "confusion matrix")
            + page.figure(out / "confusion_top.png", "most confused classes"),
        ),
        ("t-SNE of the penultimate features", page.figure(out / "tsne.png", "t-SNE")),
        (
            "Configuration (config.yaml: the flags, then what auto became here)",
            f"<pre>{html.escape(config_text)}</pre>",
        ),
    ]
    title = f"{run_dir.name}: {top1:.2f} % val top-1" if top1 is not None else run_dir.name
    return page.write_page(out / "index.html", title, sections)


def source_facts(sources: list[dict]) -> list[tuple[str, str]]:
    """The run page's lines on where the run came from: the code, the versions and the command of its
    first process (config.yaml's resolved sources), and how many resumes followed."""
    if not sources:
        return [("source", "not recorded (a run of an earlier version)")]
    first = sources[0]
    code = f"code digest {first['code_digest']}"
    if first.get("git"):
        changed = f", with uncommitted changes (diff digest {first['diff_digest']})" if first.get("dirty") else ""
        code = f"git {first['git'][:12]}{changed}; {code}"
    versions = f"python {first['python']}, torch {first['torch']}, timm {first['timm']}"
    versions += f", torch's CUDA {first['cuda']} build" if first.get("cuda") else ", a CPU build of torch"
    versions += f"; GPU {first['gpu']}" if first.get("gpu") else "; no GPU"
    facts = [("code", code), ("versions", versions), ("command", first["command"])]
    if len(sources) > 1:
        same = all(s.get("code_digest") == first["code_digest"] for s in sources)
        facts.append(
            ("resumed", f"{len(sources) - 1}x, {'the same code' if same else 'with other code: see config.yaml'}")
        )
    return facts


# --------------------------------------------------------------------------- a dataset
def analyze_dataset(kind: str, data_dir: str | Path, output_dir: str | Path) -> dict:
    from PIL import Image

    data = read_dataset(kind, data_dir)  # a clear DatasetError when the folder is not a dataset
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {n: s for n, s in (("train", data.train), ("val", data.val), ("test", data.test)) if s is not None}
    sizes, modes = {}, {}
    for name, split in splits.items():
        if split.paths is not None:
            info = []
            for p in split.paths:
                with Image.open(p) as im:
                    info.append((im.size, im.mode))
            sizes[name] = [s for s, _ in info]
            modes[name] = Counter(m for _, m in info)
        else:
            sizes[name] = [split.image(0).shape[1::-1]] * len(split)
            modes[name] = Counter({"RGB": len(split)})
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in sizes.items():
        ax[0].hist([w for w, _ in s], bins=30, alpha=0.6, label=name)
        ax[1].hist([h for _, h in s], bins=30, alpha=0.6, label=name)
    ax[0].set(title="image widths", xlabel="pixels")
    ax[1].set(title="image heights", xlabel="pixels")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(out / "size_distribution_histograms.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(
        list(splits), [len(s) for s in splits.values()], color=["tab:blue", "tab:orange", "tab:green"][: len(splits)]
    )
    ax.bar_label(bars)
    ax.set(title="images per split", ylabel="images")
    fig.tight_layout()
    fig.savefig(out / "split_image_counts.png", dpi=110)
    plt.close(fig)
    counts = np.bincount(data.train.labels, minlength=len(data.classes))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(range(len(counts)), counts, width=1.0)
    ax.set(title="train images per class", xlabel="class index (sorted ids)", ylabel="images")
    fig.tight_layout()
    fig.savefig(out / "class_balance.png", dpi=110)
    plt.close(fig)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(data.train), size=min(32, len(data.train)), replace=False)
    plot_misclassified(
        [data.train.image(int(i)) for i in pick],
        [short_name(data.names[data.classes[data.train.labels[int(i)]]]) for i in pick],
        out / "sample_grid.png",
        title="random train images",
    )
    summary = {
        "root": str(data.root),
        "classes": len(data.classes),
        "images": {n: len(s) for n, s in splits.items()},
        "grayscale": {n: m.get("L", 0) for n, m in modes.items()},
        "modes": {n: dict(m) for n, m in modes.items()},
        "train_per_class": {"min": int(counts.min()), "max": int(counts.max())},
        "sizes": {n: dict(Counter(f"{w}x{h}" for w, h in s).most_common(5)) for n, s in sizes.items()},
    }
    (out / "dataset_summary.json").write_text(json.dumps(summary, indent=2))
    log.info("dataset: %s", json.dumps(summary["images"]) + f", grayscale {summary['grayscale']}")
    return summary
