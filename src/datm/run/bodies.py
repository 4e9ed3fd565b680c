"""What each kind of task does, and `execute`: claim the task's artifact, build it, release it.

The same functions run in `datm run` (local executor), in a Ray worker and under `--only`, so all
executors produce the same bytes. A `Worker` is what one process keeps between tasks: the
tokenizer and the base model, loaded once (on this process's device) and reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from datm import artifacts, data, device
from datm import languages as L
from datm.artifacts import RunDir
from datm.config import Config, ConfigError
from datm.data import dev
from datm.eval.results import RunScores
from datm.eval.worker import Worker, made_with, translation_session
from datm.log import get_logger
from datm.plan import BASE, Plan, dev_directions
from datm.run.graph import ALWAYS_RUN, Task, is_done

log = get_logger(__name__)


# --- data of a config --------------------------------------------------------------------------------


def train_pairs(
    cfg: Config, directions: list[str], report: data.ReadReport, exclude: frozenset[str] = frozenset()
) -> list[data.Pair]:
    """The training pairs of some directions, without the records in `exclude` ('file:line': dev
    pairs held out of training, `held_out_origins`)."""
    if not cfg.data.train:
        raise ConfigError(f"{cfg.source}: data.train is required to train adapters")
    pairs: list[data.Pair] = []
    for d in directions:
        got = data.read_direction(
            cfg.data.train, L.Direction.parse(d), cfg.data.format, cfg.data.on_bad_record, report, "train"
        )
        got = [p for p in got if p.origin not in exclude]
        pairs += data.select(got, cfg.train.max_examples_per_pair, cfg.train.seed)
    return pairs


def held_out_origins(cfg: Config, plan: Plan) -> frozenset[str]:
    """The records every training of this run skips: the held-out dev pairs of the directions it
    decides on dev data (`datm.plan.dev_directions`, `datm.data.dev`)."""
    return dev.held_out_origins(cfg.dev_rule(), dev_directions(cfg, plan))


def test_pairs(cfg: Config, direction: L.Direction) -> list[data.Pair]:
    """The pairs a run translates and scores: the test split, or (`data.eval_on: dev`, auto's pilot
    runs) the dev pairs of `datm.data.dev`; the first `eval.max_examples`."""
    if cfg.data.eval_on == "dev":
        got = dev.dev_pairs(cfg.dev_rule(), direction)[1]
        return got[: cfg.eval.max_examples] if cfg.eval.max_examples else got
    if not cfg.data.test:
        raise ConfigError(f"{cfg.source}: data.test is required to evaluate")
    from datm.run import preflight

    fmt, split = preflight.eval_split(cfg, cfg.data.test, direction)
    got = data.read_direction(
        cfg.data.test, direction, fmt, cfg.data.on_bad_record, None, split, allow_reverse=False
    )
    return got[: cfg.eval.max_examples] if cfg.eval.max_examples else got


def test_settings(cfg: Config, model_path: str, kind: str) -> dict[str, Any]:
    """The eval settings a run's test translations through a module applied as `kind` are made with
    (recorded in DIR.info.json): the decoding, the engine, and how many test segments."""
    return {**made_with(cfg, model_path, kind), "eval.max_examples": cfg.eval.max_examples}


# --- the task bodies ---------------------------------------------------------------------------------


def _training_data(
    cfg: Config, plan: Plan, name: str, directions: list[str], worker: Worker
) -> tuple[list[data.Example], dict[str, Any]]:
    """An adapter's tokenized training examples, and where they came from (its provenance), with
    what was skipped, truncated or read backwards said in the log."""
    fmt = data.PromptFormat(worker.tokenizer, cfg.prompt)
    report = data.ReadReport()
    held_out = held_out_origins(cfg, plan)  # dev pairs, never trained on
    pairs = train_pairs(cfg, directions, report, held_out)
    examples, tok_report = data.tokenize_pairs(pairs, fmt, cfg.train.max_length)
    for d, file in report.reversed_files.items():
        log.info(f"adapter {name}: {d} is trained on the reverse direction's file {file}")
    if report.skipped:
        log.warning(f"adapter {name}: skipped {len(report.skipped)} bad record(s), e.g. {report.skipped[0]}")
    if tok_report.truncated or tok_report.dropped:
        log.warning(
            f"adapter {name}: {tok_report.truncated} truncated, "
            f"{tok_report.dropped} dropped (prompt alone too long)"
        )
    log.debug(
        f"adapter {name}: {len(examples)} training examples of {', '.join(directions)}"
        + (f" ({len(held_out)} dev pairs held out)" if held_out else "")
    )
    provenance = {
        "model": worker.model_path,
        "model_fingerprint": worker.fingerprint,
        "data_fingerprint": artifacts.fingerprint_texts(f"{p.src}\t{p.tgt}" for p in pairs),
        "data_origin": sorted({p.origin.rsplit(":", 1)[0] for p in pairs}),
        "skipped_records": report.skipped,
        "held_out_for_dev": len(held_out),
        "reversed_files": report.reversed_files,  # direction -> reverse direction's file it read
        "tokenize": asdict(tok_report),
        "prompt": cfg.prompt,
    }
    return examples, provenance


def _cache_key(cfg: Config, directions: list[str], provenance: dict[str, Any], world_size: int) -> str:
    """The adapter cache's key of an adapter: everything that decides its weights."""
    from datm.train.cache import adapter_key

    return adapter_key(
        model_fingerprint=provenance["model_fingerprint"],
        data_fingerprint=provenance["data_fingerprint"],
        directions=directions,
        lora=cfg.lora,
        train=cfg.train,
        prompt=cfg.prompt,
        device_type=device.current().type,
        world_size=world_size,
        precision=device.pick_precision(cfg.train.precision, device.current()),
        versions=artifacts.library_versions(),
    )


