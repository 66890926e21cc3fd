"""A fusion config from its YAML file plus `--set a.b=c` overrides, for every command that reads one.

An override changes the file's data before validation, so it is checked exactly like the file
(every error names the file and the field) and a relative path in a value is relative to the
config file, as it would be written there. Values are YAML (`--set training.lam=0.5` is a
number, `--set evaluation.suites=[local,bbh]` a list, `--set tracking.primary_suite=null`
None); list items are addressed by index (`--set sources[1].dtype=float32`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from fusellm.config import FusionConfig, FusionConfigError, parse_fusion_config
from fusellm.io.yaml_config import read_yaml

_PART = re.compile(r"([^.\[\]=\s]+)((?:\[\d+\])*)")  # a field or mapping key, then [i]...


def parse_override(text: str) -> tuple[list[str | int], object]:
    """``sources[1].dtype=float32`` -> (["sources", 1, "dtype"], "float32")."""
    path, eq, value = text.partition("=")
    if not eq or not path.strip():
        raise ValueError(f"{text!r}: expected FIELD=VALUE, e.g. training.lam=0.5")
    keys: list[str | int] = []
    for part in path.strip().split("."):
        match = _PART.fullmatch(part)
        if not match:
            raise ValueError(f"{path!r}: {part!r} is not a field name (optionally with [index])")
        keys.append(match[1])
        keys += [int(i) for i in re.findall(r"\[(\d+)\]", match[2])]
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: the value {value!r} is not YAML ({err})") from None
    return keys, parsed


def _where(keys: Sequence[str | int]) -> str:
    return "".join(
        f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keys)
    )


def apply_override(data: dict, keys: Sequence[str | int], value) -> None:
    """Set `value` at `keys` in `data`, creating missing sections; list items must exist."""
    node = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = _where(keys[:depth]) or "the config"
        if isinstance(key, int):
            if not isinstance(node, list):
                raise TypeError(f"{here} is not a list, so it has no item [{key}]")
            if key >= len(node):
                raise ValueError(f"{here} has {len(node)} item(s); there is no [{key}]")
        elif not isinstance(node, dict):
            raise TypeError(f"{here} is not a mapping, so it has no field {key!r}")
        if last:
            node[key] = value
        elif isinstance(key, str) and node.get(key) is None:
            node[key] = [] if isinstance(keys[depth + 1], int) else {}
            node = node[key]
        else:
            node = node[key]


def apply_overrides(data, sets: Sequence[str], source: str) -> tuple[object, list[str]]:
    """The config data with every override applied, and one problem line per bad override."""
    problems = []
    for text in sets:
        try:
            keys, value = parse_override(text)
        except ValueError as err:
            problems.append(f"{source}: --set {err}")
            continue
        try:
            if not isinstance(data, dict):
                raise TypeError("the config is not a mapping")
            apply_override(data, keys, value)
        except (TypeError, ValueError) as err:
            problems.append(f"{source}: --set {_where(keys)}: {err}")
    return data, problems


def load_config(path: str | Path, sets: Sequence[str] = ()) -> FusionConfig:
    """Read the fusion config at `path` with the `sets` overrides (``"sources[1].dtype=float32"``).

    Raises `FusionConfigError` naming the file and each bad field or override; `.problems`
    lists them one per line.
    """
    source = str(path)
    data = read_yaml(path, FusionConfigError, "fusion config")
    data, problems = apply_overrides(data, sets, source)
    try:
        config = parse_fusion_config(data, source=source, base=Path(path).resolve().parent)
    except FusionConfigError as err:
        if not problems:
            raise
        problems += err.problems
    if problems:
        raise FusionConfigError("\n".join(problems), problems)
    return config
