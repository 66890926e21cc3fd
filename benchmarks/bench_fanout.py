"""Extraction over several workers: wall-clock speedup of 2 CPU process workers over 1.

`execution: deployments` cuts extraction into parts of (model, group of shards), one run of the
`extract-part` deployment each (`fusellm_flows.dispatch.run_parts`); every worker of the GPU pool
takes the next part. Here the pool is a `process` pool on this machine and every flow run uses
one thread (OMP_NUM_THREADS=1 and friends in the pool's job environment, which torch and the
tokenizers honour), so W workers should extract W parts side by side and finish W times sooner.

In a temporary folder: a Prefect server on 127.0.0.1 (its own PREFECT_HOME, a free port), the
pools as `fusellm pools --type process` makes them (GPU pool concurrency 2), every deployment of
infra/prefect.yaml with `prefect deploy`, and process workers on `fusellm-gpu`
(`prefect worker start --limit 1`). Inputs are built here, nothing is downloaded: two
random-weight models (Llama with a SentencePiece-style BPE, GPT-NeoX with a byte-level BPE;
hidden 256, 4 layers by default) and a corpus of stdlib text whose every document is exactly
one piece of nearly `--block-size` tokens, so every shard, and every part, is the same work.

The pieces are cut in this process (`pipeline.walk(..., until="prepare")`); one part runs as a
warm-up (not timed); then `run_parts(EXTRACT_PART, ...)` over every part is timed inside a small
flow of this process, with one worker running, and again, its `extract/` folders removed, with
two. Both runs must build byte-identical stage folders (every file; of each folder's record,
stage.json, all but the seconds it took). Per run: the wall time of `run_parts` (the
headline), the span from the first part's start to the last one's end on the server, the mean
seconds of one part's flow run, and how many parts each worker ran.

    .venv/bin/python benchmarks/bench_fanout.py            # 8 parts, ~12 min on 2 busy cores
    .venv/bin/python benchmarks/bench_fanout.py --quick    # 4 small parts, ~7 min on 2 busy cores
    .venv/bin/python benchmarks/bench_fanout.py --shards 16 --shard-size 64 --repeats 2
    .venv/bin/python benchmarks/bench_fanout.py --out /var/tmp/fanout   # keep logs, folders

On failure the folder (servers' and workers' logs, models, work folder) is kept and named.

The last line of output is one JSON object: {"speedup_2_workers": X, "units": N, ...}, X the
1-worker wall time over the 2-worker one (the median of the pairs with --repeats), N the parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import _scale_assets as assets
from _common import ROOT, emit

from fusellm.settings import LOCALHOST, TELEMETRY_OFF

BIN = Path(sys.executable).parent
POOL = "fusellm-gpu"
GOAL = 1.7  # issue #20: on an otherwise quiet 2-core machine
# One thread per flow run: torch (OpenMP / MKL), BLAS, the Rust tokenizers (rayon). They go into
# the pool's job environment; TOKENIZERS_PARALLELISM only into the workers' own (`--job-env`
# refuses names that look like secrets, and "TOKEN" is in that one), which their runs inherit.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
}
WORKER_ENV = {**ONE_THREAD, "TOKENIZERS_PARALLELISM": "false"}
MODELS = {"llama": ("llama", "spm", 1000, 0), "neox": ("gpt_neox", "bytelevel", 800, 0)}
MARGIN = 8
TOP_K = 10
MIN_FILL = 0.8  # a piece kept as a document has at least this share of the token budget


# ---------------------------------------------------------------------------------------------
# Processes: each in its own process group, stopped by its id


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"(no log at {log})"


class Processes:
    """The servers and workers this benchmark started; `stop_all` ends them and every process
    they started (flow runs start in sessions of their own), by process id."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs = env, logs
        self.started: dict[str, subprocess.Popen] = {}
        self.since: dict[str, datetime] = {}  # when each was started (UTC)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.started[name] = proc
        self.since[name] = datetime.now(timezone.utc)
        return proc

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stop(self, name: str, grace_s: float = 20.0) -> None:
        """SIGINT to its group (Prefect's clean stop), SIGKILL after `grace_s`; then SIGKILL
        whatever it had started that is still there."""
        import psutil

        proc = self.started.pop(name)
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):  # workers before the server
            self.stop(name)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited ({proc.returncode}); {log}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering after {timeout:.0f} s; {log}:\n{tail(log)}")
        time.sleep(0.5)


def run_command(argv: list[str], env: dict, timeout: float) -> str:
    done = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Inputs


