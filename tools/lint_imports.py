"""The import contracts of .importlinter (docs/ARCHITECTURE.md's layers), checked by import-linter.

    python tools/lint_imports.py        # what `make lint` runs; exit 1 on a broken contract

import-linter (grimp) builds its graph from packages only, and the original project's modules
(main.py, train.py, val.py, ...) are single files at the root (grimp issue #300). So the check runs
on a copy of the tree in which each root module ``X.py`` is the package ``X/__init__.py``, byte for
byte the same code, and tin/, arch/ and bench/ are copied as they are: the same modules, the same
imports, the same names. Before that it refuses a first-party module that no layer names (it would
escape every contract) and a function-local import of a first-party module (DESIGN.md: imports sit
at the top, so that the graph import-linter reads is the whole graph).
"""

from __future__ import annotations

import ast
import configparser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tin", "arch", "bench")


def first_party() -> list[str]:
    """The root's modules and packages: what the contracts must cover."""
    return sorted([p.stem for p in ROOT.glob("*.py")] + [p for p in PACKAGES if (ROOT / p / "__init__.py").is_file()])


def files() -> list[Path]:
    return sorted(ROOT.glob("*.py")) + sorted(f for p in PACKAGES for f in (ROOT / p).rglob("*.py"))


def local_imports(names: set[str]) -> list[str]:
    """`file:line module` for each import of a first-party module inside a function."""
    found = []
    for path in files():
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom):
                    mods = [node.module or ""] if node.level == 0 else ["." * node.level]
                for mod in mods:
                    if mod.split(".")[0] in names or mod.startswith("."):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {mod}")
    return found


def uncovered(config: configparser.ConfigParser, modules: list[str]) -> list[str]:
    roots = config["importlinter"]["root_packages"].split()
    layers = config["importlinter:contract:layers"]["layers"].replace("|", " ").replace(":", " ").split()
    return [m for m in modules if m not in roots or not any(layer.split(".")[0] == m for layer in layers)]


def mirror(into: Path, modules: list[str]) -> None:
    for name in modules:
        if (ROOT / f"{name}.py").is_file():
            (into / name).mkdir()
            shutil.copyfile(ROOT / f"{name}.py", into / name / "__init__.py")
        else:
            shutil.copytree(ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))


def main() -> int:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    modules = first_party()
    missing = uncovered(config, modules)
    if missing:
        print(f"error: .importlinter leaves out {', '.join(missing)}: add each to root_packages and to a layer")
        return 1
    local = local_imports(set(modules))
    if local:
        print("error: first-party imports inside functions (move them to the top of the module):")
        print("\n".join(f"  {line}" for line in local))
        return 1
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="lint-imports-") as tmp:
        mirror(Path(tmp), modules)
        cmd = [str(lint), str(ROOT / ".importlinter"), "--no-cache"]
        return subprocess.run(cmd, cwd=tmp, env={"PYTHONPATH": tmp, "PATH": "/usr/bin:/bin"}).returncode


if __name__ == "__main__":
    sys.exit(main())
