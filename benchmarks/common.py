"""Shared helpers of the benchmark scripts: arguments, machine description, result files, memory
measurement, a dense-matmul roofline, isolated subprocesses and random LoRA adapters.

Every benchmark writes `NAME.json` (machine-readable, one fixed headline key) and `NAME.md` (the
same, for people) atomically, with the exact command line, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from datm import artifacts, device

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = Path(tempfile.gettempdir()) / "datm-bench-quick"
REPO_ROOT = BENCH_DIR.parent
# Trained adapters shared by the benchmarks' runs (datm's adapter cache): the merge benchmark's
# separate XX->En adapters are the budget study's at 80 pairs, trained once.
ADAPTER_CACHE = REPO_ROOT / "runs" / "adapter_cache"
# The project's data lives beside the repository: ../shared/data/alma-human-parallel.
DATA_DIR = Path(
    os.environ.get("DATM_BENCH_DATA", REPO_ROOT.parent / "shared" / "data" / "alma-human-parallel")
)
# A 1-minute load average at or above this means other work shares the CPU: timings would not be a
# quiet machine's.
QUIET_LOAD = 0.5
# Every XX↔En direction of the WMT'22 test sets shipped with ALMA's human-written data.
FOREIGN = ("cs", "de", "is", "ru", "zh")


def alma_run_config(
    strategy: str,
    languages: list[str],
    groups: dict[str, list[str]],
    output_dir: Path,
    *,
    examples_per_pair: int,
    test_size: int,
    epochs: float = 1.0,
    batch_size: int = 8,
    lr: float = 1e-3,
    **extra: Any,
) -> dict[str, Any]:
    """The raw config of the CPU-scale studies (asymmetry, budgets, merge methods): Gemma 3 270M
    (datm's default), ALMA's human-written data, LoRA r=16 on all linear layers, cosine schedule,
    seed 1, greedy decoding of the first `test_size` WMT'22 segments; adapters shared across the
    studies through ADAPTER_CACHE. `extra` adds or replaces top-level keys (merge, executor, ...)."""
    return {
        "languages": languages,
        "groups": groups,
        "data": {
            "train": str(DATA_DIR / "train.{xx}-en.jsonl"),
            "test": str(DATA_DIR / "test.{src}-{tgt}.jsonl"),
        },
        "strategy": strategy,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "schedule": "cosine",
            "warmup_ratio": 0.05,
            "max_examples_per_pair": examples_per_pair,
            "seed": 1,
            "checkpoint_every": 20,
        },
        "eval": {"max_examples": test_size, "beams": 1, "max_new_tokens": 128, "batch_size": 16},
        "output_dir": str(output_dir),
        "adapter_cache": str(ADAPTER_CACHE),
        **extra,
    }


class BenchError(ValueError):
    """A benchmark cannot run as asked (missing data, bad arguments)."""


# --------------------------------------------------------------------------------------------------
# Arguments and output
# --------------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {RESULTS_DIR}; with --quick {QUICK_DIR}, so quick runs never "
        "replace real results)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=1)
    add_load_argument(parser)
    return parser


def add_load_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-load",
        action="store_true",
        help=f"run even when the 1-minute load average is >= {QUIET_LOAD} (other work running); "
        "the results then say so",
    )


def output_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return Path(args.out)
    return QUICK_DIR if args.quick else RESULTS_DIR


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise BenchError(f"benchmark data {path} not found (set DATM_BENCH_DATA to the ALMA data folder)")
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------------


# The CPU flags a result records (what bf16 and matrix speed depend on).
CPU_FLAGS_OF_INTEREST = {"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2", "fma"}


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    mem_total = None
    try:
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        mem_total = int(match.group(1)) * 1024 if match else None
    except OSError:
        pass
    return {
        "cpu_model": device.cpu_model(),
        "cpu_flags": sorted(device.cpu_flags() & CPU_FLAGS_OF_INTEREST),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem_total,
        "load_average_at_start": load,
        "platform": platform.platform(),
        "versions": artifacts.library_versions(),
    }


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """Dense n×n @ n×n throughput in GFLOP/s (2n³ per product), after a warm-up: the machine's roof."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    reps = 0
    start = time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and reps >= 5:
            return 2 * n**3 * reps / elapsed / 1e9


# --------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------


def check_load(allow_load: bool, quick: bool = False) -> dict[str, Any]:
    """Every benchmark calls this before it starts work. Timings on a busy machine mean little: with
    more torch threads than idle cores, every op's OpenMP threads wait for each other (on this
    project's 2-core machine under load, one LoRA training step took 40 s with 2 threads and 1.3 s
    with 1; a translation baseline run beside other jobs made a 3.24x speedup read 4.47x).

    Refuses (BenchError) when the 1-minute load average is >= QUIET_LOAD, unless `allow_load` (the
    record then says the machine was busy) or `quick` (plumbing checks, not results). Returns what
    the results record: the load, whether the machine was quiet, and whether load was allowed.
    """
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    quiet = load is None or load < QUIET_LOAD
    if not quiet and not (allow_load or quick):
        raise BenchError(
            f"the 1-minute load average is {load:.2f} (>= {QUIET_LOAD}): other work is running, so "
            "timings would not be a quiet machine's; wait for it to finish, or pass --allow-load and "
            "the results will say the machine was busy"
        )
    if not quiet:
        log(f"WARNING: load average {load:.2f} at start; timings are not those of a quiet machine")
    return {"load_average_1min": load, "quiet": quiet, "threshold": QUIET_LOAD, "allowed_load": allow_load}


def load_markdown(load_check: dict[str, Any]) -> str:
    """One line for a results file: empty on a quiet machine, a warning otherwise."""
    if load_check.get("quiet", True):
        return ""
    return (
        f"**Measured on a busy machine**: 1-minute load average {load_check['load_average_1min']:.2f} "
        f"at start (>= {load_check['threshold']}); timings are not those of a quiet machine."
    )


def repo_relative(obj: Any) -> Any:
    """`obj` with absolute paths under the repository's parent folder written relative to the
    repository, and those under the home folder (datm's model cache) as `~/...` (results files
    must not carry one machine's paths)."""
    if isinstance(obj, dict):
        return {k: repo_relative(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [repo_relative(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    prefix, home = str(REPO_ROOT.parent) + os.sep, str(Path.home()) + os.sep
    if obj.startswith(prefix):
        return os.path.relpath(obj, REPO_ROOT)
    if home != os.sep and obj.startswith(home):
        return "~" + os.sep + obj[len(home) :]
    if any(f" {p}" in obj for p in (prefix, home)):  # a command line: each argument on its own
        return " ".join(repo_relative(word) for word in obj.split(" "))
    return obj


def new_record(
    name: str, headline_key: str, quick: bool, settings: dict[str, Any], allow_load: bool = False
) -> dict[str, Any]:
    load_check = check_load(allow_load, quick)
    return {
        "benchmark": name,
        "headline_key": headline_key,
        headline_key: None,
        "quick": quick,
        "command": " ".join(["python", *sys.argv]),
        "argv": list(sys.argv),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": repo_relative(settings),
        "load_check": load_check,
        "checks": [],
    }


def add_check(record: dict[str, Any], name: str, passed: bool, detail: str, hard: bool = True) -> None:
    """A hard check failing makes the script exit non-zero; a soft one is reported and explained."""
    record["checks"].append({"name": name, "passed": bool(passed), "hard": hard, "detail": detail})
    mark = "ok  " if passed else ("FAIL" if hard else "WARN")
    log(f"check {mark} {name}: {detail}")


def failed_hard_checks(record: dict[str, Any]) -> list[str]:
    return [c["name"] for c in record["checks"] if c["hard"] and not c["passed"]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(record: dict[str, Any]) -> str:
    m = record["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    mem = f"{m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "?"
    return "\n".join(
        [
            f"- command: `{record['command']}`",
            f"- date: {record['date']}",
            f"- CPU: {m['cpu_model']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores, "
            f"flags {' '.join(m['cpu_flags']) or '-'}), {mem} RAM; torch threads {m['torch_threads']}; "
            f"load average at start {m['load_average_at_start']}",
            f"- versions: {versions}",
        ]
    )


def checks_markdown(record: dict[str, Any]) -> str:
    rows = [
        [c["name"], "pass" if c["passed"] else ("FAIL" if c["hard"] else "differs"), c["detail"]]
        for c in record["checks"]
    ]
    return markdown_table(["check", "result", "detail"], rows)


def write_study(
    results: Path,
    name: str,
    record: dict[str, Any],
    render: Callable[[dict], str],
    plot: Callable[[dict], bytes] | None,
) -> dict[str, Any]:
    """A study's results: NAME.json (no machine paths), NAME.md (`render`) and NAME.png (`plot`, if
    given), written atomically under `results`; returns the record as written."""
    from datm import artifacts

    record = repo_relative(record)
    results.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(results / f"{name}.json", record)
    artifacts.atomic_write_text(results / f"{name}.md", render(record))
    if plot is not None:
        artifacts.atomic_write_bytes(results / f"{name}.png", plot(record))
    return record


def write_results(out_dir: Path, record: dict[str, Any], body_markdown: str) -> tuple[Path, Path]:
    record = repo_relative(record)  # results never carry this machine's paths
    name = record["benchmark"]
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    key = record["headline_key"]
    value = record[key]
    headline = f"{value:.3g}" if isinstance(value, (int, float)) else str(value)
    quick = " (QUICK run: tiny sizes, not a result)" if record["quick"] else ""
    md = "\n\n".join(
        [
            f"# {name}{quick}",
            f"**{key} = {headline}**",
            *[line for line in [load_markdown(record.get("load_check", {}))] if line],
            machine_markdown(record),
            body_markdown,
            "## Checks\n\n" + checks_markdown(record),
        ]
    )
    artifacts.atomic_write_json(json_path, record)
    artifacts.atomic_write_text(md_path, md + "\n")
    log(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


# --------------------------------------------------------------------------------------------------
# Memory and isolation
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if not match:
        raise BenchError(f"/proc/self/status has no {field}; peak memory needs Linux")
    return int(match.group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark since start or the last `reset_peak_rss`."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to /proc/self/clear_refs), so the peak
    measured next belongs to the work that follows, not to imports or loading."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMeter:
    """Peak RSS above the RSS at entry, of the code inside the `with` block (exact: the kernel's
    high-water mark, not sampling)."""

    def __enter__(self) -> PeakMeter:
        reset_peak_rss()
        self.baseline = rss_bytes()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak = peak_rss_bytes()
        self.above_baseline = self.peak - self.baseline

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "baseline_rss_bytes": self.baseline,
            "peak_rss_bytes": self.peak,
            "peak_above_baseline_bytes": self.above_baseline,
        }


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh spawned Python process: its own memory high-water mark, no state (such
    as accelerate's process-wide AcceleratorState) shared with the other side."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def gib(n_bytes: float | None) -> str:
    return "?" if n_bytes is None else f"{n_bytes / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------------
# Models and adapters
# --------------------------------------------------------------------------------------------------


def base_model_path() -> str:
    from datm import models

    return models.resolve(None)


def make_random_lora_adapters(
    model: torch.nn.Module,
    out_dir: Path,
    names: Sequence[str],
    r: int,
    alpha: int,
    target_modules: list[str] | str,
    seed: int,
    b_scale: float = 1.0,
) -> dict[str, Path]:
    """Save one PEFT LoRA directory per name, with seeded random A and B (B scaled by `b_scale`),
    so every adapter has a nonzero ΔW of its own. `model` is given back without LoRA layers."""
    from peft import LoraConfig, get_peft_model

    paths: dict[str, Path] = {}
    for i, name in enumerate(names):
        torch.manual_seed(seed + i)
        config = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        if b_scale != 1.0:
            with torch.no_grad():
                for param_name, param in peft_model.named_parameters():
                    if ".lora_B." in param_name:
                        param.mul_(b_scale)
        path = out_dir / name
        peft_model.save_pretrained(str(path))
        paths[name] = path
        model = peft_model.unload()
    return paths


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