def recipe(args) -> dict:
    return {"models": MODELS, "hidden": args.hidden, "layers": args.layers,
            "block": args.block_size, "tokenizer_bytes": assets.TOKENIZER_BYTES}  # fmt: skip


def build_models(folder: Path, args) -> dict[str, Path]:
    """The two models (built once per recipe; a finished folder has its config.json)."""
    import tokenizers
    import transformers

    from fusellm.testing.tiny import save_tiny, tiny_model, train_tokenizer

    versions = [recipe(args), tokenizers.__version__, transformers.__version__]
    key = hashlib.sha256(json.dumps(versions).encode()).hexdigest()[:12]
    paths = {}
    for seed, (name, (arch, kind, vocab, text_slice)) in enumerate(MODELS.items()):
        path = folder / f"models-{key}" / name
        if not (path / "config.json").is_file():
            tok = train_tokenizer(assets.tokenizer_text(text_slice), kind=kind, vocab_size=vocab)
            sizes = {"hidden": args.hidden, "layers": args.layers, "heads": 4,
                     "max_positions": args.block_size}  # fmt: skip
            save_tiny(tiny_model(arch, tok, seed=seed, **sizes), tok, path)
        paths[name] = path
    return paths


def one_piece_documents(models: dict[str, Path], count: int, block_size: int) -> list[str]:
    """`count` documents that are one piece each, every one at least `MIN_FILL` of the token
    budget for the tokenizer that cuts it closest: pieces of the corpus stream, as the library
    cuts them, short ones (a document's tail) left out."""
    from transformers import AutoTokenizer

    from fusellm.data.pieces import iter_pieces

    toks = [AutoTokenizer.from_pretrained(str(p)) for p in models.values()]
    budget = block_size - MARGIN
    out = []
    for piece in iter_pieces(assets.corpus_stream(), toks, block_size, MARGIN, progress=False):
        longest = max(len(t(piece, add_special_tokens=False)["input_ids"]) for t in toks)
        if longest >= MIN_FILL * budget:
            out.append(piece)
            if len(out) == count:
                return out
    raise SystemExit(f"only {len(out)} full pieces of {block_size} tokens in the text; "
                     "use fewer or smaller shards")  # fmt: skip


def fusion_config(models: dict[str, Path], corpus: Path, workdir: Path, args):
    from fusellm.config import parse_fusion_config

    return parse_fusion_config({
        "name": "bench-fanout",
        "target": {"uri": str(models["llama"]), "name": "llama"},
        "sources": [{"uri": str(models["neox"]), "name": "neox"}],
        "corpus": {"uri": str(corpus)},
        "pieces": {"block_size": args.block_size, "margin": MARGIN, "workers": 1},
        "extraction": {
            "top_k": TOP_K, "batch_size": args.batch_size, "shard_size": args.shard_size,
            "shards_per_part": args.shards_per_part, "device": "cpu",
        },
        "execution": "deployments",
        "tracking": {"register_model": False},
        "workdir": str(workdir),
    })  # fmt: skip


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file of the stage folders under `folder`: the lock
    files beside them (dot names) left out, and of each folder's record (stage.json) all but
    the seconds it took to build."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        data = path.read_bytes()
        if path.name == "stage.json":
            record = json.loads(data)
            record.pop("seconds", None)
            data = json.dumps(record, sort_keys=True).encode()
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# Prefect: servers, pools, deployments, workers


def start_stack(procs: Processes, env: dict, args) -> None:
    """Server, pools, deployments; returns once the server answers and all are deployed."""
    port = int(env["PREFECT_SERVER_API_PORT"])
    server = procs.start("prefect-server", [
        str(BIN / "prefect"), "server", "start", "--host", LOCALHOST, "--port", str(port)
    ])  # fmt: skip
    wait_http(f"{env['PREFECT_API_URL']}/health", server, procs.log("prefect-server"), 240)
    names = ",".join(["FUSELLM_HOME", *ONE_THREAD])
    out = run_command([
        str(BIN / "fusellm"), "pools", "--type", "process", "--job-env", names,
        "--gpu-concurrency", str(args.workers),
    ], env, 180)  # fmt: skip
    print(out.strip(), file=sys.stderr)
    run_command([
        str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
        "--all",
    ], env, 300)  # fmt: skip


def start_worker(procs: Processes, name: str) -> None:
    procs.start(name, [
        str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1", "--name", name
    ])  # fmt: skip


