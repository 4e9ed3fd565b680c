"""Executors: who runs a plan's tasks, and where.

- `local`: this process, in dependency order (today's `datm run`). A task another process has
  claimed is skipped for now and come back to, so concurrent runs on one output_dir split the work.
- `ray`: every task is a Ray task with the resources its kind asks for (`resources:` in the config),
  submitted with its dependencies, retried when its worker dies, its progress printed here.
  Without an address it starts a Ray cluster on this machine; with one it joins that cluster (every
  node must see the output_dir and the data at the same paths, e.g. on a shared filesystem).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from datm.artifacts import RunDir, describe_holder, holder
from datm.config import Config, names
from datm.errors import DatmError
from datm.eval.worker import Worker
from datm.log import configured_level, get_logger
from datm.log import setup as setup_logging
from datm.plan import Plan
from datm.run.bodies import execute
from datm.run.graph import Task, build_tasks, is_done

log = get_logger(__name__)

DEFAULT_RESOURCES: dict[str, float] = {"num_cpus": 1}
DEFAULT_MAX_RETRIES = 3  # for a task whose worker died (killed, out of memory, node lost)


class TaskFailed(DatmError):
    pass


def run_local(
    cfg: Config, plan: Plan, tasks: list[Task], address: str | None = None, poll: float = 1.0
) -> None:
    """Run the tasks here, in order; tasks claimed by other processes are done last (or waited for).
    A task starts once what it needs is done, here or by anyone else (`tasks` may be part of the
    plan's graph)."""
    if address:
        raise DatmError("--address is for the ray executor; the local executor runs in this process")
    run = RunDir(cfg.output_dir)
    graph = {t.id: t for t in build_tasks(plan, run)}
    worker = Worker(cfg)
    try:
        _run_here(cfg, plan, tasks, run, graph, worker, poll)
    finally:
        worker.close()  # vLLM's engine processes stop with the run


def _run_here(
    cfg: Config,
    plan: Plan,
    tasks: list[Task],
    run: RunDir,
    graph: dict[str, Task],
    worker: Worker,
    poll: float,
) -> None:
    """The local executor's loop: each task once what it needs is done; others' claims waited out."""
    pending = list(tasks)
    told: set[str] = set()
    while pending:
        for t in pending:
            if not all(is_done(run, graph[d]) for d in t.deps):
                continue
            if execute(cfg, plan, t, worker, wait=False) != "busy":
                pending.remove(t)
                break
            if t.id not in told:
                log.info(
                    f"{t.id}: claimed by {describe_holder(holder(run.claim(t.id)))}; doing other tasks first"
                )
                told.add(t.id)
        else:
            # Holders first, then readiness: a holder that finishes between the two has published its
            # artifact before releasing its claim, so the second look sees the task it unblocked.
            running = any(holder(run.claim(t)) is not None for t in graph)
            ready = any(all(is_done(run, graph[d]) for d in t.deps) for t in pending)
            if not running and not ready:
                raise TaskFailed(f"no task can start and none is running: {[t.id for t in pending]}")
            time.sleep(poll)


def worker_threads() -> int:
    """Torch threads for this Ray worker: one per CPU it was given."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(cpus))


_WORKER: Worker | None = None


def ray_task(
    cfg: Config, plan: Plan, task: Task, *needs: Any, log_level: int | None = None
) -> dict[str, Any]:
    """One task in a Ray worker (`needs`: the results of its dependencies, only waited for).
    The worker process keeps its base model for the next task it runs. `log_level`: the driver's
    (`datm.log.setup`), so that the worker's messages reach the driver's output as they did."""
    import torch

    global _WORKER
    if log_level is not None:
        setup_logging(log_level)
    torch.set_num_threads(worker_threads())
    if _WORKER is None or not _WORKER.serves(cfg):
        _WORKER = Worker(cfg, progress=False)
    t0 = time.perf_counter()
    outcome = execute(cfg, plan, task, _WORKER)
    return {
        "task": task.id,
        "outcome": outcome,
        "seconds": round(time.perf_counter() - t0, 2),
        "where": f"{socket.gethostname()}:{os.getpid()}",
        "threads": torch.get_num_threads(),
    }


def ray_options(cfg: Config, kind: str) -> dict[str, Any]:
    res = {**DEFAULT_RESOURCES, **cfg.resources.get(kind, {})}
    retries = int(res.pop("max_retries", DEFAULT_MAX_RETRIES))
    return {**res, "max_retries": retries, "retry_exceptions": False}


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise DatmError("executor ray needs Ray: pip install 'datm[ray]'") from None
    return ray


def run_ray(cfg: Config, plan: Plan, tasks: list[Task], address: str | None = None) -> None:
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        ray.init(
            address=address,
            num_cpus=None if address else os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            logging_level="WARNING",
        )
    run = RunDir(cfg.output_dir)
    remote = ray.remote(ray_task)
    refs: dict[str, Any] = {}
    for t in tasks:  # dependencies first: the refs a task needs already exist
        if t.kind not in ("score", "report") and is_done(run, t):
            log.info(f"{t.id}: done, reused")
            continue
        needs = [refs[d] for d in t.deps if d in refs]
        options = remote.options(name=t.id, **ray_options(cfg, t.kind))
        refs[t.id] = options.remote(cfg, plan, t, *needs, log_level=configured_level())
    log.info(f"ray: {len(refs)} tasks submitted to {ray.cluster_resources()}")
    task_of = {r: i for i, r in refs.items()}
    remaining = list(refs.values())
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                raise TaskFailed(
                    f"task {task_of[ready[0]]} failed: {getattr(e, 'cause', None) or e}"
                ) from None
            done = len(refs) - len(remaining)
            how = f"{res['outcome']} in {res['seconds']} s on {res['where']}"
            log.info(f"[{done}/{len(refs)}] {res['task']}: {how}")
    except BaseException:
        for r in remaining:
            ray.cancel(r, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


EXECUTORS: dict[str, Callable[..., None]] = {"local": run_local, "ray": run_ray}
names.check_registry("executor", names.EXECUTORS, EXECUTORS)
# What each executor needs installed, checked before any work starts.
REQUIREMENTS: dict[str, Callable[[], Any]] = {"ray": ray_module}
