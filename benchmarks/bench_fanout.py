"""Fan-out: the same plan under the local executor (one process, one torch thread) and the Ray
executor (a local Ray cluster of N workers, one torch thread each). Headline: `fanout_speedup` =
local wall time / Ray wall time (goal ≥ 1.7 with 2 workers on 2 cores), and the two runs'
artifacts (adapters, merged modules, translations, scores) must be identical.

The plan is DAT over 4 languages of ALMA's human-written data in 2 groups: 6 adapters to train and
8 directions to translate, on Gemma 3 270M (the embedded default). `--quick` uses a tiny random
model built here and a few steps, to check the plumbing in seconds.

Each side runs in a fresh process; the timed span is the whole `datm run` from a loaded config to
the report (Ray's start and every worker's model load included).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

from datm.log import setup as setup_logging

LANGUAGES = ["cs", "de", "is", "ru"]
GROUPS = {"g1": ["cs", "ru"], "g2": ["de", "is"]}
HEADLINE = "fanout_speedup"
GOAL = 1.7


def run_config(base_model: str | None, out: Path, quick: bool) -> dict[str, Any]:
    data = common.DATA_DIR
    steps, examples, segments, tokens = (4, 16, 4, 8) if quick else (20, 200, 50, 64)
    return {
        "base_model": base_model,
        "languages": LANGUAGES,
        "groups": GROUPS,
        "data": {"train": f"{data}/train.{{xx}}-en.jsonl", "test": f"{data}/test.{{src}}-{{tgt}}.jsonl"},
        "strategy": "dat",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {
            "steps": steps,
            "batch_size": 8,
            "lr": 5e-4,
            "max_examples_per_pair": examples,
            "seed": 1,
            "checkpoint_every": 0,
        },
        "eval": {"max_examples": segments, "beams": 1, "max_new_tokens": tokens, "batch_size": 10},
        "output_dir": str(out),
    }


def tiny_model(path: Path) -> str:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on the benchmark's data."""
    from datm import tiny
    from datm.data import read_direction
    from datm.languages import Direction

    texts = []
    for x in LANGUAGES:
        texts += [
            f"{p.src} {p.tgt}"
            for p in read_direction(str(common.data_file(f"train.{x}-en.jsonl")), Direction(x, "en"))[:200]
        ]
    tok = tiny.build_tokenizer(texts, vocab_size=1000, prepend_bos=False, chat_template=None)
    # transformers' LlamaConfig defaults for the context and the initialisation
    sizes = {"hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 2048}
    tiny.build_model_dir(path, tokenizer=tok, **sizes, initializer_range=0.02)
    return str(path)


def run_side(raw: dict[str, Any], executor: str, workers: int) -> dict[str, Any]:
    """One `datm run` in this (fresh) process: local with 1 torch thread, or Ray with `workers`."""
    from datm import config
    from datm.run import runner

    torch.set_num_threads(1)
    cfg = config.from_dict(raw, source=f"bench_fanout ({executor})")
    start = time.perf_counter()
    if executor == "ray":
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING")
    try:
        scores = runner.run(cfg, executor=executor)
    finally:
        if executor == "ray":
            ray.shutdown()
    assert scores is not None
    directions = {d: s.to_dict() for d, s in scores.directions.items()}
    return {"seconds": time.perf_counter() - start, "directions": directions}


def artifact_bytes(out: Path) -> dict[str, bytes]:
    files = [
        *out.glob("adapters/*/*.safetensors"),
        *out.glob("merged/*/*.safetensors"),
        *out.glob("translations/*.txt"),
    ]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def main() -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local cluster)")
    parser.add_argument("--work", type=Path, default=None, help="where the two runs go (default: a temp dir)")
    args = parser.parse_args()
    setup_logging()  # datm's progress messages, as `datm run` shows them
    out_dir = common.output_dir(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    base = tiny_model(work / "tiny-model") if args.quick else common.base_model_path()
    settings = {
        "workers": args.workers,
        "languages": LANGUAGES,
        "groups": GROUPS,
        "strategy": "dat",
        "base_model": "tiny random Llama (--quick)" if args.quick else base,
        "torch_threads_per_worker": 1,
    }
    record = common.new_record("bench_fanout", HEADLINE, args.quick, settings, args.allow_load)
    record["settings"]["config"] = run_config(base, work / "SIDE", args.quick)
    sides: dict[str, Any] = {}
    for executor in ("local", "ray"):
        common.log(f"{executor}: datm run (workers: {1 if executor == 'local' else args.workers})")
        sides[executor] = common.run_isolated(
            run_side, run_config(base, work / executor, args.quick), executor, args.workers
        )
        common.log(f"{executor}: {sides[executor]['seconds']:.1f} s")
    local, ray = artifact_bytes(work / "local"), artifact_bytes(work / "ray")
    differ = [k for k in local if local[k] != ray.get(k)] + sorted(set(ray) - set(local))
    common.add_check(
        record,
        "artifacts identical",
        not differ and bool(local),
        f"{len(local)} files compared (adapters, merged, translations)"
        + (f"; differ: {differ[:5]}" if differ else ""),
    )
    common.add_check(
        record,
        "scores identical",
        sides["local"]["directions"] == sides["ray"]["directions"],
        "per-direction BLEU/chrF++",
    )
    speedup = sides["local"]["seconds"] / sides["ray"]["seconds"]
    record[HEADLINE] = round(speedup, 3)
    record["seconds"] = {k: round(v["seconds"], 2) for k, v in sides.items()}
    common.add_check(
        record,
        f"speedup >= {GOAL}",
        speedup >= GOAL,
        f"{speedup:.2f}x with {args.workers} workers",
        hard=False,
    )
    body = "\n\n".join(
        [
            "## Wall time of `datm run`, same plan (DAT: 6 adapters, 8 directions)",
            common.markdown_table(
                ["executor", "workers x torch threads", "seconds"],
                [
                    ["local", "1 x 1", round(sides["local"]["seconds"], 1)],
                    ["ray", f"{args.workers} x 1", round(sides["ray"]["seconds"], 1)],
                ],
            ),
            f"fanout_speedup = {speedup:.2f} (goal ≥ {GOAL} with 2 workers on 2 cores)",
        ]
    )
    common.write_results(out_dir, record, body)
    return 1 if common.failed_hard_checks(record) else 0


if __name__ == "__main__":
    raise SystemExit(main())