def wait_workers_online(procs: Processes, names: list[str], timeout: float = 180) -> None:
    """Until each named worker has sent a heartbeat since its process was started (a worker
    stopped and started again under its name stays listed online for a while)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            beats = {
                w.name: w.last_heartbeat_time
                for w in client.read_workers_for_work_pool(work_pool_name=POOL)
            }
            if all(beats.get(n) and beats[n] >= procs.since[n] for n in names):
                return
            for name in names:
                proc = procs.started[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited:\n{tail(procs.log(name))}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {names} not online after {timeout:.0f} s")
            time.sleep(0.5)


def dispatcher():
    """A flow of this process that runs the parts as `fuse` does, and times that."""
    from prefect import flow

    from fusellm.config import FusionConfig
    from fusellm_flows.dispatch import EXTRACT_PART, run_parts

    @flow(name="bench-fanout", persist_result=False)
    def dispatch_parts(config: dict, parts: list[dict]) -> dict:
        fusion = FusionConfig.model_validate(config)
        start = time.perf_counter()
        done = run_parts(EXTRACT_PART, fusion, parts)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "runs": [str(r.id) for p in done for r in p.runs]}

    return dispatch_parts


def run_facts(run_ids: list[str], procs: Processes, workers: list[str]) -> dict:
    """From the server: the span of the part runs and their mean duration; from the workers'
    logs: how many of them each worker ran."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(r) for r in run_ids]
    bad = [f"{r.name}: {r.state_name}" for r in runs if not r.state or not r.state.is_completed()]
    if bad:
        raise RuntimeError(f"part runs did not all complete: {bad}")
    starts = [r.start_time for r in runs]
    ends = [r.end_time for r in runs]
    durations = [(e - s).total_seconds() for s, e in zip(starts, ends)]
    logs = {w: procs.log(w).read_text(errors="replace") for w in workers}
    per_worker = {w: sum(r in text for r in run_ids) for w, text in logs.items()}
    return {
        "span_s": (max(ends) - min(starts)).total_seconds(),
        "part_s": statistics.mean(durations),
        "parts_per_worker": per_worker,
    }


# ---------------------------------------------------------------------------------------------
# The comparison


def timed_run(flow_fn, config, parts, procs, workers: list[str]) -> dict:
    result = flow_fn(config.model_dump(mode="json"), parts)
    facts = run_facts(result["runs"], procs, workers)
    row = {"workers": len(workers), "seconds": result["seconds"], **facts}
    print(
        f"  {len(workers)} worker(s): {row['seconds']:.1f} s wall, span {row['span_s']:.1f} s, "
        f"{row['part_s']:.1f} s a part, parts per worker {row['parts_per_worker']}",
        file=sys.stderr,
    )
    return row


def compare(config, args, procs: Processes) -> dict:
    from fusellm.stages import pipeline
    from fusellm.stages.pipeline import Executor
    from fusellm_flows.dispatch import extraction_parts

    extract_dir = config.workdir / "extract"
    pipeline.walk(config, Executor(), until="prepare")
    parts = extraction_parts(config)
    flow_fn = dispatcher()
    start_worker(procs, "worker-1")
    wait_workers_online(procs, ["worker-1"])
    print(f"warm-up: 1 part of {len(parts)}", file=sys.stderr)
    flow_fn(config.model_dump(mode="json"), parts[:1])
    runs, digests = [], []
    for rep in range(args.repeats):
        for n in (1, args.workers):
            shutil.rmtree(extract_dir, ignore_errors=True)
            names = [f"worker-{i}" for i in range(1, n + 1)]
            for name in names:
                if name not in procs.started:
                    start_worker(procs, name)
            wait_workers_online(procs, names)
            row = timed_run(flow_fn, config, parts, procs, names)
            runs.append({"repeat": rep, **row})
            digests.append(folder_digest(extract_dir))
            for name in names[1:]:  # back to one worker for the next pair
                procs.stop(name)
    differ = sorted({f for d in digests[1:] for f in d.keys() ^ digests[0].keys()} | {
        f for d in digests[1:] for f in d.keys() & digests[0].keys() if d[f] != digests[0][f]
    })  # fmt: skip
    identical = not differ
    if not identical:
        raise RuntimeError(f"the extract/ folders differ between runs: {differ[:10]}")
    return {"parts": parts, "runs": runs, "files": len(digests[0]), "identical": identical}


