"""Runs a config: plans it, checks that the output_dir belongs to it, expands the plan to tasks
(train → merge → translate → score → report) and hands them to an executor; a task is skipped when
its artifact is already complete. The runner never decides *what* to train; the plan does.
The run directory's layout is `datm.artifacts.RunDir`; the tasks and executors are `datm.tasks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datm import artifacts, auto
from datm.analysis.view import RunView
from datm.artifacts import RunDir
from datm.auto import build_plan
from datm.config import Config, ConfigError
from datm.eval.results import RunScores
from datm.eval.worker import Worker
from datm.log import get_logger
from datm.plan import BASE, Plan
from datm.run import preflight
from datm.run.bodies import BODIES, execute, test_settings
from datm.run.describe import format_plan
from datm.run.graph import Task, build_tasks, is_done

log = get_logger(__name__)


def _check_same(
    path: Path, old: dict[str, Any] | None, new: dict[str, Any], what: str, ignore: tuple[str, ...] = ()
) -> None:
    """An output dir belongs to one experiment: refuse to mix results of different configs. `old`: what
    the run recorded at `path` (None: nothing yet, so the main process writes `new` there)."""
    if old is None:
        if _is_main_process():  # the others check it once the main process has written it
            artifacts.atomic_write_json(path, new)
        return
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


def _prepare(cfg: Config) -> tuple[RunDir, Plan]:
    run = RunDir(cfg.output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    plan = build_plan(cfg)
    view = RunView(run.root)
    _check_same(run.plan, view.recorded("plan"), plan.to_dict(), "plan")
    # eval settings may change between invocations until a translation is made with them (they only
    # affect the stages that follow; `_check_made_with` holds finished ones to theirs), and
    # where the tasks run (and whether a trained adapter comes from the cache) changes nothing they produce
    ignore = ("eval", "executor", "resources", "adapter_cache")
    _check_same(run.config, view.recorded("config"), cfg.to_dict(), "config", ignore=ignore)
    _check_made_with(cfg, run, plan)
    return run, plan


def _check_made_with(cfg: Config, run: RunDir, plan: Plan) -> None:
    """Finished translations, and merges chosen on dev translations, are never remade nor scored under
    other settings: refuse eval settings other than those they recorded, naming the keys."""
    from datm import models
    from datm.eval.engines import kind_of
    from datm.merge.select import auto_merges, chosen_with, dev_settings

    made = []
    for m in auto_merges(cfg, plan):
        if chosen_with(run, m) is not None:
            asked = dev_settings(cfg, models.resolve(cfg.base_model))
            made.append((run.merged(m), "merge chosen on dev translations", chosen_with(run, m), asked))
    merges = [m.name for m in plan.merges]
    for d, module in plan.routes.items():
        files = run.translations(d)
        if files.hyp.is_file() and files.info.is_file():
            info = artifacts.read_json(files.info)
            modules = {} if module == BASE else {module: run.module(module, merges)}
            asked = test_settings(cfg, models.resolve(cfg.base_model), kind_of(module, modules))
            made.append((files.hyp, "translation", info.get("settings"), asked))
    for path, what, was, asked in made:
        was = was or {}  # {}: made before datm recorded its settings
        diff = _differences(was, asked)
        if diff:
            made_with = ", ".join(f"{k}={was[k]!r}" for k in diff)
            asks = ", ".join(f"{k}={asked[k]!r}" for k in diff)
            raise ConfigError(
                f"{path}: a finished {what}, made with {made_with}; this config asks for {asks}. Finished "
                "artifacts are never remade nor scored under other settings: set those back, or use a new "
                "output_dir (or delete it to make it again)"
            )


def print_scores(scores: RunScores) -> None:
    """The score table: `run`'s result, printed (not logged: `--quiet` keeps it)."""
    print(f"\n{'direction':<10} {'BLEU':>7} {'chrF++':>7}")
    for d, s in scores.directions.items():
        print(f"{d:<10} {s.bleu:>7.2f} {s.chrf:>7.2f}")
    for fam, a in scores.averages.items():
        print(f"{'avg ' + fam:<10} {a['bleu']:>7.2f} {a['chrf']:>7.2f}")


