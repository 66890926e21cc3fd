"""Which extra of `pip install fusellm[...]` provides a module that is not installed.

The core (`pip install fusellm`) has what the library's pure parts and `fusellm validate`,
`init`, `schema` and `plan` need (`plan` stops, naming the extra, at a stage whose key needs one:
`fusellm.stages.plan_report`); Prefect, MLflow, DeepSpeed, lm-eval and the rest come with the
extras of pyproject.toml's `[project.optional-dependencies]`. A command that reaches one of them
without it ends with one line that names the module and the extra to install (`missing_extra`,
used by `fusellm_flows.cli.main`) instead of a traceback. The extras are read from the installed
package's metadata, so this stays in step with pyproject.toml.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import metadata

# distributions whose import name is not their name with "-" as "_"
_IMPORT_NAMES = {"psycopg2-binary": "psycopg2"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _import_name(distribution: str) -> str:
    name = re.sub(r"[-_.]+", "-", distribution).lower()
    return _IMPORT_NAMES.get(name, name.replace("-", "_"))


@cache
def extras_by_module() -> dict[str, tuple[str, ...]]:
    """Top-level module -> the extras that install it, in pyproject order (none if not installed
    as a distribution: then no extra can be named)."""
    try:
        requirements = metadata.requires("fusellm") or []
    except metadata.PackageNotFoundError:
        return {}
    found: dict[str, list[str]] = {}
    for requirement in requirements:
        name, extra = _NAME.match(requirement), _EXTRA.search(requirement)
        if name and extra and name[1].lower() != "fusellm":
            found.setdefault(_import_name(name[1]), []).append(extra[1])
    return {module: tuple(extras) for module, extras in found.items()}


def extra_for(module: str, prefer: tuple[str, ...] = ()) -> str | None:
    """The extra to install for `module` (dotted names count by their top level): the first of
    `prefer` that provides it, else the first listed; None if no extra provides it."""
    extras = extras_by_module().get(module.partition(".")[0], ())
    return next((e for e in prefer if e in extras), extras[0] if extras else None)


def missing_extra(error: BaseException, prefer: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(module, extra) when `error` is a missing module that an extra installs, else None."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    extra = extra_for(error.name, prefer)
    return None if extra is None else (error.name.partition(".")[0], extra)


def install_command(extra: str) -> str:
    return f"pip install 'fusellm[{extra}]'"


def require(*modules: str) -> None:
    """ModuleNotFoundError for the first of `modules` that is not installed: for a command that
    starts them as programs (the servers) instead of importing them."""
    from importlib.util import find_spec

    for module in modules:
        if find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
