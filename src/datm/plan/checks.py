"""Checks of a config that need its plan, run once by the one plan builder (`datm.auto.build_plan`)."""

from __future__ import annotations

from datm.config import Config, ConfigError, check_merge_weights
from datm.plan.strategies import Plan


def validate(cfg: Config, plan: Plan) -> None:
    """One merge weight per source of every merge; no training without a budget (the config's check
    of `train` knows the strategies that train nothing: the plan must agree)."""
    if plan.adapters and cfg.train.steps is None and cfg.train.epochs is None:
        raise ConfigError(
            f"{cfg.source}: train: the {plan.strategy} plan trains adapters: give 'steps' or 'epochs'"
        )
    check_merge_weights(cfg, {m.name: len(m.sources) for m in plan.merges})