def print_table(runs: list[dict]) -> None:
    print(f"{'workers':>7} {'wall s':>8} {'span s':>8} {'part s':>8}  parts per worker")
    for r in runs:
        print(
            f"{r['workers']:>7} {r['seconds']:>8.1f} {r['span_s']:>8.1f} {r['part_s']:>8.1f}  "
            + ", ".join(f"{w} {n}" for w, n in r["parts_per_worker"].items())
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=8, help="shards of the pieces (per model)")
    parser.add_argument("--shard-size", type=int, default=64, help="pieces per shard")
    parser.add_argument("--shards-per-part", type=int, default=2, help="shards of one part")
    parser.add_argument("--block-size", type=int, default=512, help="tokens of a piece at most")
    parser.add_argument("--batch-size", type=int, default=8, help="pieces per forward pass")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of both models")
    parser.add_argument("--layers", type=int, default=4, help="layers of both models")
    parser.add_argument("--workers", type=int, default=2, help="workers to compare with one")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of 1 / N worker runs")
    parser.add_argument("--query-seconds", type=float, default=None,
                        help="how often a worker asks for runs (PREFECT_WORKER_QUERY_SECONDS; "
                        "default Prefect's, 10 s)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="4 shards of 16 pieces, hidden 128: a fast, noisier run")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="keep servers' logs and folders here (default: a temporary folder)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.shard_size, args.hidden = 4, 16, 128
    if args.workers < 2 or args.repeats < 1 or args.shards < 1 or args.shard_size < 1:
        parser.error("--workers needs 2 or more; --repeats, --shards, --shard-size 1 or more")
    return args


def environment(out: Path, port: int, query_seconds: float | None) -> dict[str, str]:
    url = f"http://{LOCALHOST}:{port}/api"
    poll = {} if query_seconds is None else {"PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)}
    return {
        **os.environ,
        **TELEMETRY_OFF,
        **WORKER_ENV,
        "PREFECT_HOME": str(out / "prefect"),
        "PREFECT_SERVER_API_HOST": LOCALHOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "FUSELLM_PROJECT_DIR": str(ROOT),
        "FUSELLM_HOME": str(out / "home"),
        **poll,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="fusellm-bench-fanout-"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = environment(out, free_port(), args.query_seconds)
    # This process talks to the same server, with its own Prefect home; its own work (building
    # models, cutting pieces) keeps the default threads.
    for name in ("PREFECT_HOME", "PREFECT_API_URL", "FUSELLM_HOME", *TELEMETRY_OFF):
        os.environ[name] = env[name]
    load_before = os.getloadavg()

    models = build_models(out, args)
    docs = one_piece_documents(models, args.shards * args.shard_size, args.block_size)
    corpus = out / "corpus"
    assets.write_corpus(corpus, docs)
    workdir = out / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    config = fusion_config(models, corpus, workdir, args)
    units = len(MODELS) * math.ceil(args.shards / args.shards_per_part)

    procs = Processes(env, out / "logs")
    try:
        start_stack(procs, env, args)
        result = compare(config, args, procs)
    except BaseException:
        print(f"failed; logs and folders kept in {out}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
    if len(result["parts"]) != units:
        raise RuntimeError(f"{len(result['parts'])} parts, expected {units}: pieces recut?")
    runs = result["runs"]
    ones = [r for r in runs if r["workers"] == 1]
    manys = [r for r in runs if r["workers"] == args.workers]
    pairs = [one["seconds"] / many["seconds"] for one, many in zip(ones, manys)]
    speedup = statistics.median(pairs)
    print_table(runs)
    print(
        f"{units} parts ({len(MODELS)} models x {args.shards} shards of {args.shard_size} "
        f"pieces, {args.shards_per_part} shards a part); {result['files']} files, identical "
        f"in every run; {args.workers} workers over 1: {speedup:.2f}x (goal >= {GOAL})"
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    key = f"speedup_{args.workers}_workers"
    emit({
        key: round(speedup, 3),
        "units": units,
        "pairs": [round(p, 3) for p in pairs],
        "seconds": {"1": [round(r["seconds"], 1) for r in ones],
                    str(args.workers): [round(r["seconds"], 1) for r in manys]},
        "span_seconds": {"1": [round(r["span_s"], 1) for r in ones],
                         str(args.workers): [round(r["span_s"], 1) for r in manys]},
        "part_seconds": round(statistics.mean(r["part_s"] for r in runs), 1),
        "sizes": {"shards": args.shards, "shard_size": args.shard_size,
                  "shards_per_part": args.shards_per_part, "block_size": args.block_size,
                  "hidden": args.hidden, "layers": args.layers},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "cores": os.cpu_count(),
        "seconds_total": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    return {key: speedup, "units": units}


if __name__ == "__main__":
    main()
