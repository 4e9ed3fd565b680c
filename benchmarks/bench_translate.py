"""Routed translation throughput: datm's Translator vs per-direction peft + generate.

A shuffled stream of segments in 10 directions (cs/de/is/ru/zh ↔ en; the first N of each WMT'22
test set) is translated greedily by Gemma 3 270M with one LoRA adapter per direction (random
adapters with small B, so outputs stay close to the base model's but differ per direction):

- datm: `Translator(model, tok, modules).translate(requests, routes, max_new_tokens, batch_size)` —
  all adapters loaded side by side, mixed-direction batches of similar length (peft's
  `adapter_names`), generation stopping at the end of the line;
- baseline (the obvious way): group the stream by direction; per direction load its adapter
  (`PeftModel.from_pretrained` for the first, then `load_adapter` + `set_adapter`), `generate`
  greedily in batches of the same size with left padding, stopping only at EOS or max_new_tokens,
  decode, cut at the first newline.

Each side runs in a fresh spawned process after an untimed warm-up generation with the base model;
its time covers loading the adapters and translating the whole stream. Both outputs are compared
segment by segment.

Then the engine side by side (`vllm_ratio`, top level in bench_translate.json, with the load average
at start): datm's translation session with the default engine (`eval.engine: auto`, as `datm run`
and `datm translate` translate) against vLLM's offline engine used directly (`LLM.generate` with one
`LoRARequest` per direction, the same prompt token ids, greedy, stopped at EOS or a line break), on
the same stream; each in a fresh process, its engine started and warmed up untimed, then the whole
stream timed. vllm_ratio = datm segments/s / raw vLLM segments/s.
`--smoke`: only this side by side, on a tiny Llama (vLLM-sized heads) with random adapters and the
demo sentences (a plumbing check of a few minutes; its numbers are not results).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

from datm.data import alma_prompt, read_direction
from datm.eval.translate import Request
from datm.languages import Direction

HEADLINE = "translate_speedup"
RANK, ALPHA = 16, 32
B_SCALE = 0.01  # random LoRA B scaled down: adapters perturb the base model, they don't wreck it
QUICK_DIRECTIONS = ["de-en", "en-de"]
SHOWN_DIFFERENCES = 5


def all_directions() -> list[str]:
    return [f"{x}-en" for x in common.FOREIGN] + [f"en-{x}" for x in common.FOREIGN]


def load_stream(directions: list[str], per_direction: int, seed: int) -> list[Request]:
    pattern = str(common.DATA_DIR / "test.{src}-{tgt}.jsonl")
    requests = []
    for name in directions:
        direction = Direction.parse(name)
        common.data_file(f"test.{direction.src}-{direction.tgt}.jsonl")
        pairs = read_direction(pattern, direction)[:per_direction]
        if len(pairs) < per_direction:
            raise common.BenchError(
                f"{pattern}: only {len(pairs)} segments for {name}, {per_direction} asked"
            )
        requests += [Request(direction, p.src) for p in pairs]
    random.Random(seed).shuffle(requests)
    return requests


def warm_up(model: Any, tok: Any) -> None:
    """One short untimed generation, so neither side pays for first-call initialisation."""
    tok.padding_side = "left"
    enc = tok(["Translate this from German to English:\nGerman: Hallo Welt.\nEnglish:"], return_tensors="pt")
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False)


# --------------------------------------------------------------------------------------------------
# The two sides (each in a fresh process)
# --------------------------------------------------------------------------------------------------


def run_datm(requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    from datm import models
    from datm.eval.translate import Translator

    common.set_threads(spec["threads"])
    tok = models.load_tokenizer(spec["model_path"])
    model = models.load_model(spec["model_path"])
    warm_up(model, tok)
    modules = {name: Path(p) for name, p in spec["modules"].items()}
    routes = {name: name for name in modules}
    with common.PeakMeter() as meter:
        translator = Translator(model, tok, modules)
        loaded = time.perf_counter()
        outputs = translator.translate(
            requests,
            routes,
            max_new_tokens=spec["max_new_tokens"],
            batch_size=spec["batch_size"],
            progress=False,
        )
    return {
        **meter.as_dict(),
        "load_adapters_seconds": loaded - meter.start,
        "outputs": outputs,
    }


def run_baseline(requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel

    from datm import models

    common.set_threads(spec["threads"])
    tok = models.load_tokenizer(spec["model_path"])
    model = models.load_model(spec["model_path"])
    warm_up(model, tok)
    tok.padding_side = "left"
    batch_size = spec["batch_size"]
    outputs: list[str | None] = [None] * len(requests)
    by_direction: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        by_direction.setdefault(str(request.direction), []).append(i)
    load_seconds = 0.0
    generated_tokens = 0
    peft_model: Any = None
    with common.PeakMeter() as meter:
        for name, indices in by_direction.items():
            start = time.perf_counter()
            path = spec["modules"][name]
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.eval()
            load_seconds += time.perf_counter() - start
            for first in range(0, len(indices), batch_size):
                chunk = indices[first : first + batch_size]
                prompts = [
                    alma_prompt(requests[i].direction.src, requests[i].direction.tgt, requests[i].text)
                    for i in chunk
                ]
                enc = tok(prompts, return_tensors="pt", padding=True)
                with torch.no_grad():
                    generated = peft_model.generate(
                        **enc, max_new_tokens=spec["max_new_tokens"], do_sample=False, num_beams=1
                    )
                new_tokens = generated[:, enc["input_ids"].shape[1] :]
                generated_tokens += new_tokens.numel()
                for i, text in zip(
                    chunk, tok.batch_decode(new_tokens, skip_special_tokens=True), strict=True
                ):
                    outputs[i] = text.split("\n", 1)[0].strip()
    return {
        **meter.as_dict(),
        "load_adapters_seconds": load_seconds,
        "generated_token_slots": generated_tokens,
        "outputs": outputs,
    }


# --------------------------------------------------------------------------------------------------
# The engine side by side: datm's session (default engine) vs vLLM's LLM.generate used directly
# --------------------------------------------------------------------------------------------------


def engine_config(spec: dict[str, Any]) -> Any:
    from datm import config

    languages = sorted({x for d in spec["modules"] for x in d.split("-")} - {"en"})
    raw = {
        "base_model": spec["model_path"],
        "languages": languages,
        "data": {"train": "unused.{xx}-en.jsonl"},
        "strategy": "separate",
        "train": {"steps": 1},
        "eval": {"max_new_tokens": spec["max_new_tokens"], "precision": spec["precision"], "engine": "auto"},
    }
    return config.from_dict(raw, source="bench_translate")


def run_datm_engine(requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    """datm's translation session (eval.engine auto) over one module per direction."""
    from datm.eval.worker import Worker, translation_session

    common.set_threads(spec["threads"])
    cfg = engine_config(spec)
    modules = {name: Path(p) for name, p in spec["modules"].items()}
    routes = {name: name for name in modules}
    worker = Worker(cfg, progress=False)
    try:
        with translation_session(worker, modules, cfg) as translate:
            translate(requests[:1], routes)  # untimed: starts the engine, registers the LoRAs
            start = time.perf_counter()
            outputs = translate(requests, routes)
            seconds = time.perf_counter() - start
            engines = sorted({e["engine"] for e in translate.last_info["engines"].values()})
            continued = translate.last_info.get("continued_after_a_leading_line_break", 0)
    finally:
        worker.close()
    return {"seconds": seconds, "engine": engines, "continued": continued, "outputs": outputs}


