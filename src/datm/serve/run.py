"""A run directory as served: its routes, and what each routed module is (LoRA or weight delta)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datm import artifacts
from datm.errors import DatmError
from datm.languages import Direction
from datm.plan import BASE, Plan


class ServeError(DatmError):
    """A run that cannot be served (or exported) as asked; the message says what to do."""


@dataclass(frozen=True)
class Module:
    """One module the plan routes to."""

    name: str
    path: Path
    kind: str  # "lora" (a PEFT LoRA directory) or "delta" (merge form dense/sparse)
    merged: bool  # made by a merge (else a trained adapter)
    directions: tuple[str, ...]

    def config(self) -> dict[str, Any]:
        name = "adapter_config.json" if self.kind == "lora" else "delta_config.json"
        return artifacts.read_json(self.path / name)

    @property
    def form(self) -> str:
        """'adapter' for a trained LoRA, else the merge form (lowrank, factor, dense, sparse)."""
        if not self.merged:
            return "adapter"
        if self.kind == "delta":
            return str(self.config().get("form", "delta"))
        info = self.path / "merge_info.json"
        return str(artifacts.read_json(info).get("form", "lowrank")) if info.is_file() else "lowrank"

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer (vLLM's max_lora_rank must cover it)."""
        cfg = self.config()
        return max([int(cfg["r"])] + [int(r) for r in (cfg.get("rank_pattern") or {}).values()])


@dataclass
class ServedRun:
    run_dir: Path
    plan: Plan
    config: dict[str, Any]
    modules: dict[str, Module]  # the routed modules, in plan order

    @classmethod
    def load(cls, run_dir: str | Path) -> ServedRun:
        from datm.artifacts import RunDir
        from datm.eval.translate import module_kind
        from datm.run.bodies import module_dirs

        run_dir = Path(run_dir)
        run = RunDir(run_dir)
        for file in (run.plan, run.config):
            if not file.is_file():
                raise ServeError(f"{file} not found: is {run_dir} a datm run directory?")
        plan = Plan.from_dict(artifacts.read_json(run.plan))
        config = artifacts.read_json(run.config)
        modules = {}
        for name, path in module_dirs(plan, run).items():
            if not artifacts.is_done(path):
                raise ServeError(f"module {name} is not finished at {path}; run `datm run` first")
            try:
                kind = module_kind(path)
            except ValueError as e:
                raise ServeError(str(e)) from None
            served = tuple(d for d, m in plan.routes.items() if m == name)
            modules[name] = Module(name, path, kind, plan.kind(name) == "merge", served)
        return cls(run_dir, plan, config, modules)

    @property
    def routes(self) -> dict[str, str]:
        """'src-tgt' -> module name or BASE: the plan's routes, exactly what `datm translate` uses."""
        return self.plan.routes

    @property
    def prompt_style(self) -> str:
        return str(self.config.get("prompt", "alma"))

    @property
    def eval(self) -> dict[str, Any]:
        return dict(self.config.get("eval") or {})

    def scored_decoding(self) -> dict[str, int]:
        """The decoding settings the run's scored translations were made with (`datm translate`'s too)."""
        ev = self.eval
        return {"beams": int(ev.get("beams", 1)), "max_new_tokens": int(ev.get("max_new_tokens", 128))}

    def base_model(self) -> str:
        """The base model as a directory or hub id (converting the embedded GGUF once if needed)."""
        from datm import models

        return models.resolve(self.config.get("base_model"))

    def module_for(self, direction: Direction | str) -> Module | None:
        """The module serving a direction (None: the base model); KeyError if the run doesn't serve it."""
        name = self.routes[str(direction)]
        return None if name == BASE else self.modules[name]

    def deltas(self) -> list[Module]:
        return [m for m in self.modules.values() if m.kind == "delta"]

    def loras(self) -> list[Module]:
        return [m for m in self.modules.values() if m.kind == "lora"]

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


def context_length(model_path: str) -> int:
    """Tokens the base model attends over (prompt + generated)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        raise ServeError(f"{model_path}: config.json has no max_position_embeddings; cannot bound prompts")
    return n
