"""Serving load test and agreement: `datm serve` (vllm, transformers engines) vs sequential `datm translate`.

RUN is a finished run directory (e.g. `datm demo --out D` makes D/datm). The request stream is the
run's own test segments (translations/DIR.src.txt of every direction, with their references),
shuffled with --seed and cycled up to --requests.

- sequential: what `datm translate --run RUN` does with the stream as one file: the run's
  Translator (`load_for_run`) over the whole stream in one `translate` call, greedy, the run's eval
  batch size and max_new_tokens; in a fresh process, timed after loading and one warm-up segment;
- each engine: `datm serve RUN --engine E` in a subprocess on 127.0.0.1 (a fresh port); 16 client
  coroutines (httpx) each send one segment per request and take the next from the stream until it
  is exhausted or --max-seconds have passed (after one untimed warm-up request); latency is per
  request, from send to answer. The
  server is then stopped with SIGTERM (it drains, then closes its engine).

- raw_vllm: vLLM's own OpenAI-compatible server, as `datm export RUN --to DIR` writes it (DIR/serve_vllm.sh:
  `python -m vllm.entrypoints.openai.api_server` with the run's modules as `--lora-modules`), sent
  the same stream by the same clients, each request the export README's `/v1/completions` body
  (the route's module as `model`, the ALMA prompt), its translation the completion's first non-empty
  line. `serve_overhead` = 1 - (datm serve --engine vllm segments/s / raw_vllm segments/s), top level
  in bench_serve.json with the load average at start.

Reported: segments/s and p50/p95/p99 latency per system; every request must be answered with 200
(none lost, none 4xx/5xx). Agreement: per engine, the share of segments whose translation is
identical to the sequential Translator's, and BLEU / chrF++ (mean over directions) of every system
against the references. Headline `serve_speedup` = vllm segments/s ÷ sequential segments/s.

--quick without RUN builds a tiny run (random LoRAs on a tiny Llama, tests/serve_runs.py) to check
that everything runs; its numbers mean nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from datm.languages import Direction

HEADLINE = "serve_speedup"
ENGINES = ("raw_vllm", "vllm", "transformers")
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"


def load_segments(run: Path) -> list[tuple[str, str, str]]:
    """(direction, source, reference) of every test segment the run translated."""
    from datm import artifacts
    from datm.eval.evaluate import read_lines

    layout = artifacts.RunDir(run)
    plan = artifacts.read_json(layout.plan)
    out = []
    for d in plan["routes"]:
        src, ref = layout.translations(d).src, layout.translations(d).ref
        if not src.is_file() or not ref.is_file():
            raise common.BenchError(
                f"{src} (or .ref.txt) not found: run `datm run` on {run} to the end first"
            )
        out += [(d, s, r) for s, r in zip(read_lines(src), read_lines(ref), strict=True)]
    return out


def make_stream(segments: list[tuple[str, str, str]], n: int, seed: int) -> list[int]:
    """Indices into segments: every segment once per round, each round shuffled, up to n requests."""
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < n:
        round_ = list(range(len(segments)))
        rng.shuffle(round_)
        stream += round_
    return stream[:n]


def run_sequential(
    run: str, requests: list[tuple[str, str]], threads: int | None, batch_size: int | None = None
) -> dict[str, Any]:
    """`datm translate` over the stream (fresh process): time after loading, and its outputs.
    `batch_size` replaces the run's eval batch size (the control)."""
    common.set_threads(threads)
    from datm.eval.translate import Request
    from datm.serve.offline import load_for_run

    translator, routes, cfg = load_for_run(Path(run))
    reqs = [Request(Direction.parse(d), text) for d, text in requests]
    batch = batch_size or cfg.eval.batch_size
    settings = dict(beams=1, max_new_tokens=cfg.eval.max_new_tokens, batch_size=batch)
    translator.translate(reqs[:1], routes, progress=False, **settings)  # warm-up, untimed
    start = time.perf_counter()
    outs = translator.translate(reqs, routes, progress=False, **settings)
    return {"seconds": time.perf_counter() - start, "outputs": outs}


def datm_request(direction: str, text: str) -> tuple[str, dict[str, Any]]:
    """`datm serve`'s request for one segment: (path, JSON body)."""
    src, tgt = direction.split("-")
    return "/v1/translate", {"source": src, "target": tgt, "text": text}


def datm_answer(body: dict[str, Any]) -> str:
    return str(body["translation"])