def run_raw_vllm(requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's offline engine used directly: LLM.generate, one LoRARequest per direction."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from datm import models
    from datm.data import PromptFormat
    from datm.eval.engines import shutdown_vllm
    from datm.eval.translate import newline_token_ids

    common.set_threads(spec["threads"])
    tok = models.load_tokenizer(spec["model_path"])
    llm = LLM(
        model=spec["model_path"],
        dtype={"fp32": "float32", "bf16": "bfloat16"}[spec["precision"]],
        max_model_len=models.context_length(spec["model_path"]),
        seed=0,
        generation_config="vllm",
        enable_lora=True,
        max_loras=len(spec["modules"]),
        max_lora_rank=RANK,
        disable_log_stats=True,
    )
    loras = {n: LoRARequest(n, i, p) for i, (n, p) in enumerate(spec["modules"].items(), start=1)}
    fmt = PromptFormat(tok, "alma")
    stops = [tok.eos_token_id, *newline_token_ids(tok)]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"], stop_token_ids=stops)
    first = fmt.prompt_ids(requests[0].direction.src, requests[0].direction.tgt, requests[0].text)
    warm = [loras[str(requests[0].direction)]]
    llm.generate([{"prompt_token_ids": first}], params, lora_request=warm, use_tqdm=False)  # untimed
    start = time.perf_counter()  # from texts, as datm's side: the prompts' token ids are timed too
    prompts = [
        {"prompt_token_ids": fmt.prompt_ids(r.direction.src, r.direction.tgt, r.text)} for r in requests
    ]
    lora = [loras[str(r.direction)] for r in requests]
    outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    seconds = time.perf_counter() - start
    shutdown_vllm(llm)  # else this process can hang at exit, waiting for vLLM's engine processes
    return {"seconds": seconds, "outputs": [o.outputs[0].text.strip() for o in outs]}


def isolated_side(label: str, fn: Any, requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    """One side, `fn(requests, spec)`, in a fresh process."""
    common.log(f"{label} (fresh process)")
    result = common.run_isolated(fn, requests, spec)
    common.log(f"{label}: {result['seconds']:.2f} s")
    return dict(result)


def engine_side_by_side(requests: list[Request], spec: dict[str, Any]) -> dict[str, Any]:
    """Both sides (fresh processes) on the same stream: seg/s of each, vllm_ratio, agreement."""
    ours = isolated_side("datm translate, default engine", run_datm_engine, requests, spec)
    raw = isolated_side("vLLM LLM.generate used directly", run_raw_vllm, requests, spec)
    n = len(requests)
    a, b = ours.pop("outputs"), raw.pop("outputs")
    for s in (ours, raw):
        s["segments_per_second"] = n / s["seconds"]
    return {
        "vllm_ratio": ours["segments_per_second"] / raw["segments_per_second"],
        "datm": ours,
        "raw_vllm": raw,
        "identical_segments": sum(x == y for x, y in zip(a, b, strict=True)),
        "segments": n,
    }


def smoke_setup(tmp: Path, seed: int) -> tuple[list[Request], dict[str, Any]]:
    """A tiny Llama whose attention vLLM's CPU backend runs (head size 32), random adapters for
    four directions, and 32 demo sentences per direction, shuffled."""
    from datm import models
    from datm.demo import corpus_dir
    from datm.tiny import build_model_dir

    langs = ["de", "cs"]
    texts = {
        x: (corpus_dir() / f"{x}.txt").read_text(encoding="utf-8").splitlines()[:32] for x in [*langs, "en"]
    }
    sizes = {"hidden_size": 64, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    model_dir = build_model_dir(tmp / "model", [t for v in texts.values() for t in v], seed=seed, **sizes)
    directions = [f"{x}-en" for x in langs] + [f"en-{x}" for x in langs]
    model = models.load_model(str(model_dir))
    paths = common.make_random_lora_adapters(
        model, tmp / "adapters", directions, RANK, ALPHA, "all-linear", seed, b_scale=1.0
    )
    requests = [Request(Direction.parse(d), t) for d in directions for t in texts[d.split("-")[0]]]
    random.Random(seed).shuffle(requests)
    spec = {"model_path": str(model_dir), "modules": {n: str(p) for n, p in paths.items()}}
    return requests, spec


def smoke(args: Any) -> int:
    """--smoke: the engine side by side only, on the tiny model (plumbing, not results)."""
    record = common.new_record("bench_translate", "vllm_ratio", True, {"smoke": True}, args.allow_load)
    with tempfile.TemporaryDirectory(prefix="datm-bench-translate-smoke-") as tmp:
        requests, spec = smoke_setup(Path(tmp), args.seed)
        spec.update(max_new_tokens=16, precision="fp32", threads=args.threads or 1)
        record["settings"].update(segments=len(requests), max_new_tokens=16, model="tiny llama (random)")
        got = engine_side_by_side(requests, spec)
    record.update(got, load_average_at_start=record["load_check"]["load_average_1min"])
    print(
        f"vllm_ratio = {got['vllm_ratio']:.3f} (datm {got['datm']['segments_per_second']:.2f} seg/s, "
        f"raw vLLM {got['raw_vllm']['segments_per_second']:.2f} seg/s); identical "
        f"{got['identical_segments']}/{got['segments']}"
    )
    body = (
        "## Engine side by side (smoke)\n\n"
        + common.markdown_table(
            ["side", "engine", "segments/s", "timed s"],
            [
                [
                    "datm translate (default engine)",
                    ", ".join(got["datm"]["engine"]),
                    got["datm"]["segments_per_second"],
                    got["datm"]["seconds"],
                ],
                [
                    "vLLM LLM.generate",
                    "vllm",
                    got["raw_vllm"]["segments_per_second"],
                    got["raw_vllm"]["seconds"],
                ],
            ],
        )
        + f"\n\nvllm_ratio = **{got['vllm_ratio']:.3f}**; identical outputs "
        f"{got['identical_segments']} of {got['segments']} (raw vLLM's output is cut at its first line "
        "break, a leading one too; datm's at the end of the first line that holds text: "
        f"{got['datm']['continued']} segments began with a line break and were continued by a second "
        "generate call, the time datm spends beyond raw vLLM on this model)."
    )
    common.write_results(common.output_dir(args), record, body)
    return 0


def main() -> int:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--per-direction", type=int, default=None, help="segments per direction (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (quick 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="only the engine side by side, tiny model")
    args = parser.parse_args()
    # vLLM on CPU: one KV cache size for both engine sides (datm's default; else vLLM reserves 92% of RAM)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.smoke:
        args.quick = True  # results go to the quick folder, never over real ones
        return smoke(args)
    if args.quick and args.threads is None:
        args.threads = 1  # quick runs check plumbing, often on a shared machine (see common.check_load)
    common.set_threads(args.threads)
    directions = QUICK_DIRECTIONS if args.quick else all_directions()
    per_direction = args.per_direction or (4 if args.quick else 20)
    max_new_tokens = args.max_new_tokens or (16 if args.quick else 128)
    out_dir = common.output_dir(args)

    from datm import models

    model_path = common.base_model_path()
    requests = load_stream(directions, per_direction, args.seed)
    settings = {
        "model": model_path,
        "data": str(common.DATA_DIR / "test.{src}-{tgt}.jsonl"),
        "directions": directions,
        "per_direction": per_direction,
        "segments": len(requests),
        "max_new_tokens": max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy",
        "adapters": f"one per direction, LoRA r={RANK} alpha={ALPHA} all-linear, random (seeded), "
        f"B × {B_SCALE}",
        "seed": args.seed,
    }
    record = common.new_record("bench_translate", HEADLINE, args.quick, settings, args.allow_load)
    common.log(f"{len(requests)} segments, {len(directions)} directions, max_new_tokens {max_new_tokens}")

    with tempfile.TemporaryDirectory(prefix="datm-bench-translate-") as tmp:
        common.log(f"making {len(directions)} random LoRA adapters")
        model = models.load_model(model_path)
        paths = common.make_random_lora_adapters(
            model, Path(tmp) / "adapters", directions, RANK, ALPHA, "all-linear", args.seed, B_SCALE
        )
        del model
        spec = {
            "model_path": model_path,
            "modules": {name: str(p) for name, p in paths.items()},
            "max_new_tokens": max_new_tokens,
            "batch_size": args.batch_size,
            "threads": args.threads,
        }
        datm_side = isolated_side("datm side", run_datm, requests, spec)
        base_side = isolated_side(
            "baseline side: per-direction peft + generate", run_baseline, requests, spec
        )
        engines = engine_side_by_side(requests, {**spec, "precision": "fp32"})

    n = len(requests)
    for s in (datm_side, base_side):
        s["segments_per_second"] = n / s["seconds"]
    speedup = datm_side["segments_per_second"] / base_side["segments_per_second"]
    ours, theirs = datm_side.pop("outputs"), base_side.pop("outputs")
    differing = [i for i in range(n) if ours[i] != theirs[i]]
    per_direction_identical = {
        d: sum(1 for i in range(n) if str(requests[i].direction) == d and ours[i] == theirs[i])
        for d in directions
    }
    common.add_check(
        record,
        "identical outputs (cut at the first newline)",
        not differing,
        f"{n - len(differing)} of {n} segments identical"
        + (
            "; differences come from different batch composition (mixed-direction length-sorted batches "
            "vs per-direction batches: other padding widths and batch sizes change float rounding, which "
            "can flip a greedy choice)"
            if differing
            else ""
        ),
        hard=False,
    )
    record.update(
        {
            HEADLINE: speedup,
            "vllm_ratio": engines.pop("vllm_ratio"),
            "load_average_at_start": record["load_check"]["load_average_1min"],
            "engines": engines,
            "identical_segments": n - len(differing),
            "segments": n,
            "identical_by_direction": per_direction_identical,
            "differences": [
                {
                    "direction": str(requests[i].direction),
                    "source": requests[i].text,
                    "datm": ours[i],
                    "baseline": theirs[i],
                }
                for i in differing[:SHOWN_DIFFERENCES]
            ],  # fmt: skip
            "datm": datm_side,
            "baseline": base_side,
            "method": (
                "Each side in a fresh spawned process, after an untimed 4-token warm-up generation with the "
                "base model. Timed span: loading the adapters (one per direction) + translating the whole "
                "shuffled stream. segments/s = segments / timed span."
            ),
            "sample": [
                {"direction": str(requests[i].direction), "source": requests[i].text, "datm": ours[i]}
                for i in range(min(3, n))
            ],
        }
    )

    print()
    print(f"datm     : {datm_side['segments_per_second']:.3f} segments/s ({datm_side['seconds']:.1f} s)")
    print(f"baseline : {base_side['segments_per_second']:.3f} segments/s ({base_side['seconds']:.1f} s)")
    print(f"{HEADLINE} = {speedup:.2f}x; identical outputs: {n - len(differing)}/{n}")
    for d in record["differences"]:
        print(f"  differs ({d['direction']}): datm {d['datm']!r} | baseline {d['baseline']!r}")

    body = "\n\n".join(
        [
            "## What is measured\n\n" + record["method"],
            "## Throughput\n\n"
            + common.markdown_table(
                ["side", "segments/s", "timed s", "of which loading adapters s", "peak RSS above start"],
                [
                    [
                        name,
                        s["segments_per_second"],
                        s["seconds"],
                        s["load_adapters_seconds"],
                        common.gib(s["peak_above_baseline_bytes"]),
                    ]
                    for name, s in (
                        ("datm Translator", datm_side),
                        ("per-direction peft + generate", base_side),
                    )
                ],  # fmt: skip
            ),
            f"translate_speedup (datm / baseline segments/s) = **{speedup:.2f}×**. Identical outputs: "
            f"{n - len(differing)} of {n} (per direction: {per_direction_identical}).",
        ]
        + (
            [
                "## Differing outputs (first few)\n\n"
                + common.markdown_table(
                    ["direction", "datm", "baseline"],
                    [[d["direction"], d["datm"], d["baseline"]] for d in record["differences"]],
                )
            ]
            if differing
            else []
        )
    )
    common.write_results(out_dir, record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
