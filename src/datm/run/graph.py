"""The task graph of a plan: which tasks, what each needs and writes, and where each stands."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from datm import artifacts
from datm.artifacts import RunDir
from datm.config import names
from datm.plan import BASE, Plan


@dataclass(frozen=True)
class Task:
    kind: str  # one of KINDS
    name: str  # the adapter, merge or direction; "" for score and report
    deps: tuple[str, ...]  # ids of the tasks whose outputs this one reads
    outputs: tuple[str, ...]  # paths relative to the run directory

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self), "deps": list(self.deps), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Kind:
    """A kind of task: how to tell that its artifact is complete on disk (whoever built it), and
    whether it runs again on every `datm run` (cheap; eval settings may have changed since)."""

    done: Callable[[RunDir, Task], bool]
    always_run: bool = False


def _output_written(run: RunDir, task: Task) -> bool:
    return (run.root / task.outputs[0]).is_file()


# In the order a single process runs them.
KINDS: dict[str, Kind] = {
    "train": Kind(lambda run, t: artifacts.is_done(run.adapter(t.name))),
    "merge": Kind(lambda run, t: artifacts.is_done(run.merged(t.name))),
    "translate": Kind(lambda run, t: run.translations(t.name).hyp.is_file()),  # written last
    "score": Kind(_output_written, always_run=True),
    "report": Kind(_output_written, always_run=True),
}
names.check_registry("task kind", names.TASK_KINDS, KINDS)
ALWAYS_RUN = frozenset(k for k, kind in KINDS.items() if kind.always_run)


def _rel(run: RunDir, path: Any) -> str:
    return str(path.relative_to(run.root))


def build_tasks(plan: Plan, run: RunDir) -> list[Task]:
    """Every task of a plan, dependencies first."""
    merges = [m.name for m in plan.merges]
    builder = {a.name: f"train:{a.name}" for a in plan.adapters} | {m: f"merge:{m}" for m in merges}
    tasks = [Task("train", a.name, (), (_rel(run, run.adapter(a.name)),)) for a in plan.adapters]
    tasks += [
        Task("merge", m.name, tuple(f"train:{s}" for s in m.sources), (_rel(run, run.merged(m.name)),))
        for m in plan.merges
    ]
    translations = []
    for d, module in plan.routes.items():
        files = run.translations(d)
        deps = () if module == BASE else (builder[module],)
        translations.append(
            Task("translate", d, deps, tuple(_rel(run, f) for f in (files.src, files.ref, files.hyp)))
        )
    tasks += translations
    tasks.append(Task("score", "", tuple(t.id for t in translations), (_rel(run, run.scores),)))
    tasks.append(Task("report", "", ("score",), (_rel(run, run.report),)))
    return tasks


def is_done(run: RunDir, task: Task) -> bool:
    """Whether a task's artifact is complete on disk (whoever built it)."""
    return KINDS[task.kind].done(run, task)


def task_status(run: RunDir, tasks: list[Task]) -> list[dict[str, Any]]:
    """Each task with its status: done, running (a live holder claims it, named in `holder`) or
    waiting (`ready` when everything it needs is done)."""
    done = {t.id: is_done(run, t) for t in tasks}
    out = []
    for t in tasks:
        row = t.to_dict()
        holder = artifacts.holder(run.claim(t.id))
        if holder is not None:
            row["status"], row["holder"] = "running", artifacts.describe_holder(holder)
        else:
            row["status"] = "done" if done[t.id] else "waiting"
        row["ready"] = all(done[d] for d in t.deps)
        out.append(row)
    return out


def format_status(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<28} {'status':<8} needs"]
    for r in rows:
        status = r["status"] if r["status"] != "waiting" or not r["ready"] else "ready"
        needs = ", ".join(r["deps"]) if len(r["deps"]) <= 3 else f"{len(r['deps'])} tasks"
        extra = f"   (by {r['holder']})" if r.get("holder") else ""
        lines.append(f"{r['id']:<28} {status:<8} {needs or '-'}{extra}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "waiting")}
    lines.append("")
    lines.append(f"{len(rows)} tasks: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