def run(
    cfg: Config, executor: str | None = None, address: str | None = None, only: str | None = None
) -> RunScores | None:
    """Every task of the config's plan (or, with `only`, one task), on the chosen executor: the
    run's scores (None for `only`, and on the processes of a launch other than the main one)."""
    from datm.run.executors import EXECUTORS, REQUIREMENTS

    name = executor or cfg.executor
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r}: expected one of {sorted(EXECUTORS)}")
    if name in REQUIREMENTS and only is None:
        REQUIREMENTS[name]()
    if cfg.eval.comet is not None:
        from datm.eval import comet

        comet.check(cfg.eval.comet)  # COMET's environment and model, before hours of training
    run_dir, plan = _start(cfg)
    if only is None:
        preflight.check_data(cfg, plan, run_dir.root)  # every file it reads, before any model loads
        preflight.check_engine(cfg)  # eval.engine: vllm where vLLM cannot run the model, before training
    tasks = build_tasks(plan, run_dir)
    if only is not None:
        run_one(cfg, plan, tasks, only)
        return None
    if _is_main_process():
        log.info(format_plan(plan))
    if _num_processes() > 1:  # `accelerate launch`: every process trains; the main one does the rest
        if name != "local":
            raise ConfigError(f"executor {name!r} cannot run under accelerate launch; use executor local")
        _train_all_processes(cfg, plan, [t for t in tasks if t.kind == "train"])
        if not _is_main_process():
            return None
        tasks = [t for t in tasks if t.kind != "train"]
    EXECUTORS[name](cfg, plan, tasks, address=address)
    scores = RunScores.from_json(artifacts.read_json(run_dir.scores), run_dir.scores)
    print_scores(scores)
    print(f"\nresults: {run_dir.scores}   report: {run_dir.report}")
    return scores


def run_one(cfg: Config, plan: Plan, tasks: list[Task], task_id: str) -> str:
    """One task, here (what a SLURM array line runs); everything it needs must be done."""
    by_id = {t.id: t for t in tasks}
    if task_id not in by_id:
        some = ", ".join(t.id for t in tasks[:4])
        raise ConfigError(f"--only {task_id!r}: no such task in this plan (e.g. {some}; `datm tasks CONFIG`)")
    task = by_id[task_id]
    run_dir = RunDir(cfg.output_dir)
    missing = [d for d in task.deps if not is_done(run_dir, by_id[d])]
    if missing:
        raise ConfigError(f"--only {task_id}: needs {missing}, not done yet; run those tasks first")
    return execute(cfg, plan, task, Worker(cfg))


def _train_all_processes(cfg: Config, plan: Plan, tasks: list[Task]) -> None:
    """Data-parallel training: the main process claims each adapter, then all processes train it
    together (or all skip it, when it turned out done)."""
    from datm.train import process_state

    state = process_state()
    run_dir = RunDir(cfg.output_dir)
    worker = Worker(cfg)
    with state.main_process_first():
        worker.model_path  # noqa: B018 (resolving may convert a GGUF model once, on the main process)
    for t in tasks:
        held = artifacts.claim(run_dir.claim(t.id), t.id) if state.is_main_process else None
        state.wait_for_everyone()
        try:
            if not is_done(run_dir, t):
                BODIES[t.kind](cfg, plan, run_dir, t, worker)
            elif state.is_main_process:
                log.info(f"{t.id}: done, reused")
        finally:
            if held is not None:
                held.release()


def _start(cfg: Config) -> tuple[RunDir, Plan]:
    """Probe (auto) and plan. Under a multi-process launch the main process goes first, so that it
    alone writes (probe, plan.json, config.json) and the others find those written."""
    from datm.train import process_state

    with process_state().main_process_first():
        if auto.needs_measurements(cfg):  # strategy auto: the pilot (or the probe) first
            preflight.check_auto_data(cfg)  # every file the measurement and the run after it read
            auto.measure(cfg, run)
        run_dir, plan = _prepare(cfg)
        auto.hand_over(cfg, plan)  # full_pilot: the pilot's adapters are the run's
        return run_dir, plan


def _num_processes() -> int:
    from datm.train import process_state

    return int(process_state().num_processes)


def _is_main_process() -> bool:
    from datm.train import process_state

    return bool(process_state().is_main_process)


def train_only(cfg: Config, only: list[str] | None = None) -> None:
    from datm.run.executors import run_local

    run_dir, plan = _start(cfg)
    unknown = sorted(set(only or []) - {a.name for a in plan.adapters})
    if unknown:
        raise ConfigError(
            f"--adapter {unknown}: not in the plan; adapters are {[a.name for a in plan.adapters]}"
        )
    preflight.check_data(cfg, plan, run_dir.root, test=False)
    tasks = [t for t in build_tasks(plan, run_dir) if t.kind == "train" and (not only or t.name in only)]
    if _num_processes() > 1:
        _train_all_processes(cfg, plan, tasks)
    else:
        run_local(cfg, plan, tasks)


__all__ = ["BASE", "run", "run_one", "train_only"]
