"""`datm` command line: parses arguments and calls the stages. No logic lives here."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from datm import log
from datm.errors import DatmError


def _load(args: argparse.Namespace):  # -> datm.config.Config
    """The config, with `--measurements` / `--threshold` (strategy auto) as overrides of its `auto`
    keys, parsed and validated with them: `plan`, `run` and `train` then build the same plan."""
    from datm import config as C

    overrides: dict[str, object] = {}
    if args.measurements is not None:
        overrides |= {"source": "file", "measurements": str(Path(args.measurements).resolve())}
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    return C.load(args.config, overrides)


def _cmd_plan(args: argparse.Namespace) -> int:
    from datm import auto
    from datm.run import describe

    cfg = _load(args)
    if cfg.strategy == "auto" and not args.json:
        print(auto.describe(cfg))
        if not auto.measurements_path(cfg).is_file():
            print(f"no measurements yet ({auto.measurements_path(cfg)}): {auto.SOURCES[cfg.auto.source].how}")
            return 0
    print(describe.describe_plan(cfg, as_json=args.json))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from datm.analysis import analyze

    result = analyze.analyze(
        [Path(r) for r in args.separate],
        [Path(r) for r in args.joint],
        [Path(r) for r in args.merged] if args.merged else None,
        [Path(r) for r in args.unmerged] if args.unmerged else None,
        metric=args.metric,
        n_samples=args.samples,
        seed=args.seed,
    )
    path = analyze.write_analysis(result, Path(args.out))
    print(analyze.format_table(result))
    print(f"\nanalysis written: {path}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from datm import config as C
    from datm.auto import probe

    cfg = C.load(args.config)
    out = Path(args.out) if args.out else probe.default_probe_path(cfg).parent
    result = probe.probe_config(cfg, out, max_examples_per_direction=args.examples)
    print(probe.format_summary(result))
    print(f"\nprobe written: {out / 'probe.json'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from datm.run import runner

    cfg = _load(args)
    runner.run(cfg, executor=args.executor, address=args.address, only=args.only)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from datm import config as C
    from datm.run import describe

    print(describe.describe_tasks(C.load(args.config), as_json=args.json))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from datm.run import runner

    cfg = _load(args)
    runner.train_only(cfg, only=args.adapter)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from datm import merge

    res = merge.merge_adapters(
        [Path(s) for s in args.sources],
        Path(args.out),
        method=args.method,
        density=args.density,
        rank=args.rank,
        form=args.form,
        scale=args.scale,
        normalize=args.normalize,
    )
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from datm.analysis import report

    out = report.write_report([Path(r) for r in args.runs], Path(args.out), baseline=args.baseline)
    print(f"report written: {out}")
    return 0


def _auto_overrides(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--measurements",
        help="strategy auto: override the config, plan from this probe.json or analysis.json "
        "(sets auto.source: file, auto.measurements: FILE)",
    )
    s.add_argument("--threshold", type=float, help="strategy auto: override auto.threshold")


def _args_plan(s: argparse.ArgumentParser) -> None:
    s.add_argument("config")
    s.add_argument("--json", action="store_true", help="print plan.json instead of a table")
    _auto_overrides(s)


def _args_run(s: argparse.ArgumentParser) -> None:
    s.add_argument("config")
    s.add_argument("--executor", help="local or ray: where tasks run (default: the config's executor, local)")
    s.add_argument("--address", help="ray: join this Ray cluster (default: start one on this machine)")
    s.add_argument("--only", metavar="TASK", help="run one task, e.g. train:de-en (see `datm tasks`)")
    _auto_overrides(s)


def _args_tasks(s: argparse.ArgumentParser) -> None:
    s.add_argument("config")
    s.add_argument("--json", action="store_true", help="as JSON (for job arrays)")


def _args_train(s: argparse.ArgumentParser) -> None:
    s.add_argument("config")
    _auto_overrides(s)
    s.add_argument("--adapter", action="append", help="train only this adapter (repeatable)")


def _args_merge(s: argparse.ArgumentParser) -> None:
    from datm.config import names

    s.add_argument("sources", nargs="+", help="PEFT adapter directories")
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="ties", choices=list(names.MERGE_METHODS))
    s.add_argument("--density", type=float, default=0.2)
    s.add_argument(
        "--rank", type=int, default=None, help="rank of the merged LoRA (default: the sources' rank)"
    )
    s.add_argument("--form", default="lowrank", choices=list(names.MERGE_FORMS))
    s.add_argument(
        "--scale", type=float, default=1.0, help="global scale λ multiplying the merged ΔW (default 1)"
    )
    s.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ties, dare_ties: average the agreeing entries (default: ties yes, dare_ties no: a sum)",
    )


def _args_translate(s: argparse.ArgumentParser) -> None:
    s.add_argument("--run", required=True, help="run directory (holds plan.json and the modules)")
    s.add_argument("--pair", help="SRC-TGT for every input line (else each line is 'SRC-TGT<TAB>text')")
    s.add_argument("--input", default="-", help="input file (default: stdin)")
    s.add_argument("--output", default="-", help="output file (default: stdout)")
    s.add_argument("--beams", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument(
        "--engine",
        default=None,
        choices=["auto", "vllm", "transformers"],
        help="default: the run's eval.engine",
    )


def _args_evaluate(s: argparse.ArgumentParser) -> None:
    s.add_argument("--pair", required=True, help="SRC-TGT (the target picks the BLEU tokenizer)")
    s.add_argument("--hyp", required=True, help="hypotheses, one per line")
    s.add_argument("--ref", required=True, help="references: plain text or ALMA records (JSON/JSONL)")
    s.add_argument("--src", help="sources (plain text), needed for COMET")
    s.add_argument("--comet", help="COMET model: hub name, model directory or .ckpt file")
    s.add_argument(
        "--comet-python", help="Python of an environment with unbabel-comet (`datm comet-env DIR`)"
    )
    s.add_argument("--comet-batch-size", type=int, default=8)
    s.add_argument("--comet-device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--json", action="store_true")


def _args_comet_env(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", help="where the environment goes (kept if it already has COMET)")
    s.add_argument("--torch", help="torch requirement to install (default: the torch datm runs on)")


def _args_report(s: argparse.ArgumentParser) -> None:
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--baseline", help="run directory that significance marks compare against")


def _args_serve(s: argparse.ArgumentParser) -> None:
    s.add_argument("run", help="run directory (holds plan.json and the modules)")
    s.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval setting")
    s.add_argument("--beams", type=int, default=None, help="default: the run's eval.beams (as scored)")
    s.add_argument("--max-texts", type=int, default=64, help="most texts in one request (default 64)")
    s.add_argument("--batch-size", type=int, default=None, help="transformers: default: the run's")
    s.add_argument("--max-batch", type=int, default=32, help="transformers: segments per micro-batch")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="transformers: micro-batch window")
    s.add_argument("--kv-cache-gib", type=float, default=2.0, help="vllm on CPU: KV cache size (GiB)")
    s.add_argument("--drain-seconds", type=float, default=60.0, help="on shutdown, wait for requests")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or env DATM_API_KEY)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    s.add_argument(
        "--body-timeout", type=float, default=10.0, help="seconds for a body to arrive (default 10)"
    )
    s.add_argument(
        "--max-connections", type=int, default=256, help="beyond them a request gets 503 (default 256)"
    )
    s.add_argument("--log-level", default="info")


def _args_export(s: argparse.ArgumentParser) -> None:
    s.add_argument("run", help="run directory")
    s.add_argument("--to", required=True, help="new (or empty) directory to write")
    s.add_argument("--fold", action="store_true", help="also write one full model per module (base + module)")


def _args_demo(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="datm-demo", help="where the demo run goes")
    s.add_argument("--compare", action="store_true", help="also train the multilingual baseline")
    s.add_argument("--languages", help="comma-separated subset of the demo languages (default: all 8)")
    s.add_argument("--steps", type=int, default=12, help="training steps per adapter (default 12)")
    s.add_argument(
        "--test-size", type=int, default=32, help="test sentences scored per direction (default 32)"
    )
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--json", action="store_true")


def _args_analyze(s: argparse.ArgumentParser) -> None:
    seeds = " (several: one per train.seed, paired across arms by seed)"
    s.add_argument(
        "--separate",
        required=True,
        nargs="+",
        help="run directory of the separately trained directions" + seeds,
    )
    s.add_argument("--joint", required=True, nargs="+", help="run directory of a joint run" + seeds)
    s.add_argument("--merged", nargs="+", help="run directory with merged modules (e.g. datm)" + seeds)
    s.add_argument("--unmerged", nargs="+", help="the same run without merging (e.g. dat)" + seeds)
    s.add_argument("--out", required=True, help="where analysis.json/.md and the plots go")
    s.add_argument("--metric", default="chrf", choices=["chrf", "bleu"], help="metric that classifies")
    s.add_argument("--samples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    s.add_argument("--seed", type=int, default=12345)


def _args_probe(s: argparse.ArgumentParser) -> None:
    s.add_argument("config")
    s.add_argument("--out", help="output directory (default: <output_dir>/probe)")
    s.add_argument("--examples", type=int, default=32, help="examples per direction (default 32)")


# Every command: its help line, its arguments, and the function that runs it (or "module:function",
# imported only when that command runs: the stage's own `main(args)`).
Command = Callable[[argparse.Namespace], "int | None"]
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Command | str]] = {
    "plan": ("print which adapters a config trains, merges and routes", _args_plan, _cmd_plan),
    "run": ("run a config end to end (resumes where it stopped)", _args_run, _cmd_run),
    "tasks": ("the plan's tasks, their dependencies and status", _args_tasks, _cmd_tasks),
    "train": ("train the plan's adapters only", _args_train, _cmd_train),
    "merge": ("merge PEFT adapter directories into one module", _args_merge, _cmd_merge),
    "translate": (
        "translate with the modules a run's plan routes to",
        _args_translate,
        "datm.serve.offline:main",
    ),
    "evaluate": (
        "score a hypothesis file against references (BLEU, chrF++)",
        _args_evaluate,
        "datm.eval.evaluate:main",
    ),
    "comet-env": (
        "create a virtual environment with COMET for eval.comet.python",
        _args_comet_env,
        "datm.eval.comet:main_env",
    ),
    "report": ("compare run directories in Markdown/HTML tables and plots", _args_report, _cmd_report),
    "serve": (
        "serve a run's routes over HTTP (vLLM or transformers engine)",
        _args_serve,
        "datm.serve.app:main",
    ),
    "export": (
        "a run's modules with model cards, routes and a vllm command",
        _args_export,
        "datm.serve.export:main",
    ),
    "demo": (
        "post-train Gemma 3 270M with DATM on the embedded corpus, offline",
        _args_demo,
        "datm.demo:main",
    ),
    "analyze": (
        "conflict/synergy per direction and family: joint vs separate runs",
        _args_analyze,
        _cmd_analyze,
    ),
    "probe": ("cosine of the directions' LoRA gradients before training", _args_probe, _cmd_probe),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="datm", description="Direction-aware training and merging for multilingual MT"
    )
    talk = p.add_mutually_exclusive_group()
    talk.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and errors (results are still printed)"
    )
    talk.add_argument("-v", "--verbose", action="store_true", help="also debug messages")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        s = sub.add_parser(name, help=help_text)
        add_arguments(s)
        s.set_defaults(func=run if callable(run) else functools.partial(_call, run))
    return p


def _call(target: str, args: argparse.Namespace) -> int:
    """Run a stage's `main(args)` named "module:function"; None counts as success."""
    module, _, function = target.partition(":")
    return int(getattr(importlib.import_module(module), function)(args) or 0)


def _stdout_is_data(args: argparse.Namespace) -> bool:
    """Whether the command writes data to stdout (JSON, translations): its messages go to stderr."""
    if getattr(args, "json", False) or args.command == "merge":
        return True
    return args.command == "translate" and args.output == "-"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    log.setup(level, stderr=_stdout_is_data(args))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except DatmError as e:
        # Our errors name the file/line/key; show them without a traceback.
        print(f"datm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
