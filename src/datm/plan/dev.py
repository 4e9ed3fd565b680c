"""Which directions of a run decide something on dev data (`datm.data.dev` says where those dev
pairs come from, and holds the pairs without `data.valid` out of every training of the run)."""

from __future__ import annotations

from datm.config import Config, names
from datm.languages import directions_for
from datm.plan.strategies import Plan


def uses_pilot(cfg: Config) -> bool:
    """Whether the run (or, for a pilot run, the run it pilots) is decided by auto's pilot."""
    return cfg.data.eval_on == "dev" or (cfg.strategy == "auto" and cfg.auto.source in names.PILOT_SOURCES)


def dev_directions(cfg: Config, plan: Plan) -> list[str]:
    """The directions whose dev pairs the run decides on: every direction where auto's pilot
    scores them (the pilot's runs, and the run they decide), and those of merges chosen on the dev
    set (`merge: auto`)."""
    if uses_pilot(cfg):
        return [str(d) for d in directions_for(cfg.languages)]
    return [
        d
        for m in plan.merges
        if m.method == names.MERGE_AUTO
        for d, mod in plan.routes.items()
        if mod == m.name
    ]


__all__ = ["dev_directions", "uses_pilot"]
