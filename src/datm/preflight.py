"""Pre-flight: every data file the remaining work reads exists and is readable, before a model
loads (loading a base model can take minutes; a missing file should not wait for it)."""

from __future__ import annotations

from pathlib import Path

from datm import artifacts, data
from datm import languages as L
from datm.config import Config, ConfigError
from datm.plan import Plan


def eval_split(cfg: Config, pattern: str, direction: L.Direction) -> tuple[str, str]:
    """The format and split a test pattern is read with."""
    fmt = cfg.data.format
    if fmt == "auto":
        fmt = data.detect_format(data.pattern_path(pattern, direction))
    return fmt, cfg.data.test_split or ("devtest" if fmt == "flores" else "test")


def check_train(cfg: Config, directions: list[str]) -> None:
    """Training files (a direction may read its reverse direction's file: one file, both ways)."""
    if not directions:
        return
    if not cfg.data.train:
        raise ConfigError(f"{cfg.source}: data.train is required to train adapters")
    for d in dict.fromkeys(directions):
        data.check_readable(cfg.data.train, L.Direction.parse(d), cfg.data.format, split="train")


def check_eval(cfg: Config, directions: list[L.Direction], pattern: str | None, key: str = "test") -> None:
    """Evaluation files: never the reverse direction's set."""
    if not directions:
        return
    if not pattern:
        raise ConfigError(f"{cfg.source}: data.{key} is required to evaluate")
    for d in directions:
        fmt, split = eval_split(cfg, pattern, d)
        data.check_readable(pattern, d, fmt, allow_reverse=False, split=split)


def check_data(cfg: Config, plan: Plan, out: Path, train: bool = True, test: bool = True) -> None:
    """Training files of every adapter not yet trained; test files of every direction not yet
    translated."""
    run = artifacts.RunDir(out)
    if train:
        todo = [a for a in plan.adapters if not artifacts.is_done(run.adapter(a.name))]
        check_train(cfg, [d for a in todo for d in a.directions])
    if test:
        todo = [d for d in plan.directions() if not run.translations(d).hyp.is_file()]
        check_eval(cfg, todo, cfg.data.test)


def check_auto_data(cfg: Config) -> None:
    """Before `auto` measures: every file the measurement and the run after it may read (any
    direction may be trained; every direction is scored; the pilot scores the dev split)."""
    directions = list(L.directions_for(cfg.languages))
    check_train(cfg, [str(d) for d in directions])
    check_eval(cfg, directions, cfg.data.test)
    if cfg.auto.source == "pilot":
        from datm.pilot import pilot_config

        dev = pilot_config(cfg, "separate")  # reads data.valid as its test split
        check_eval(dev, directions, dev.data.test, key="valid")


__all__ = ["check_auto_data", "check_data", "check_eval", "check_train", "eval_split"]