def train_one(cfg: Config, plan: Plan, run: RunDir, task: Task, worker: Worker) -> None:
    """Train one adapter of the plan, or take the very same one from the adapter cache."""
    from datm.train import process_state, train_adapter
    from datm.train.cache import AdapterCache

    spec = next(a for a in plan.adapters if a.name == task.name)
    examples, provenance = _training_data(cfg, plan, spec.name, spec.directions, worker)
    state = process_state()
    cache = AdapterCache(cfg.adapter_cache) if cfg.adapter_cache else None
    key = _cache_key(cfg, spec.directions, provenance, state.num_processes) if cache is not None else ""
    held = cache.claim(key, task.id, state) if cache is not None else None
    try:
        if cache is not None and cache.has(key):
            if state.is_main_process:
                cache.fetch(key, run.adapter(spec.name), {"run": str(run.root), "adapter": spec.name})
                log.info(
                    f"adapter {spec.name}: the same adapter is in the cache ({cache.entry(key)}); reused"
                )
            state.wait_for_everyone()
            return
        model = worker.model(device.base_dtype(cfg.train.precision, device.current()))
        adapter = run.adapter(spec.name)
        train_adapter(
            model,
            worker.tokenizer,
            examples,
            adapter,
            cfg.lora,
            cfg.train,
            provenance,
            progress=worker.progress,
        )
        if cache is not None and state.is_main_process:
            cache.store(key, adapter)
    finally:
        if held is not None:
            held.release()


def merge_one(cfg: Config, plan: Plan, run: RunDir, task: Task, worker: Worker) -> None:
    from datm.merge import merge_adapters
    from datm.merge.select import AUTO, select_merge

    spec = next(m for m in plan.merges if m.name == task.name)
    if spec.method == AUTO:
        chosen = select_merge(cfg, plan, run, spec.name, worker).chosen
        log.info(
            f"merge {spec.name}: chose {chosen} on the dev set (candidates: {run.candidates(spec.name)})"
        )
        return
    res = merge_adapters(
        [run.adapter(s) for s in spec.sources],
        run.merged(spec.name),
        method=spec.method,
        density=cfg.merge.density,
        rank=cfg.merge.rank,
        form=cfg.merge.form,
        weights=cfg.merge.weights,
        scale=cfg.merge.scale,
        normalize=cfg.merge.normalize,
    )
    err = f", relative reconstruction error {res.rel_error:.3f}" if res.rel_error is not None else ""
    log.info(f"merge {spec.name}: {spec.method}/{res.form} of {len(spec.sources)} adapters{err}")


def module_dirs(plan: Plan, run: RunDir) -> dict[str, Any]:
    merges = [m.name for m in plan.merges]
    return {n: run.module(n, merges) for n in plan.shipped}


def translate_one(cfg: Config, plan: Plan, run: RunDir, task: Task, worker: Worker) -> None:
    """One direction, through the one module its route names (mixed-batch code path as serving)."""
    from datm.eval.engines import kind_of
    from datm.eval.translate import Request

    direction = L.Direction.parse(task.name)
    module = plan.routes[task.name]
    modules = {} if module == BASE else {module: run.module(module, [m.name for m in plan.merges])}
    settings = test_settings(cfg, worker.model_path, kind_of(module, modules))
    with translation_session(worker, modules, cfg) as translate:
        pairs = test_pairs(cfg, direction)
        hyps = translate([Request(direction, p.src) for p in pairs], plan.routes)
        files = run.translations(direction)
        artifacts.atomic_write_text(files.src, data.write_text(p.src for p in pairs))
        artifacts.atomic_write_text(files.ref, data.write_text(p.tgt for p in pairs))
        artifacts.atomic_write_json(files.info, {**translate.last_info, "settings": settings})
        artifacts.atomic_write_text(files.hyp, data.write_text(hyps))  # last: marks the direction done
        engine = translate.engine_of(module)
        log.info(f"translated {direction}: {len(hyps)} segments (module {module}) on the {engine} engine")


