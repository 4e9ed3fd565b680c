"""Executes a plan: train → merge → translate → score → report, each step skipped when its
artifact is already complete. The runner never decides *what* to train; the plan does.

Layout of a run directory (the contract other tools read):
  plan.json, config.json, adapters/NAME/, merged/NAME/, translations/DIR.{src,ref,hyp}.txt,
  scores.json, report.md
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datm import artifacts, data, models
from datm import languages as L
from datm.config import Config, ConfigError
from datm.plan import BASE, Plan, format_plan, make_plan, merged_module_parameters


def build_plan(cfg: Config) -> Plan:
    if cfg.strategy == "auto":
        from datm.probe import auto_plan_for_config

        return auto_plan_for_config(cfg)  # from <output_dir>/probe/probe.json
    return make_plan(cfg.strategy, cfg.languages, cfg.resolved_groups(), cfg.merge.method)


def describe_plan(cfg: Config, as_json: bool = False) -> str:
    import json

    plan = build_plan(cfg)
    if as_json:
        return json.dumps(plan.to_dict(), indent=2)
    base_params = module_params = None
    merge_params: dict[str, int] = {}
    try:
        meta = models.meta_model(models.resolve(cfg.base_model))
        base_params = sum(p.numel() for p in meta.parameters())
        module_params = models.lora_parameter_count(meta, cfg.lora.r, cfg.lora.target_modules)
        rank = cfg.merge.rank or cfg.lora.r
        merge_params = merged_module_parameters(
            plan,
            cfg.merge.form,
            models.lora_parameter_count(meta, rank, cfg.lora.target_modules),
            models.linear_parameter_count(meta, cfg.lora.target_modules),
            cfg.merge.density,
        )
    except Exception as e:  # counting is informative only; the plan itself is still valid
        print(f"(parameter counts unavailable: {e})")
    return format_plan(plan, base_params, module_params, merge_params, cfg.merge.form)


def _check_same(path: Path, new: dict[str, Any], what: str, ignore: tuple[str, ...] = ()) -> None:
    """An output dir belongs to one experiment: refuse to mix results of different configs."""
    if not path.is_file():
        artifacts.atomic_write_json(path, new)
        return
    old = artifacts.read_json(path)
    diff = [k for k in _differences(old, new) if k.split(".")[0] not in ignore]
    if diff:
        raise ConfigError(
            f"{path} was written by a different {what} (differs in {diff}); "
            "use a new output_dir, or delete the old one to start over"
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. A key the old file lacks is a setting added to datm since
    (its default applies), not a change of experiment."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if k in old and k not in new:
                out.append(prefix + k)
            elif k in old:
                out += _differences(old[k], new[k], f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _prepare(cfg: Config) -> tuple[Path, Plan]:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = build_plan(cfg)
    _check_same(out / "plan.json", plan.to_dict(), "plan")
    # eval settings may change between invocations (they only affect the stages that follow)
    _check_same(out / "config.json", cfg.to_dict(), "config", ignore=("eval",))
    return out, plan


def train_pairs(cfg: Config, directions: list[str], report: data.ReadReport) -> list[data.Pair]:
    if not cfg.data.train:
        raise ConfigError(f"{cfg.source}: data.train is required to train adapters")
    pairs: list[data.Pair] = []
    for d in directions:
        got = data.read_direction(
            cfg.data.train, L.Direction.parse(d), cfg.data.format, cfg.data.on_bad_record, report, "train"
        )
        pairs += data.select(got, cfg.train.max_examples_per_pair, cfg.train.seed)
    return pairs


def test_pairs(cfg: Config, direction: L.Direction) -> list[data.Pair]:
    if not cfg.data.test:
        raise ConfigError(f"{cfg.source}: data.test is required to evaluate")
    fmt = (
        cfg.data.format
        if cfg.data.format != "auto"
        else data.detect_format(data.pattern_path(cfg.data.test, direction))
    )
    split = cfg.data.test_split or ("devtest" if fmt == "flores" else "test")
    got = data.read_direction(cfg.data.test, direction, fmt, cfg.data.on_bad_record, None, split)
    return got[: cfg.eval.max_examples] if cfg.eval.max_examples else got


class Session:
    """The loaded base model and tokenizer, shared by every stage of one invocation."""

    def __init__(self, cfg: Config) -> None:
        self.model_path = models.resolve(cfg.base_model)
        self.tokenizer = models.load_tokenizer(self.model_path)
        self.model = models.load_model(self.model_path)
        self.fingerprint = models.fingerprint(self.model_path)


def train_stage(cfg: Config, plan: Plan, out: Path, session: Session, only: list[str] | None = None) -> None:
    from datm.train import train_adapter

    fmt = data.PromptFormat(session.tokenizer, cfg.prompt)
    for spec in plan.adapters:
        if only and spec.name not in only:
            continue
        target = out / "adapters" / spec.name
        if artifacts.is_done(target):
            print(f"adapter {spec.name}: done, reused")
            continue
        report = data.ReadReport()
        pairs = train_pairs(cfg, spec.directions, report)
        examples, tok_report = data.tokenize_pairs(pairs, fmt, cfg.train.max_length)
        if report.skipped:
            print(
                f"adapter {spec.name}: skipped {len(report.skipped)} bad record(s), e.g. {report.skipped[0]}"
            )
        if tok_report.truncated or tok_report.dropped:
            print(
                f"adapter {spec.name}: {tok_report.truncated} truncated, "
                f"{tok_report.dropped} dropped (prompt alone too long)"
            )
        provenance = {
            "model": session.model_path,
            "model_fingerprint": session.fingerprint,
            "data_fingerprint": artifacts.fingerprint_texts(f"{p.src}\t{p.tgt}" for p in pairs),
            "data_origin": sorted({p.origin.rsplit(":", 1)[0] for p in pairs}),
            "skipped_records": report.skipped,
            "tokenize": asdict(tok_report),
            "prompt": cfg.prompt,
        }
        train_adapter(session.model, session.tokenizer, examples, target, cfg.lora, cfg.train, provenance)


def merge_stage(cfg: Config, plan: Plan, out: Path) -> None:
    from datm.merge import merge_adapters

    for spec in plan.merges:
        target = out / "merged" / spec.name
        if artifacts.is_done(target):
            print(f"merge {spec.name}: done, reused")
            continue
        res = merge_adapters(
            [out / "adapters" / s for s in spec.sources],
            target,
            method=spec.method,
            density=cfg.merge.density,
            rank=cfg.merge.rank,
            form=cfg.merge.form,
            weights=cfg.merge.weights,
        )
        err = f", relative reconstruction error {res.rel_error:.3f}" if res.rel_error is not None else ""
        print(f"merge {spec.name}: {spec.method}/{res.form} of {len(spec.sources)} adapters{err}")


def module_dirs(plan: Plan, out: Path) -> dict[str, Path]:
    return {n: out / ("merged" if plan.kind(n) == "merge" else "adapters") / n for n in plan.shipped}


def translate_stage(cfg: Config, plan: Plan, out: Path, session: Session) -> None:
    from datm.translate import Request, Translator

    tdir = out / "translations"
    todo = [d for d in plan.directions() if not (tdir / f"{d}.hyp.txt").is_file()]
    if not todo:
        return
    from datm.translate import inference_dtype

    # Translation is the last use of the model in a run: serve it in bf16 where that is fast.
    session.model.to(inference_dtype(cfg.eval.precision, session.model.device))
    translator = Translator(session.model, session.tokenizer, module_dirs(plan, out), cfg.prompt)
    try:
        for d in todo:
            pairs = test_pairs(cfg, d)
            hyps = translator.translate(
                [Request(d, p.src) for p in pairs],
                plan.routes,
                beams=cfg.eval.beams,
                max_new_tokens=cfg.eval.max_new_tokens,
                batch_size=cfg.eval.batch_size,
            )
            artifacts.atomic_write_text(tdir / f"{d}.src.txt", data.write_text(p.src for p in pairs))
            artifacts.atomic_write_text(tdir / f"{d}.ref.txt", data.write_text(p.tgt for p in pairs))
            artifacts.atomic_write_json(tdir / f"{d}.info.json", translator.last_info)
            # hyp last: its presence marks the direction complete
            artifacts.atomic_write_text(tdir / f"{d}.hyp.txt", data.write_text(hyps))
            print(f"translated {d}: {len(hyps)} segments (module {plan.routes[str(d)]})")
    finally:
        from peft import PeftModel

        if isinstance(translator.model, PeftModel):
            translator.model.unload()  # give the shared base model back without adapters


def score_stage(cfg: Config, plan: Plan, out: Path, session: Session | None) -> dict[str, Any]:
    from datm import evaluate

    tdir = out / "translations"
    directions: dict[str, Any] = {}
    signatures: dict[str, str] = {}
    for d in plan.directions():
        read = evaluate.read_lines
        srcs, refs, hyps = (read(tdir / f"{d}.{k}.txt") for k in ("src", "ref", "hyp"))
        s = evaluate.score_direction(hyps, refs, d.tgt, srcs=srcs, comet_model=cfg.eval.comet)
        row = s.to_dict()
        row["test_fingerprint"] = artifacts.fingerprint_texts(srcs + refs)
        directions[str(d)] = row
        signatures.update({f"{k}:{d.tgt}" if k == "bleu" else k: v for k, v in s.signatures.items()})
    scores = {
        "directions": directions,
        "averages": evaluate.averages(directions),
        "signatures": signatures,
        "provenance": {
            "strategy": plan.strategy,
            "config": cfg.to_dict(),
            "seed": cfg.train.seed,
            "model": session.model_path if session else cfg.base_model,
            "model_fingerprint": session.fingerprint if session else None,
            "modules": {n: _module_fingerprint(p) for n, p in module_dirs(plan, out).items()},
            "versions": artifacts.library_versions(),
            "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }
    artifacts.atomic_write_json(out / "scores.json", scores)
    return scores


def _module_fingerprint(path: Path) -> str:
    return artifacts.fingerprint_files(sorted(p for p in path.glob("*.safetensors")))


def print_scores(scores: dict[str, Any]) -> None:
    print(f"\n{'direction':<10} {'BLEU':>7} {'chrF++':>7}")
    for d, s in scores["directions"].items():
        print(f"{d:<10} {s['bleu']:>7.2f} {s['chrf']:>7.2f}")
    for fam, s in scores["averages"].items():
        print(f"{'avg ' + fam:<10} {s['bleu']:>7.2f} {s['chrf']:>7.2f}")


def _probe_if_auto(cfg: Config) -> None:
    """`auto` plans from measurements: take the gradient probe first when there are none yet."""
    if cfg.strategy != "auto":
        return
    from datm import probe

    if not probe.default_probe_path(cfg).is_file():
        print("strategy auto: measuring gradient similarity first (datm probe)")
        probe.probe_config(cfg, probe.default_probe_path(cfg).parent)


def run(cfg: Config) -> dict[str, Any]:
    _probe_if_auto(cfg)
    out, plan = _prepare(cfg)
    print(format_plan(plan))
    session = Session(cfg)
    train_stage(cfg, plan, out, session)
    if not _is_main_process():
        return {}  # under `accelerate launch`, the other processes only help train
    merge_stage(cfg, plan, out)
    translate_stage(cfg, plan, out, session)
    scores = score_stage(cfg, plan, out, session)
    from datm import report

    report.run_report(out)
    print_scores(scores)
    print(f"\nresults: {out / 'scores.json'}   report: {out / 'report.md'}")
    return scores


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def train_only(cfg: Config, only: list[str] | None = None) -> None:
    _probe_if_auto(cfg)
    out, plan = _prepare(cfg)
    unknown = sorted(set(only or []) - {a.name for a in plan.adapters})
    if unknown:
        raise ConfigError(
            f"--adapter {unknown}: not in the plan; adapters are {[a.name for a in plan.adapters]}"
        )
    train_stage(cfg, plan, out, Session(cfg), only)


__all__ = ["BASE", "run", "train_only", "describe_plan", "build_plan"]
