"""The README stays true: every flag it mentions exists, every preset it names exists, every
command in its code blocks for main.py, evaluate.py, analyze.py and sweep.py parses (a dry parse, no
run), and every main.py flag is documented."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys

import pytest

import analyze
import evaluate
import export
import predict
import report
import sweep
from conftest import ROOT
from tin.config import cli, schema
from utils import UserError

README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")


def _help_flags(*command: str) -> set[str]:
    out = subprocess.run(list(command), cwd=ROOT, capture_output=True, text=True, timeout=120)
    return set(FLAG.findall(out.stdout + out.stderr))


# Each script's own __main__ run with these arguments, all in one process (torch and timm imported
# once, not fifteen times): what `python SCRIPT ARGS` prints.
HELPS = """
import contextlib, io, runpy, sys
out = io.StringIO()
for target, args in {commands!r}:
    sys.argv = [target, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
print(out.getvalue())
"""


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    """Every option of every command the README shows (from their own --help)."""
    commands = [
        ("main.py", ["--help"]),
        ("evaluate.py", ["--help"]),
        ("predict.py", ["--help"]),
        ("export.py", ["--help"]),
        ("analyze.py", ["run", "--help"]),
        ("analyze.py", ["dataset", "--help"]),
        ("sweep.py", ["--help"]),
        ("report.py", ["--help"]),
        ("data/download.py", ["--help"]),
        ("bench.gpu_check", ["--help"]),
        ("bench.precision", ["--help"]),
        ("bench.step", ["--help"]),
        ("bench.subset", ["--help"]),
    ]
    flags = _help_flags(sys.executable, "-c", HELPS.format(commands=commands))
    assert {"--arch", "--ensemble", "--topk", "--opset", "--tsne_samples", "--search", "--classes"} <= flags
    for script in ("docker/run_docker.sh", "docker/build_docker.sh"):
        flags |= _help_flags("bash", script, "--help")
    torchrun = {"--nproc_per_node", "--nnodes", "--node_rank", "--rdzv_backend", "--rdzv_endpoint", "--standalone"}
    others = {"--gpus-per-task", "--index-url"}  # SLURM's and pip's, named where they matter
    return flags | torchrun | others


def _code_lines(text: str) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()  # trailing comments
            if line:
                lines.append(line)
    return lines


def test_every_flag_the_readme_mentions_exists(known_flags):
    mentioned = set(FLAG.findall(README))
    unknown = sorted(mentioned - known_flags)
    assert not unknown, f"README mentions flags no command has: {unknown}"


def test_every_main_py_flag_is_documented():
    flags = {f"--{f.name}" for f in dataclasses.fields(schema.Config)} | {"--config"}
    missing = sorted(f for f in flags if f not in README)
    assert not missing, f"README's reference leaves out: {missing}"


def test_every_preset_named_exists():
    for name in set(re.findall(r"configs/[\w*.-]+\.yaml", README + "".join(DOCS.values()))):
        assert list(ROOT.glob(name)), f"{name} is named in the docs but does not exist"


SCRIPTS = {
    "main.py": lambda argv: cli.parse_config(argv),
    "evaluate.py": lambda argv: evaluate.parse_args(argv),
    "analyze.py": lambda argv: analyze.build_parser().parse_args(argv),
    "sweep.py": lambda argv: sweep.build_parser().parse_args(argv),
    "predict.py": lambda argv: predict.parse_args(argv),
    "export.py": lambda argv: export.parse_args(argv),
}


def _commands(text: str = README, scripts: dict = SCRIPTS) -> list[tuple[str, list[str]]]:
    """(script, its arguments) of every command line in `text` that runs one of `scripts`."""
    found = []
    for line in _code_lines(text):
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for i, word in enumerate(words):
            script = word.split("/")[-1]
            if script in scripts and (i == 0 or words[i - 1] in ("python", "python3") or "torchrun" in words[:i]):
                args = words[i + 1 :]
                found.append((script, args))
                break
    return found


COMMANDS = _commands()


def test_the_readme_shows_commands_for_each_script():
    assert {script for script, _ in COMMANDS} == set(SCRIPTS)


def _without_placeholders(args: list[str]) -> list[str]:
    if "..." in args or any(a.startswith("[") or a.startswith("<") for a in args):
        args = [a for a in args if a != "..." and not a.startswith(("[", "<")) and not a.endswith("]")]
    return args


@pytest.mark.parametrize("script, args", COMMANDS, ids=[f"{s} {' '.join(a)}"[:80] for s, a in COMMANDS])
def test_every_readme_command_parses(script, args):
    SCRIPTS[script](_without_placeholders(args))  # argparse exits, config raises UserError, on anything wrong


TOOLS = {"predict.py": lambda argv: predict.parse_args(argv), "export.py": lambda argv: export.parse_args(argv)}


def test_using_md_commands_parse_and_its_flags_exist(known_flags):
    commands = _commands(DOCS["USING.md"], TOOLS)
    assert {script for script, _ in commands} == set(TOOLS)
    for script, args in commands:
        TOOLS[script](_without_placeholders(args))
    unknown = sorted(set(FLAG.findall(DOCS["USING.md"])) - known_flags)
    assert not unknown, f"docs/USING.md mentions flags no command has: {unknown}"


def test_no_figure_is_left_as_a_placeholder():
    """Figures are filled in while a change is written (FIGURE-style tokens, outside code)."""
    placeholder = re.compile(r"(?<![\w`$])[A-Z][A-Z0-9]*_[A-Z0-9_]*(?:FIGURE|TABLE|EXAMPLE|RESULT|HISTORY|TIME)\b(?!`)")
    texts = {"README.md": README, **{f"docs/{k}": v for k, v in DOCS.items()}}
    texts["bench/RESULTS.md"] = (ROOT / "bench" / "RESULTS.md").read_text()
    for name, text in texts.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        assert not placeholder.findall(prose), f"{name}: placeholders left: {placeholder.findall(prose)}"


def test_the_learning_rate_table_is_the_recipe_table():
    """README's learning-rate table against tin/optim.py's LR_RECIPES, cell by cell."""
    from tin import optim

    table = README.split("| model family (`--arch`)", 1)[1].split("\n\n", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ")]
    group = {"CNNs": "cnn", "mobile": "mobile", "small": "small", "ViT/DeiT": "vit", "Swin": "swin", "any": "timm"}
    columns = [(False, "adamw"), (False, "sgd"), (True, "adamw"), (True, "sgd")]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fam = group[cells[0].split()[0].rstrip(":")]
        for (pretrained, opt), cell in zip(columns, cells[1:], strict=True):
            recipe = optim.lr_recipe(fam, pretrained, opt)
            rate, warmup = re.match(r"([\d.e-]+).*warm-up (\d+)", cell).groups()
            assert (float(rate), float(warmup)) == (recipe.lr_per_256, recipe.warmup_epochs), (cells[0], cell)


def test_preset_values_quoted_in_the_docs_are_the_presets():
    """Sentences like "`configs/demo.yaml` sets `time_budget: 2`" say what the file holds."""
    import yaml

    quoted = re.findall(r"`(configs/[\w.-]+\.yaml)`\s+sets\s+`(\w+): ([^`]+)`", README + "".join(DOCS.values()))
    assert quoted  # the README quotes at least the demo's budget
    for preset, key, value in quoted:
        assert yaml.safe_load((ROOT / preset).read_text())[key] == yaml.safe_load(value), (preset, key)


def test_the_sections_the_help_texts_point_to_exist():
    headings = set(re.findall(r"^#+ (.+)$", README, flags=re.M))
    sources = [*(ROOT / "tin" / "config").glob("*.py"), ROOT / "tin" / "optim.py", ROOT / "arch" / "__init__.py"]
    pointers = {p for f in sources for p in re.findall(r"README: ([A-Z][\w -]*\w)", f.read_text())}
    assert pointers and all(p in headings for p in pointers), pointers - headings


def test_the_first_screen_runs_as_written(tiny_data, tmp_path):
    """The README's first four commands, from this checkout: the install is make's (dry run here: CI
    made .venv), the data script installs an archive in the Tiny-ImageNet layout the way it installs
    the download, training runs the command as written with the tiny dataset and a short run
    appended, and the submission it names exists."""
    import tarfile

    first = _code_lines(README)[:4]
    assert [line.split()[0] for line in first] == ["make", "sh", ".venv/bin/python", "ls"], first
    assert subprocess.run(shlex.split(first[0]) + ["-n"], cwd=ROOT, capture_output=True).returncode == 0
    archive = tmp_path / "tiny-imagenet-200.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data, arcname="tiny-imagenet-200")
    data = tmp_path / "data" / "tiny-imagenet-200"
    extra = ["--archive", str(archive), "--dest", str(data), "--expect", "4,16,20,9"]
    assert subprocess.run(shlex.split(first[1]) + extra, cwd=ROOT, capture_output=True).returncode == 0
    train = shlex.split(first[2].replace(".venv/bin/python", sys.executable))
    train += ["--data_dir", str(data), "--output_dir", str(tmp_path / "checkpoints"), "--time_budget", "0"]
    train += ["--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "8", "--eval_size", "0", "--wandb", "disabled"]
    proc = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"submit .*best_test_preds.csv \(9 rows, checked\)", proc.stdout)
    listing = subprocess.run(
        first[3].replace("checkpoints/", f"{tmp_path}/checkpoints/"), shell=True, capture_output=True
    )
    assert listing.returncode == 0 and b"best_test_preds.csv" in listing.stdout


def test_every_script_speaks_one_grammar():
    """The run is the subject, positional; the same option names for the same things: --out for
    where a script writes, --tta as a bare flag meaning flip, --set and --grid taking several pairs."""
    runs_first = {
        "evaluate.py": evaluate.parse_args(["R1", "R2", "--out", "o", "--tta"]),
        "predict.py": predict.parse_args(["R1", "images", "--out", "o.csv", "--tta"]),
        "export.py": export.parse_args(["R1", "--out", "o"]),
        "analyze.py": analyze.build_parser().parse_args(["run", "R1", "--out", "o"]),
        "report.py": report.parse_args(["R1", "--out", "o"]),
    }
    for script, args in runs_first.items():
        assert args.__dict__.get("output_dir", args.__dict__.get("out")) in ("o", "o.csv"), script
    assert runs_first["evaluate.py"].tta == "flip" and runs_first["predict.py"].tta == "flip"
    sets = sweep.build_parser().parse_args(["p.yaml", "--set", "epochs=1", "time_budget=0", "--set", "workers=0"])
    assert sets.set == ["epochs=1", "time_budget=0", "workers=0"]
    grid = sweep.build_parser().parse_args(["p.yaml", "--grid", "lr_base=1e-3,2e-3", "epochs=1,2"])
    assert grid.grid == ["lr_base=1e-3,2e-3", "epochs=1,2"]


def test_a_mistyped_preset_is_named_with_the_one_meant(tmp_path):
    (tmp_path / "demo.yaml").write_text("epochs: 1\n")
    with pytest.raises(UserError, match=r"demo\.yml does not exist \(did you mean .*demo\.yaml\?\)"):
        cli.load_yaml_defaults(str(tmp_path / "demo.yml"))
    proc = subprocess.run([sys.executable, "sweep.py", "configs/demo.yml"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "did you mean configs/demo.yaml" in proc.stderr and "--config" not in proc.stderr


def test_main_py_help_is_grouped_as_the_readme_reference():
    """Every flag in exactly one group of --help, and each group lists the flags the README's
    reference table lists for it (the original project's flags: the table above it)."""
    names = [f.name for f in dataclasses.fields(schema.Config)]
    grouped = [n for names_ in schema.HELP_GROUPS.values() for n in names_]
    assert sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    reference = README.split("## Reference", 1)[1]
    seed_table, by_group = reference.split("| group |", 1)
    first_cells = [r.strip("|").split("|")[0] for r in seed_table.splitlines() if r.startswith("| `--")]
    seed_flags = {f for cell in first_cells for f in re.findall(r"`--([a-z_]+)`", cell)}
    assert seed_flags == set(schema.HELP_GROUPS["the original project's flags"])
    rows = [r for r in by_group.split("\n\n", 1)[0].splitlines() if r.startswith("| ") and not r.startswith("|--")]
    readme_groups = {}
    for row in rows:
        title = row.strip("|").split("|")[0].strip()
        found = dict.fromkeys(re.findall(r"--([a-z][a-z0-9_]*)", row))
        readme_groups[title] = [f for f in found if f in names and f not in seed_flags]
    for title, flags in schema.HELP_GROUPS.items():
        if title != "the original project's flags":
            assert sorted(readme_groups[title]) == sorted(flags), title
    help_text = subprocess.run([sys.executable, "main.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    titles = [line[:-1] for line in help_text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", *schema.HELP_GROUPS]
