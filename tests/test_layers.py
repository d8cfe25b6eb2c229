"""The code's shape, kept: the import contracts of .importlinter hold (and an upward import breaks
them), no first-party import hides inside a function, report.py reads runs without timm or cv2, and
every run records where it came from."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml

from conftest import ROOT
from tin.run import analysis


def lint(tree=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(tree / "tools" / "lint_imports.py")], cwd=tree, capture_output=True, text=True, timeout=300
    )


def copy_of_the_code(tmp_path):
    tree = tmp_path / "src"
    keep = {"tools", "tin", "arch", "bench", ".importlinter"}
    shutil.copytree(
        ROOT,
        tree,
        ignore=lambda d, names: [
            n for n in names if n == "__pycache__" or (d == str(ROOT) and not (n.endswith(".py") or n in keep))
        ],
    )
    return tree


def test_the_layers_hold():
    proc = lint()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Layers run one way KEPT" in proc.stdout and "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    tree = copy_of_the_code(tmp_path)
    with open(tree / "utils.py", "a") as fh:  # the bottom layer reaching for the run's folder
        fh.write("\nfrom tin.run import folder  # noqa: E402,F401\n")
    proc = lint(tree)
    assert proc.returncode == 1 and "Layers run one way BROKEN" in proc.stdout
    assert "utils is not allowed to import tin.run" in proc.stdout


def test_a_first_party_import_inside_a_function_is_refused(tmp_path):
    tree = copy_of_the_code(tmp_path)
    with open(tree / "tin" / "optim.py", "a") as fh:
        fh.write("\n\ndef late():\n    import arch\n\n    return arch\n")
    proc = lint(tree)
    assert proc.returncode == 1 and "tin/optim.py:" in proc.stdout and " arch" in proc.stdout


def test_a_module_left_out_of_the_contract_is_refused(tmp_path):
    tree = copy_of_the_code(tmp_path)
    (tree / "newtool.py").write_text('"""A new script."""\n')
    proc = lint(tree)
    assert proc.returncode == 1 and "leaves out newtool" in proc.stdout


def test_reading_runs_loads_neither_timm_nor_cv2():
    code = "import report, sys; print(sorted(m for m in ('timm', 'cv2', 'albumentations') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_run_records_its_source_in_config_yaml_and_on_its_page(trained_run):
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())["resolved"]
    (first,) = resolved["sources"]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0:  # a clone (CI's is one): the commit, and whether the tree held changes
        assert first["git"] == git.stdout.strip() and isinstance(first["dirty"], bool)
    assert len(first["code_digest"]) == 16 and first["torch"] and first["timm"] and "python" in first
    assert first["command"].startswith("python main.py ") and "--epochs 2" in first["command"]
    shown = dict(analysis.source_facts(resolved["sources"]))  # the run page's lines (its index.html)
    assert first["code_digest"] in shown["code"] and shown["command"] == first["command"]
    assert "resumed" in dict(analysis.source_facts([first, {**first, "code_digest": "0" * 16}]))
