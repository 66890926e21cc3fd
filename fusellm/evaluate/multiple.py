"""MultiPL-E execution metric: build and run a completed program per language, in the sandbox.

MultiPL-E (Cassano et al.) translates HumanEval into many languages. A record carries `prompt`
(signature and doc comment), `tests` (the asserts, starting where the completion should end) and
`stop_tokens`; the program is `prompt + completion + "\\n" + tests` and passes if it compiles and
exits 0. lm-eval's own `code_eval` metric needs the Hub and runs code unconfined, so we score with
our sandbox instead. A language whose toolchain is not installed is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fusellm.evaluate.sandbox import Limits, SandboxResult, run_program, sandbox_user

COMPILE_LIMITS = Limits(cpu_seconds=60, wall_seconds=90, memory_bytes=2 << 30, max_processes=64)
RUN_LIMITS = Limits(cpu_seconds=10, wall_seconds=20, memory_bytes=1 << 30, max_processes=64)


@dataclass(frozen=True)
class Language:
    """How to build and run one MultiPL-E language; `{tool}` is the resolved toolchain path."""

    name: str  # MultiPL-E's short name, as in the dataset config "humaneval-<name>"
    filename: str
    tools: tuple[str, ...]  # executables that must exist
    build: tuple[tuple[str, ...], ...]  # argv templates run as the caller (compilers)
    run: tuple[str, ...]  # argv template run as the sandbox user


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language("py", "main.py", ("python3",), (), ("{python3}", "-I", "main.py")),
        Language("js", "main.js", ("node",), (), ("{node}", "--max-old-space-size=512", "main.js")),
        Language(
            "cpp",
            "main.cpp",
            ("g++",),
            (("{g++}", "-std=c++17", "-O0", "-o", "main", "main.cpp"),),
            ("./main",),
        ),
        Language(
            "java",
            "Problem.java",
            ("javac", "java"),
            (
                (
                    "{javac}",
                    "-J-Xmx512m",
                    "-J-XX:+UseSerialGC",
                    "-cp",
                    "{classpath}",
                    "Problem.java",
                ),
            ),
            (
                "{java}",
                "-ea",
                "-Xmx256m",
                "-XX:+UseSerialGC",
                "-XX:-UsePerfData",
                "-cp",
                "{classpath}",
                "Problem",
            ),
        ),
        Language(
            "rs",
            "main.rs",
            ("rustc",),
            (("{rustc}", "--edition", "2021", "-C", "opt-level=0", "-o", "main", "main.rs"),),
            ("./main",),
        ),
        Language(
            "go",
            "main_test.go",
            ("go",),
            (),
            ("{go}", "test", "-count=1", "main_test.go"),
        ),
    )
}


def _world_runnable(path: str) -> bool:
    """Whether an unprivileged user can run `path` (every folder above it searchable by all)."""
    real = Path(os.path.realpath(path))
    if not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


def _candidates(tool: str) -> list[str]:
    dirs = os.environ.get("PATH", "").split(os.pathsep) + [str(Path.home() / ".cargo" / "bin")]
    found = []
    for folder in dirs:
        path = os.path.join(folder, tool)
        if folder and os.path.isfile(path) and os.access(path, os.X_OK) and path not in found:
            found.append(path)
    return found


def _which(tool: str, *, unprivileged: bool) -> str | None:
    """Find a tool on PATH or in ~/.cargo/bin (rustup's home, often not on PATH).

    Programs run as an unprivileged user, so a tool they run must be reachable by that user:
    a pyenv shim under /root is not, the system interpreter in /usr/bin is.
    """
    candidates = _candidates(tool)
    if unprivileged:
        candidates = [path for path in candidates if _world_runnable(path)]
    return candidates[0] if candidates else None


JAVATUPLES_IMPORT = "import org.javatuples.*;\n"
JAVATUPLES_JARS = ("/usr/share/java/javatuples.jar",)  # Debian/Ubuntu: libjavatuples-java


def javatuples_jar() -> str | None:
    """MultiPL-E's Java prompts import org.javatuples; its jar, if installed (or named in
    FUSELLM_JAVATUPLES_JAR), goes on the class path."""
    for candidate in (os.environ.get("FUSELLM_JAVATUPLES_JAR"), *JAVATUPLES_JARS):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _real_rustc(proxy: str) -> str:
    """rustup's `rustc` is a proxy that needs $HOME; resolve the toolchain's own binary."""
    try:
        sysroot = subprocess.run(
            [proxy, "--print", "sysroot"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return proxy
    real = Path(sysroot) / "bin" / "rustc"
    return str(real) if real.exists() else proxy


@cache
def toolchain(language: str) -> dict[str, str] | str:
    """Resolved tool paths for `language`, or a sentence saying why it cannot run here."""
    if language not in LANGUAGES:
        return f"unknown MultiPL-E language {language!r}; known: {', '.join(LANGUAGES)}"
    lang = LANGUAGES[language]
    unprivileged = sandbox_user() is not None
    paths = {}
    for tool in lang.tools:
        at_run_time = "{" + tool + "}" in lang.run
        found = _which(tool, unprivileged=unprivileged and at_run_time)
        if found is None:
            if _candidates(tool):
                return (
                    f"toolchain for {language}: `{tool}` is installed only where the sandbox "
                    f"user cannot run it ({_candidates(tool)[0]})"
                )
            return f"toolchain for {language} not installed: `{tool}` not found on PATH"
        paths[tool] = _real_rustc(found) if tool == "rustc" else found
    if language == "java":
        jar = javatuples_jar()
        paths["classpath"] = f".:{jar}" if jar else "."
    return paths


def available_languages() -> dict[str, str | None]:
    """language -> None when runnable, else the reason it is skipped."""
    return {
        name: (None if isinstance(toolchain(name), dict) else toolchain(name)) for name in LANGUAGES
    }


def truncate(completion: str, stop_tokens: list[str]) -> str:
    """Cut a completion at the first stop token, as MultiPL-E does."""
    cut = len(completion)
    for stop in stop_tokens or []:
        at = completion.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion[:cut]


def program(doc: dict, completion: str) -> str:
    """The full source MultiPL-E executes for one completion."""
    return doc["prompt"] + truncate(completion, doc.get("stop_tokens", [])) + "\n" + doc["tests"]


def java_source(text: str, classpath: str) -> str:
    """Without the javatuples jar, drop its import: most problems never use the tuple classes,
    and those that do still fail to compile, as they would."""
    return text if ".jar" in classpath else text.replace(JAVATUPLES_IMPORT, "")


def _argv(template: tuple[str, ...], tools: dict[str, str]) -> list[str]:
    out = []
    for part in template:
        if part.startswith("{") and part.endswith("}"):
            part = tools[part[1:-1]]
        out.append(part)
    return out


def execute(doc: dict, completion: str, language: str) -> SandboxResult:
    """Build and run one completed program in the sandbox."""
    tools = toolchain(language)
    if isinstance(tools, str):  # the reason the toolchain is missing
        raise RuntimeError(tools)  # noqa: TRY004 (not a wrong argument type)
    lang = LANGUAGES[language]
    steps = [(_argv(cmd, tools), COMPILE_LIMITS, False) for cmd in lang.build]
    steps.append((_argv(lang.run, tools), RUN_LIMITS, True))
    text = program(doc, completion)
    if language == "java":
        text = java_source(text, tools["classpath"])
    return run_program({lang.filename: text}, steps)


def passes(doc: dict, completion: str, language: str | None = None) -> bool:
    """True if the completion compiles and passes the record's tests."""
    return execute(doc, completion, language or language_of(doc)).ok


def language_of(doc: dict) -> str:
    """The record's language: its `language` field ("py", "cpp", ...) as MultiPL-E stores it."""
    language = doc.get("language")
    if language not in LANGUAGES:
        raise ValueError(
            f"MultiPL-E record {doc.get('name', '?')!r} has language {language!r}; "
            f"expected one of {', '.join(LANGUAGES)}"
        )
    return language


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: pass@1 of the greedy completion (1.0 or 0.0; lm-eval averages them)."""
    return {"pass@1": float(passes(doc, results[0]))}
