"""The command line and YAML presets -> a validated Config: defaults < ``--config`` file < flags."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from tin.config.checks import validate
from tin.config.schema import HELP_GROUPS, PATHS, RESOLVED_KEY, Config, base_type, choices_of, upgrade_saved
from utils import UserError, with_guess


def _auto_number(kind: type):
    def parse(text: str):
        if str(text).strip().lower() in ("auto", "none", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _word(text: str, words: dict[str, Any]) -> Any:
    if text not in words:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(words)} (or the flag alone)")
    return words[text]


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """The parser generated from Config's fields. suppress=True: options not given are left out of
    the result (to see what the command line set)."""
    parser = argparse.ArgumentParser(
        description="Train an image classifier on Tiny-ImageNet-200.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # --ep 3 must not quietly mean --epochs 3
        argument_default=argparse.SUPPRESS if suppress else None,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file whose keys become the defaults")
    groups = {title: parser.add_argument_group(title) for title in HELP_GROUPS}
    group_of = {name: groups[title] for title, names in HELP_GROUPS.items() for name in names}
    for f in fields(Config):
        group = group_of.get(f.name, parser)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meta, name = f.metadata, f"--{f.name}"
        kwargs: dict[str, Any] = {"default": "auto" if default is None else default, "help": meta["help"]}
        if suppress:
            kwargs["default"] = argparse.SUPPRESS
        if meta.get("onoff"):  # --amp [auto|on|off], --amp = on, --no-amp = off
            group.add_argument(name, nargs="?", const="on", choices=choices_of(f), **kwargs)
            group.add_argument(
                f"--no-{f.name}",
                dest=f.name,
                action="store_const",
                const="off",
                default=argparse.SUPPRESS,
                help=f"{name} off",
            )
            continue
        if meta.get("words"):  # --tta, --tta flip, --tta none
            words = meta["words"]
            kwargs.update(nargs="?", const=True, type=lambda w, words=words: _word(w, words), metavar="|".join(words))
        elif base_type(f) == PATHS:  # --teacher A B
            kwargs.update(nargs="+", metavar=meta.get("metavar"))
        elif base_type(f) == "bool":
            # on/off switches (--ema); plain flags (--no_cache) where the seed style has them
            kwargs["action"] = "store_true" if meta.get("flag") else argparse.BooleanOptionalAction
        else:
            kind = {"int": int, "float": float, "str": str}[base_type(f)]
            kwargs["type"] = _auto_number(kind) if default is None else kind
            if "choices" in meta:
                kwargs["choices"] = choices_of(f)
        group.add_argument(name, **kwargs)
    return parser


def load_yaml_defaults(path: str) -> dict[str, Any]:
    """Read a YAML preset (or a run's config.yaml); unknown keys and wrong types are errors naming the file."""
    p = Path(path)
    if not p.is_file():
        near = [str(q) for q in sorted(p.parent.glob("*.y*ml"))] if p.parent.is_dir() else []
        close = difflib.get_close_matches(str(p), near, n=2, cutoff=0.6)
        hint = (
            f" (did you mean {' or '.join(close)}?)" if close else f" (the presets: {p.parent}/*.yaml)" if near else ""
        )
        raise UserError(f"config file {p} does not exist{hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a mapping of option: value, got {type(data).__name__}")
    data.pop(RESOLVED_KEY, None)
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"config file {p}: unknown key(s) {', '.join(with_guess(k, known) for k in unknown)}")
    for key, value in data.items():
        data[key] = _coerce(p, key, value, known[key])
        choices = choices_of(known[key])
        if choices is not None and data[key] not in choices:
            raise UserError(f"config file {p}: {key} must be one of {list(choices)}, got {value!r}")
    return data


def _coerce(path: Path, key: str, value: Any, f: dataclasses.Field) -> Any:
    type_name = base_type(f)
    words = f.metadata.get("words")
    if words:  # tta: true (older files, and YAML's own booleans), or a word: tta: final
        if isinstance(value, bool) or (isinstance(value, str) and value in words.values()):
            return value
        if isinstance(value, str) and value in words:
            return words[value]
        where = f"config file {path}" if str(path).endswith((".yaml", ".yml")) else str(path)
        raise UserError(f"{where}: {key} must be true, false or one of {', '.join(words)}, got {value!r}")
    if type_name == PATHS:  # teacher: PATH, or a list of them
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            return [v for v in values if v]
    if f.metadata.get("onoff") and isinstance(value, bool):  # older files: amp: true
        return "on" if value else "off"
    if f.default is None and (value is None or str(value).strip().lower() == "auto"):
        return None
    wanted = {"int": int, "float": float, "str": str, "bool": bool}.get(type_name, list)
    if wanted is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if wanted is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if wanted is not list and isinstance(value, wanted) and not (wanted is int and isinstance(value, bool)):
        return value
    where = f"config file {path}" if str(path).endswith((".yaml", ".yml")) else str(path)
    kind = "a path or a list of paths" if type_name == PATHS else type_name
    raise UserError(f"{where}: {key} must be {kind}{' or auto' if f.default is None else ''}, got {value!r}")


def config_from(values: dict[str, Any], origins: dict[str, str]) -> Config:
    """The validated Config of `values` (the rest at their defaults), each value checked against its
    field and any error naming where it came from (`origins`: key -> a preset file, "--set")."""
    known = {f.name: f for f in fields(Config)}
    for key in values:
        if key not in known:
            raise UserError(f"{origins.get(key, 'a value')}: unknown key {with_guess(key, known)}")
    coerced = {k: _coerce(Path(origins.get(k, "?")), k, v, known[k]) for k, v in values.items()}
    return validate(Config(**coerced), origins)


def parse_config(argv: list[str] | None = None, base: dict[str, Any] | None = None) -> Config:
    """argv -> validated Config. Bad input raises UserError (argparse errors exit with code 2).
    `base` (a resumed run's saved config) replaces the defaults; the command line still wins."""
    parser = build_parser()
    pre, unknown = parser.parse_known_args(argv)
    flags = [u.split("=")[0] for u in unknown if u.startswith("--")]
    if flags:
        known = [a.removeprefix("--") for a in parser._option_string_actions if a.startswith("--")]
        raise UserError(f"unknown option(s) {', '.join(with_guess(f, known, '--') for f in flags)}; see --help")
    origins: dict[str, str] = {}
    if base is not None:
        if pre.config:
            raise UserError("--resume takes the run's own settings: drop --config")
        saved = upgrade_saved(base)
        parser.set_defaults(**saved)
        origins.update(dict.fromkeys(saved, "the resumed run's config"))
    if pre.config:
        preset = load_yaml_defaults(pre.config)
        parser.set_defaults(**preset)
        origins.update(dict.fromkeys(preset, pre.config))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    for name in vars(build_parser(suppress=True).parse_args(argv)):  # on the command line: said by the user
        origins.pop(name, None)
    for f in fields(Config):
        if f.default is None and args[f.name] == "auto":  # the parser's shown default
            args[f.name] = None
    return validate(Config(**args), origins)
