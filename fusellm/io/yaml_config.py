"""Reading a config file and describing what is wrong with it, the same way for every config.

Errors name the file and every bad field (``fusion.yaml: training.micro_batch: ...``), so a
typo costs a second, not an hour into extraction.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(err: ValidationError) -> str:
    """One line per problem, each naming its field (``sources[1].uri: ...``)."""
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{_field(e['loc'])}: {msg}" if e["loc"] else msg)
    return "; ".join(lines)


def read_yaml(path: str | Path, error: type[Exception], what: str):
    """The YAML value in `path`; `error` names the file when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({err})") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be a {what}") from None
    except (ValueError, TypeError) as err:  # e.g. a date that does not exist: 2020-13-45
        raise error(f"{path}: a value YAML cannot read ({err})") from None
