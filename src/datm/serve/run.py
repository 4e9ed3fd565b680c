"""A run directory as served: its routes, and what each routed module is (LoRA or weight delta)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datm.analysis.view import RunModule, RunView
from datm.config import Config, EvalConfig
from datm.errors import DatmError
from datm.languages import Direction
from datm.merge.forms import DELTA, LORA
from datm.plan import Plan


class ServeError(DatmError):
    """A run that cannot be served (or exported) as asked; the message says what to do."""


@dataclass
class ServedRun:
    """A finished run as served: the run (`RunView`) with what serving asks of it."""

    view: RunView

    @classmethod
    def load(cls, run_dir: str | Path) -> ServedRun:
        view = RunView.open(run_dir)
        _ = view.modules  # every routed module finished and recognised, before anything loads
        return cls(view)

    @property
    def run_dir(self) -> Path:
        return self.view.root

    @property
    def plan(self) -> Plan:
        return self.view.routed_plan()

    @property
    def config(self) -> Config:
        return self.view.config

    @property
    def modules(self) -> dict[str, RunModule]:
        return self.view.modules

    @property
    def routes(self) -> dict[str, str]:
        """'src-tgt' -> module name or BASE: the plan's routes, exactly what `datm translate` uses."""
        return self.plan.routes

    @property
    def prompt_style(self) -> str:
        return self.config.prompt

    @property
    def eval(self) -> EvalConfig:
        return self.config.eval

    def scored_decoding(self) -> dict[str, int]:
        """The decoding settings the run's scored translations were made with (`datm translate`'s too)."""
        return {"beams": self.eval.beams, "max_new_tokens": self.eval.max_new_tokens}

    def base_model(self) -> str:
        """The base model as a directory or hub id (converting the embedded GGUF once if needed)."""
        return self.view.base_model()

    def module_for(self, direction: Direction | str) -> RunModule | None:
        """The module serving a direction (None: the base model); KeyError if the run doesn't serve it."""
        return self.view.module_for(direction)

    def deltas(self) -> list[RunModule]:
        return [m for m in self.modules.values() if m.kind == DELTA]

    def loras(self) -> list[RunModule]:
        return [m for m in self.modules.values() if m.kind == LORA]

    def directions(self) -> list[dict[str, Any]]:
        """Every served direction with its module and the module's kind (for GET /v1/directions)."""
        out = []
        for d, name in self.routes.items():
            m = self.modules.get(name)
            out.append(
                {
                    "direction": d,
                    "source": Direction.parse(d).src,
                    "target": Direction.parse(d).tgt,
                    "module": m.name if m else None,
                    "kind": m.kind if m else "base",
                    "form": m.form if m else None,
                }
            )
        return out
