"""`RunView`: the one reader of a run directory — its plan, its config (typed), the modules its routes
name, its scores and its translations. `datm translate`, `datm serve`, `datm export`, the report and
the analysis read runs through it; the layout itself is `datm.artifacts.RunDir`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from datm import artifacts
from datm import config as C
from datm.artifacts import RunDir
from datm.errors import DatmError
from datm.eval.engines import lora_rank
from datm.eval.results import ResultsError, RunScores
from datm.merge.base import ADAPTER_CONFIG, DELTA_CONFIG, MERGE_INFO, MergeError
from datm.merge.forms import DELTA, LORA, applied_as
from datm.plan import BASE, Plan


class RunError(DatmError):
    """A run directory that is not what a command needs (missing, unfinished, unreadable)."""


@dataclass(frozen=True)
class RunModule:
    """One module the plan routes to."""

    name: str
    path: Path
    kind: str  # how it is applied: merge.forms.LORA (a PEFT LoRA directory) or DELTA (dense/sparse)
    merged: bool  # made by a merge (else a trained adapter)
    directions: tuple[str, ...]

    def config(self) -> dict[str, Any]:
        return artifacts.read_json(self.path / (ADAPTER_CONFIG if self.kind == LORA else DELTA_CONFIG))

    @property
    def form(self) -> str:
        """'adapter' for a trained LoRA, else the merge form (lowrank, factor, dense, sparse)."""
        if not self.merged:
            return "adapter"
        if self.kind == DELTA:
            return str(self.config().get("form", DELTA))
        info = self.path / MERGE_INFO
        return str(artifacts.read_json(info).get("form", "lowrank")) if info.is_file() else "lowrank"

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer (vLLM's max_lora_rank must cover it)."""
        return lora_rank(self.path)


class RunView:
    """A run directory as its readers see it. `RunView.open` is a finished datm run (plan.json and
    config.json there); `RunView(path)` also reads partial runs (translations only, or scores)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = RunDir(self.root)

    @classmethod
    def open(cls, run_dir: str | Path) -> RunView:
        view = cls(run_dir)
        for file in (view.dir.plan, view.dir.config):
            if not file.is_file():
                raise RunError(f"{file} not found: is {view.root} a datm run directory?")
        return view

    @cached_property
    def plan(self) -> Plan | None:
        """The run's plan (None for a directory without plan.json)."""
        raw = self.recorded("plan")
        if raw is None:
            return None
        try:
            return Plan.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{self.dir.plan}: not a datm plan ({type(e).__name__}: {e})") from None

    def recorded(self, name: str) -> dict[str, Any] | None:
        """plan.json or config.json as written (None before the run wrote it): what `datm run` holds a
        resumed run to. Every reader of these files goes through here."""
        path = {"plan": self.dir.plan, "config": self.dir.config}[name]
        return artifacts.read_json(path) if path.is_file() else None

    @cached_property
    def config(self) -> C.Config:
        """The config the run was made with, typed (config.json: every key, paths resolved)."""
        raw = self.recorded("config")
        if raw is None:
            raise RunError(f"{self.dir.config} not found: is {self.root} a datm run directory?")
        return C.from_dict(raw, source=str(self.dir.config))

    def routed_plan(self) -> Plan:
        if self.plan is None:
            raise RunError(f"{self.dir.plan} not found: is {self.root} a datm run directory?")
        return self.plan

    @cached_property
    def modules(self) -> dict[str, RunModule]:
        """The modules the plan routes to, in plan order; each must be finished."""
        plan = self.routed_plan()
        merges = [m.name for m in plan.merges]
        out = {}
        for name in plan.shipped:
            path = self.dir.module(name, merges)
            if not artifacts.is_done(path):
                raise RunError(f"module {name} is not finished at {path}; run `datm run` first")
            try:
                kind = applied_as(path)
            except MergeError as e:
                raise RunError(str(e)) from None
            served = tuple(d for d, m in plan.routes.items() if m == name)
            out[name] = RunModule(name, path, kind, plan.kind(name) == "merge", served)
        return out

    def module_for(self, direction: object) -> RunModule | None:
        """The module serving a direction (None: the base model); KeyError if the run doesn't route it."""
        name = self.routed_plan().routes[str(direction)]
        return None if name == BASE else self.modules[name]

    def base_model(self) -> str:
        """The base model as a directory or hub id (converting the embedded GGUF once if needed)."""
        from datm import models

        return models.resolve(self.config.base_model)

    def scores(self) -> RunScores:
        path = self.dir.scores
        if not path.is_file():
            raise RunError(f"{self.root}: no scores.json (expected {path}); score the run first")
        try:
            return RunScores.from_json(artifacts.read_json(path), path)
        except ResultsError as e:
            raise RunError(str(e)) from None