class RawVllmClient:
    """Requests to an exported `vllm serve` as its README writes them, and their translations."""

    def __init__(self, export: Path) -> None:
        from datm import artifacts
        from datm.plan import BASE

        readme = (export / "README.md").read_text(encoding="utf-8")
        self.body = json.loads(readme.split("-d '", 1)[1].split("'", 1)[0])
        routes = artifacts.read_json(export / "routes.json")["routes"]
        self.models = {d: (self.body["model"] if m == BASE else m) for d, m in routes.items()}

    def request(self, direction: str, text: str) -> tuple[str, dict[str, Any]]:
        from datm.data import alma_prompt

        src, tgt = direction.split("-")
        body = {**self.body, "model": self.models[direction], "prompt": alma_prompt(src, tgt, text)}
        return "/v1/completions", body

    @staticmethod
    def answer(body: dict[str, Any]) -> str:
        from datm.eval.translate import first_nonempty_line

        return first_nonempty_line(body["choices"][0]["text"])


async def load_test(
    url: str,
    requests: list[tuple[str, str]],
    clients: int,
    max_seconds: float,
    make: Any = datm_request,
    answer: Any = datm_answer,
) -> dict[str, Any]:
    import httpx

    outputs: list[str | None] = [None] * len(requests)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    next_index = iter(range(len(requests)))
    deadline = float("inf")  # set once the warm-up is done
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        for i in next_index:
            if time.perf_counter() > deadline:
                return
            path, body = make(*requests[i])
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(path, json=body)
            except httpx.HTTPError as e:
                statuses["lost"] = statuses.get("lost", 0) + 1
                errors.append(f"request {i}: {type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                outputs[i] = answer(r.json())
            else:
                errors.append(f"request {i}: {r.status_code} {r.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        path, body = make(*requests[0])
        warm_up = await http.post(path, json=body)
        warm_up.raise_for_status()  # untimed
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    answered = sum(o is not None for o in outputs)
    return {
        "seconds": seconds,
        "sent": sent,
        "answered": answered,
        "statuses": statuses,
        "errors": errors[:10],
        "latencies": latencies,
        "outputs": outputs,
    }


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not latencies:
        return {"p50": None, "p95": None, "p99": None}
    p = np.percentile(np.array(latencies), [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def scores_of(
    outputs: list[str | None], stream: list[int], segments: list[tuple[str, str, str]]
) -> dict[str, float]:
    """Mean BLEU / chrF++ over directions, on the first answer for each segment of the stream."""
    from datm.eval.evaluate import score_direction

    first: dict[int, str] = {}
    for out, seg in zip(outputs, stream, strict=True):
        if out is not None and seg not in first:
            first[seg] = out
    per: dict[str, tuple[list[str], list[str]]] = {}
    for seg, hyp in sorted(first.items()):
        d, _, ref = segments[seg]
        per.setdefault(d, ([], []))
        per[d][0].append(hyp)
        per[d][1].append(ref)
    rows = [score_direction(h, r, Direction.parse(d).tgt) for d, (h, r) in per.items()]
    return {
        "bleu": sum(s.bleu for s in rows) / len(rows),
        "chrf": sum(s.chrf for s in rows) / len(rows),
        "segments": len(first),
    }


def agreement(a: list[str | None], b: list[str | None], stream: list[int]) -> dict[str, Any]:
    """Identical answers per distinct segment (the first answer of each), and where the others part:
    the share of words they have in common before the first different one (median over the segments
    that differ; near 1 = a late tie broken the other way, near 0 = different from the start)."""
    import statistics

    seen: dict[int, tuple[str, str]] = {}
    for x, y, seg in zip(a, b, stream, strict=True):
        if x is not None and y is not None and seg not in seen:
            seen[seg] = (x, y)
    same = sum(x == y for x, y in seen.values())
    shared = [_common_prefix_share(x, y) for x, y in seen.values() if x != y]
    return {
        "segments": len(seen),
        "identical": same,
        "share": same / len(seen) if seen else None,
        "differing_median_shared_prefix": statistics.median(shared) if shared else None,
    }


def _common_prefix_share(x: str, y: str) -> float:
    """Words before the first difference ÷ the longer output's words."""
    xs, ys = x.split(), y.split()
    n = 0
    while n < min(len(xs), len(ys)) and xs[n] == ys[n]:
        n += 1
    return n / max(len(xs), len(ys), 1)


def batch_system(
    res: dict[str, Any],
    stream: list[int],
    segments: list[tuple[str, str, str]],
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of a `run_sequential` result (no latencies: one call), with its agreement with
    `reference` (another run_sequential result) when given."""
    n = len(res["outputs"])
    out = {
        "seconds": res["seconds"],
        "segments_per_second": n / res["seconds"],
        "answered": n,
        **dict.fromkeys(("p50", "p95", "p99")),
        "scores": scores_of(res["outputs"], stream, segments),
    }
    if reference is not None:
        out["agreement_with_sequential"] = agreement(res["outputs"], reference["outputs"], stream)
    return out


def start_server(run: Path, engine: str, args: Any, log: Path) -> tuple[Any, dict[str, Any]]:
    """`datm serve --engine ENGINE`, or (raw_vllm) the `vllm serve` that `datm export` writes; and
    the request maker and answer reader of its clients."""
    import os

    from serve_runs import ExportedVllmServer, Server

    if engine != "raw_vllm":
        extra = ["--kv-cache-gib", str(args.kv_cache_gib)] if engine == "vllm" else []
        return Server(run, engine, log, *extra, timeout=args.startup_timeout), {}
    from datm.cli import main

    export = log.parent / "export"
    if main(["export", str(run), "--to", str(export)]) != 0:
        raise common.BenchError(f"datm export {run} failed")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{args.kv_cache_gib:g}"  # as datm serve's --kv-cache-gib
    client = RawVllmClient(export)
    server = ExportedVllmServer(export, log, timeout=args.startup_timeout)
    return server, {"make": client.request, "answer": client.answer}


def serve_engine(run: Path, engine: str, args: Any, requests: list[tuple[str, str]], log: Path) -> dict:
    common.log(f"{engine}: starting its server (log {log})")
    t0 = time.perf_counter()
    server, client = start_server(run, engine, args, log)
    startup = time.perf_counter() - t0
    common.log(f"{engine}: ready in {startup:.0f} s; {len(requests)} requests from {args.clients} clients")
    try:
        result = asyncio.run(load_test(server.url, requests, args.clients, args.max_seconds, **client))
    finally:
        exit_code = server.stop()
    result.update(startup_seconds=startup, exit_code=exit_code)
    common.log(f"{engine}: {result['answered']}/{result['sent']} answered in {result['seconds']:.1f} s")
    return result


def quick_run(root: Path) -> Path:
    sys.path.insert(0, str(TESTS_DIR))
    from serve_runs import build_vllm_model_dir, make_run

    return make_run(root, build_vllm_model_dir(root / "model"))


def main() -> int:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("run", nargs="?", type=Path, help="run directory (e.g. the datm/ of `datm demo`)")
    parser.add_argument("--requests", type=int, default=512, help="requests in the stream (default 512)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="per engine: stop sending after")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated (default vllm,transformers)"
    )
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vllm on CPU: KV cache (GiB)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for a server")
    parser.add_argument(
        "--control-batch-size",
        type=int,
        default=8,
        help="the control: datm translate again with this batch size (0: none; default 8)",
    )
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        raise common.BenchError(f"--engines: unknown {unknown}; expected some of {list(ENGINES)}")
    sys.path.insert(0, str(TESTS_DIR))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.run is None:
        if not args.quick:
            raise common.BenchError("give a run directory (or --quick, which builds a tiny one)")
        args.requests = min(args.requests, 48)
        args.run = quick_run(work)
    run = args.run.resolve()
    segments = load_segments(run)
    stream = make_stream(segments, args.requests, args.seed)
    requests = [(segments[i][0], segments[i][1]) for i in stream]
    settings = {
        "run": str(run),
        "requests": len(requests),
        "distinct_segments": len(set(stream)),
        "directions": sorted({segments[i][0] for i in stream}),
        "clients": args.clients,
        "max_seconds_per_engine": args.max_seconds,
        "engines": engines,
        "kv_cache_gib": args.kv_cache_gib,
    }
    record = common.new_record("bench_serve", HEADLINE, args.quick, settings, args.allow_load)
    common.log(f"{len(requests)} requests over {len(settings['directions'])} directions, run {run}")

    common.log("sequential: datm translate's Translator over the stream (fresh process)")
    seq = common.run_isolated(run_sequential, str(run), requests, args.threads)
    seq_rate = len(requests) / seq["seconds"]
    common.log(f"sequential: {seq['seconds']:.1f} s, {seq_rate:.2f} segments/s")
    systems: dict[str, dict[str, Any]] = {"sequential datm translate": batch_system(seq, stream, segments)}
    if args.control_batch_size:
        # The control: the same Translator, another batch size. Greedy decoding in bf16 depends on the
        # batch a segment shares (padding, kernel shapes); this is how much, without any server.
        b = args.control_batch_size
        common.log(f"control: the same Translator with batch size {b} (fresh process)")
        ctl = common.run_isolated(run_sequential, str(run), requests, args.threads, b)
        systems[f"control: datm translate, batch size {b}"] = batch_system(ctl, stream, segments, seq)
    for engine in engines:
        res = serve_engine(run, engine, args, requests, work / f"{engine}.log")
        answered = res["answered"]
        systems[engine] = {
            "seconds": res["seconds"],
            "segments_per_second": answered / res["seconds"],
            "answered": answered,
            "sent": res["sent"],
            "statuses": res["statuses"],
            "startup_seconds": res["startup_seconds"],
            **percentiles(res["latencies"]),
            "scores": scores_of(res["outputs"], stream, segments),
            "agreement_with_sequential": agreement(res["outputs"], seq["outputs"], stream),
        }
        common.add_check(
            record,
            f"{engine}: every request answered",
            res["sent"] == answered and set(res["statuses"]) <= {"200"},
            f"sent {res['sent']}, answered {answered}, statuses {res['statuses']}"
            + (f"; first errors {res['errors'][:3]}" if res["errors"] else ""),
        )
        common.add_check(
            record,
            f"{engine}: whole stream sent within --max-seconds",
            res["sent"] == len(requests),
            f"{res['sent']} of {len(requests)} requests sent",
            hard=False,
        )
        ag = systems[engine]["agreement_with_sequential"]
        common.add_check(
            record,
            f"{engine}: agreement measured on >= 200 segments",
            args.quick or ag["segments"] >= 200,
            f"{ag['segments']} distinct segments compared",
            hard=not args.quick,
        )
    record["systems"] = systems
    if "vllm" in systems:
        record[HEADLINE] = common.ratio(systems["vllm"]["segments_per_second"], seq_rate)
    if "vllm" in systems and "raw_vllm" in systems:
        record["serve_overhead"] = (
            1 - systems["vllm"]["segments_per_second"] / systems["raw_vllm"]["segments_per_second"]
        )
    record["load_average_at_start"] = record["load_check"]["load_average_1min"]
    if "transformers" in systems:
        record["transformers_speedup"] = common.ratio(
            systems["transformers"]["segments_per_second"], seq_rate
        )

    def fmt(x: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
        return "-" if x is None else format(x * scale, spec)

    rows = []
    for name, s in systems.items():
        ag = s.get("agreement_with_sequential")
        rows.append(
            [
                name,
                f"{s['answered']}",
                fmt(s["seconds"], spec=".1f"),
                fmt(s["segments_per_second"]),
                fmt(s["p50"], 1000, ".0f"),
                fmt(s["p95"], 1000, ".0f"),
                fmt(s["p99"], 1000, ".0f"),
                fmt(s["scores"]["bleu"]),
                fmt(s["scores"]["chrf"]),
                "-" if ag is None else f"{ag['identical']}/{ag['segments']} ({ag['share']:.1%})",
                fmt(ag and ag.get("differing_median_shared_prefix")),
            ]
        )
    header = ["system", "answered", "seconds", "segments/s", "p50 ms", "p95 ms", "p99 ms", "BLEU", "chrF++"]
    body = "\n\n".join(
        [
            f"{len(requests)} single-segment requests ({len(set(stream))} distinct test segments of the run, "
            f"{len(settings['directions'])} directions, shuffled), {args.clients} concurrent clients; "
            "sequential = the run's Translator over the same stream in one call (what `datm translate` "
            "does), timed after loading. BLEU/chrF++: mean over directions on the distinct segments. "
            "Identical: translations equal to the sequential Translator's (greedy both); for the "
            "others, the median share of words before the first different one. The control row is the "
            "same Translator with another batch size: how much batch composition alone changes greedy "
            "output at the run's precision.",
            common.markdown_table(
                [*header, "identical to datm translate", "differing: shared prefix (median)"], rows
            ),
            f"serve_speedup (vllm ÷ sequential) = {fmt(record.get(HEADLINE))}; "
            f"transformers engine ÷ sequential = {fmt(record.get('transformers_speedup'))}; "
            f"serve_overhead (1 - vllm ÷ raw_vllm) = {fmt(record.get('serve_overhead'), spec='.3f')} "
            f"(load average at start {record['load_average_at_start']}).",
        ]
    )
    common.write_results(common.output_dir(args), record, body)
    failed = common.failed_hard_checks(record)
    if failed:
        common.log(f"FAILED checks: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