def score_all(cfg: Config, plan: Plan, run: RunDir, task: Task | None, worker: Worker) -> RunScores:
    """Every direction's hypotheses scored against its references: the run's `RunScores`, written
    to scores.json with what made them (config, seed, model and module fingerprints, versions)."""
    from datm.eval import comet, evaluate

    texts: dict[str, comet.Texts] = {}
    for d in plan.directions():
        files = run.translations(d)
        srcs, refs, hyps = (evaluate.read_lines(p) for p in (files.src, files.ref, files.hyp))
        texts[str(d)] = comet.Texts(srcs, hyps, refs)
    rows, comet_provenance = evaluate.score_directions(
        texts, {str(d): d.tgt for d in plan.directions()}, cfg.eval.comet
    )
    signatures: dict[str, str] = {}
    for d in plan.directions():
        sigs = rows[str(d)].signatures
        signatures.update({f"{k}:{d.tgt}" if k == "bleu" else k: v for k, v in sigs.items()})
    scores = RunScores(
        directions={str(d): rows[str(d)] for d in plan.directions()},
        averages=evaluate.averages({d: r.to_dict() for d, r in rows.items()}),
        signatures=signatures,
        provenance={
            "strategy": plan.strategy,
            "config": cfg.to_dict(),
            "seed": cfg.train.seed,
            "model": worker.model_path,
            "model_fingerprint": worker.fingerprint,
            "modules": {
                n: artifacts.fingerprint_files(sorted(p.glob("*.safetensors")))
                for n, p in module_dirs(plan, run).items()
            },
            "engines": {str(d): _engine_of(run, d) for d in plan.directions()},
            "versions": artifacts.library_versions(),
            **({"comet": comet_provenance} if comet_provenance else {}),
            "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        test_fingerprints={
            d: artifacts.fingerprint_texts(list(t.srcs) + list(t.refs)) for d, t in texts.items()
        },
    )
    artifacts.atomic_write_json(run.scores, scores.to_json())
    return scores


def _engine_of(run: RunDir, direction: L.Direction) -> str:
    """The engine that made a direction's test translations (as its info.json records)."""
    settings = artifacts.read_json(run.translations(direction).info).get("settings", {})
    return str(settings.get("eval.engine", "transformers"))  # before engines were recorded: transformers


def write_report(cfg: Config, plan: Plan, run: RunDir, task: Task, worker: Worker) -> None:
    from datm.analysis import report

    report.run_report(run.root)


BODIES: dict[str, Callable[[Config, Plan, RunDir, Task, Worker], Any]] = {
    "train": train_one,
    "merge": merge_one,
    "translate": translate_one,
    "score": score_all,
    "report": write_report,
}


def execute(
    cfg: Config,
    plan: Plan,
    task: Task,
    worker: Worker,
    wait: bool = True,
    say: Callable[[str], None] = log.info,
) -> str:
    """Build one task's artifact under its claim: 'built', 'reused' (complete already, perhaps
    by another process), or 'busy' (claimed by a live holder and `wait` is False). `say`: where its
    messages go (datm's log)."""
    run = RunDir(cfg.output_dir)
    always = task.kind in ALWAYS_RUN
    if not always and is_done(run, task):
        say(f"{task.id}: done, reused")
        return "reused"
    lock = run.claim(task.id)
    held = artifacts.claim(lock, task.id, say=say) if wait else artifacts.try_claim(lock, task.id)
    if held is None:
        return "busy"
    with held:
        if held.took_over:
            say(
                f"{task.id}: taking over from {artifacts.describe_holder(held.took_over)}, which stopped "
                "before finishing; resuming from its checkpoint"
            )
        if not always and is_done(run, task):
            say(f"{task.id}: done by another process, reused")
            return "reused"
        t0 = time.perf_counter()
        log.debug(f"{task.id}: starting (needs {', '.join(task.deps) or 'nothing'})")
        try:
            BODIES[task.kind](cfg, plan, run, task, worker)
        except BaseException:
            worker.forget_model()  # a task stopped midway may have left adapter layers in it
            raise
        say(f"{task.id}: built in {time.perf_counter() - t0:.1f} s")
    return "built"
