"""The pilot that `strategy: auto` decides from by default (`auto.source: pilot`).

Two short trainings of the config's own setting, each a fixed fraction (`auto.pilot.fraction`) of
every adapter's training budget: `separate` (one adapter per direction) and `group_family` (one
adapter per group and family: what `auto` means by training jointly). Both are scored on the dev
pairs (`datm.data.dev`: `data.valid`, or `data.valid_holdout` training pairs held out of every
training of the run where a direction has no valid file) — never on the test split — and compared
exactly as `datm analyze` compares runs (`datm.analyze`): per direction Δ = score(joint) −
score(separate). `auto_plan` then trains jointly the directions whose Δ is above `auto.threshold`.

The two trainings are ordinary run directories, <output_dir>/pilot/separate and
<output_dir>/pilot/joint, so the pilot resumes after a kill like any run; the analysis goes to
<output_dir>/pilot/analysis/ (analysis.json, .md and plots), written last.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datm import artifacts
from datm.artifacts import RunDir
from datm.config import Config, ConfigError
from datm.data import dev
from datm.languages import directions_for
from datm.log import get_logger
from datm.plan import Plan, make_plan
from datm.plan.strategies import PRIOR_TEXT

log = get_logger(__name__)

ROLES = {"separate": "separate", "joint": "group_family"}  # pilot run -> its strategy
FULL = "full_pilot"  # auto.source: the pilot at the full budget, its adapters the shipped modules


def pilot_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / "pilot"


def analysis_path(cfg: Config) -> Path:
    return pilot_dir(cfg) / "analysis" / "analysis.json"


def fraction(cfg: Config) -> float:
    """The pilot's share of every adapter's budget: auto.pilot.fraction, or 1 for `full_pilot`
    (whose adapters are then the run's own: `hand_over`)."""
    return 1.0 if cfg.auto.source == FULL else cfg.auto.pilot.fraction


def pilot_train(cfg: Config) -> dict[str, float | int | None]:
    """The pilot's training budget per adapter: the full budget times `fraction(cfg)`."""
    f, t = fraction(cfg), cfg.train
    if t.steps is not None:
        return {"steps": max(1, math.ceil(t.steps * f)), "epochs": None}
    assert t.epochs is not None  # config validation: strategy auto trains, so it has a budget
    return {"steps": None, "epochs": t.epochs * f}


def pilot_config(cfg: Config, role: str) -> Config:
    """The config of one pilot run: the user's setting with the pilot's strategy, budget, the dev
    pairs in the place of the test split (`data.eval_on: dev`), and its own output directory."""
    p = cfg.auto.pilot
    return dataclasses.replace(
        cfg,
        strategy=ROLES[role],
        data=dataclasses.replace(cfg.data, eval_on="dev"),
        train=dataclasses.replace(cfg.train, **pilot_train(cfg)),
        eval=dataclasses.replace(cfg.eval, max_examples=p.max_examples or cfg.eval.max_examples),
        output_dir=str(pilot_dir(cfg) / role),
        source=f"{cfg.source} (pilot {role})",
    )


def describe(cfg: Config) -> str:
    """What the pilot runs and what it costs, in terms of the full run's budget."""
    groups = cfg.resolved_groups()
    plans = {role: make_plan(s, cfg.languages, groups) for role, s in ROLES.items()}
    budget = pilot_train(cfg)
    t = cfg.train
    if t.steps is not None:
        unit = f"{budget['steps']} steps (full: {t.steps})"
    else:
        unit = f"{budget['epochs']:g} epochs (full: {t.epochs:g})"
    shared = len(_shared_adapters(plans))
    trained = sum(len(p.adapters) for p in plans.values()) - shared
    examples = cfg.auto.pilot.max_examples or cfg.eval.max_examples
    segments = f"the first {examples}" if examples else "all"
    reused = (
        "; its adapters are the run's own (linked, trained once): auto costs training both the separate "
        "and the joint adapters, and a direction whose dev interval includes 0 follows "
        f"{PRIOR_TEXT}"
        if cfg.auto.source == FULL
        else ""
    )
    return (
        f"pilot: {fraction(cfg):g} of the training budget per adapter, {unit}; "
        f"{trained} pilot adapters ({len(plans['separate'].adapters)} separate + "
        f"{len(plans['joint'].adapters)} joint per group and family"
        + (f", {shared} of them the same as a separate one, trained once" if shared else "")
        + f"), scored on the dev pairs ({segments} per direction; {dev_words(cfg)}; never the test split); "
        f"Δ {cfg.auto.pilot.metric} = joint − separate, as `datm analyze`; runs in {pilot_dir(cfg)}{reused}"
    )


def dev_words(cfg: Config) -> str:
    """Where the pilot's dev pairs come from, in words."""
    rec = dev.record(cfg.dev_rule(), [str(d) for d in directions_for(cfg.languages)])
    held = rec["held_out"]
    if not held:
        return "data.valid"
    return (
        f"data.valid, and for {', '.join(held)} (no data.valid) {rec['valid_holdout']} training pairs "
        f"each held out of every training (seed {rec['seed']})"
    )


def _shared_adapters(plans: dict) -> list[str]:
    """Joint-run adapters identical to a separate-run adapter (same name and directions)."""
    separate = {a.name: a.directions for a in plans["separate"].adapters}
    return [a.name for a in plans["joint"].adapters if separate.get(a.name) == a.directions]


def share_adapter(source: RunDir, target: RunDir, name: str) -> None:
    """Hand run `source`'s finished adapter `name` to run `target` (the separate pilot's to the joint
    pilot, a full pilot's to the run it decides), by hard links, under the target's claim on training
    it: concurrent runs on one output_dir link it once, and a target that started training it
    meanwhile is waited for."""
    src, dst = source.adapter(name), target.adapter(name)
    if not artifacts.is_done(src) or artifacts.is_done(dst):
        return
    with artifacts.claim(target.claim(f"train:{name}"), f"pilot: share adapter {name}"):
        if artifacts.is_done(dst):
            return
        stage = artifacts.staging_dir(dst)
        artifacts.link_tree(src, stage)
        artifacts.publish_dir(stage, dst)


def hand_over(cfg: Config, plan: Plan) -> None:
    """`full_pilot`: the plan's adapters that a pilot run trained (same name, same directions: same
    data, seed and full budget) are linked into the run, not trained again."""
    if cfg.auto.source != FULL:
        return
    groups, target = cfg.resolved_groups(), RunDir(cfg.output_dir)
    wanted = {a.name: a.directions for a in plan.adapters}
    for role, strategy in ROLES.items():
        for a in make_plan(strategy, cfg.languages, groups).adapters:
            if wanted.get(a.name) == a.directions:
                share_adapter(RunDir(pilot_dir(cfg) / role), target, a.name)


def settings(cfg: Config) -> dict[str, Any]:
    """What a pilot's measurements depend on beyond its run directories' own configs."""
    p = cfg.auto.pilot
    return {
        "fraction": fraction(cfg),
        "train": pilot_train(cfg),
        "dev": cfg.data.valid,
        "valid_holdout": cfg.data.valid_holdout,
        "max_examples": p.max_examples or cfg.eval.max_examples,
        "metric": p.metric,
        "samples": p.samples,
    }


def check_current(cfg: Config, analysis: dict[str, Any], path: Path) -> None:
    """A finished pilot's analysis was made with the config's pilot settings (else it is stale)."""
    recorded, now = analysis.get("pilot"), settings(cfg)
    if recorded != now:
        changed = sorted(k for k in now if not isinstance(recorded, dict) or recorded.get(k) != now[k])
        raise ConfigError(
            f"{path} was made by a pilot with other settings (differs in {changed}); delete "
            f"{pilot_dir(cfg)} to run the pilot again, or use a new output_dir"
        )


def run_pilot(cfg: Config, run: Callable[[Config], object]) -> Path:
    """Run (or resume) the pilot and write its analysis; returns analysis.json's path. `run` runs
    one of its two runs (`datm.run.runner.run`)."""
    from datm.analysis import analyze

    target = analysis_path(cfg)
    if target.is_file():
        return target
    log.info(describe(cfg))
    configs = {role: pilot_config(cfg, role) for role in ROLES}
    run(configs["separate"])
    # A joint-run adapter that holds one direction is the separate run's adapter (same data, seed
    # and budget): trained once, hard-linked.
    groups = cfg.resolved_groups()
    plans = {role: make_plan(c.strategy, c.languages, groups, c.merge.method) for role, c in configs.items()}
    separate, joint = RunDir(configs["separate"].output_dir), RunDir(configs["joint"].output_dir)
    for name in _shared_adapters(plans):
        share_adapter(separate, joint, name)
    run(configs["joint"])
    p = cfg.auto.pilot
    result = analyze.analyze(
        Path(configs["separate"].output_dir),
        Path(configs["joint"].output_dir),
        metric=p.metric,
        n_samples=p.samples,
        seed=cfg.train.seed,
    )
    result = dataclasses.replace(result, pilot=settings(cfg))
    path = analyze.write_analysis(result, target.parent)
    log.info(analyze.format_table(result))
    log.info(f"pilot analysis written: {path}")
    return path


__all__ = [
    "analysis_path",
    "check_current",
    "describe",
    "fraction",
    "hand_over",
    "pilot_config",
    "pilot_dir",
    "pilot_train",
    "run_pilot",
    "settings",
]
