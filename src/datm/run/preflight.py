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
    if train:
        check_merge_dev(cfg, plan)


def _pair_key(p: data.Pair) -> tuple[tuple[str, str], ...]:
    """A segment pair as a set of (language, text): the same pair read in either direction."""
    return tuple(sorted(((p.src_lang, p.src.strip()), (p.tgt_lang, p.tgt.strip()))))


def check_dev_not_test(cfg: Config, dev: dict[str, list[data.Pair]], who: str) -> None:
    """Refuse dev pairs that are pairs of the test split, in either direction: the same files (whatever
    the patterns look like), the same split of a dataset, or a copy. The test split never decides."""
    if not cfg.data.test:
        return
    test: dict[tuple[tuple[str, str], ...], str] = {}
    for d in L.directions_for(cfg.languages):
        fmt, split = eval_split(cfg, cfg.data.test, d)
        pairs = data.read_direction(
            cfg.data.test, d, fmt, cfg.data.on_bad_record, None, split, allow_reverse=False
        )
        for p in pairs:
            test.setdefault(_pair_key(p), p.origin)
    for direction, pairs in dev.items():
        overlap = [(p.origin, test[_pair_key(p)]) for p in pairs if _pair_key(p) in test]
        if overlap:
            dev_at, test_at = overlap[0]
            raise ConfigError(
                f"{cfg.source}: data.valid: {len(overlap)} of the {len(pairs)} dev pairs of {direction} that "
                f"{who} would decide on are pairs of the test split (data.test), e.g. {dev_at} is "
                f"{test_at}; the test split never decides anything: give data.valid a dev set apart from it"
            )


def check_merge_dev(cfg: Config, plan: Plan) -> None:
    """`merge: auto` chooses on data.valid where a direction has it: never on test pairs."""
    from datm.merge import select as merge_select

    dev = {
        d: merge_select.dev_pairs(cfg, L.Direction.parse(d))[1]
        for directions in merge_select.auto_merges(cfg, plan).values()
        for d in directions
        if merge_select.has_valid(cfg, L.Direction.parse(d))
    }
    check_dev_not_test(cfg, dev, "merge: auto")


def check_auto_data(cfg: Config) -> None:
    """Before `auto` measures: every file the measurement and the run after it may read (any
    direction may be trained; every direction is scored; the pilot scores the dev split)."""
    directions = list(L.directions_for(cfg.languages))
    check_train(cfg, [str(d) for d in directions])
    check_eval(cfg, directions, cfg.data.test)
    if cfg.auto.source == "pilot":
        from datm.auto.pilot import pilot_config

        dev = pilot_config(cfg, "separate")  # reads data.valid as its test split
        check_eval(dev, directions, dev.data.test, key="valid")
        pairs = {}
        for d in directions:
            fmt, split = eval_split(dev, dev.data.test, d)
            on_bad = cfg.data.on_bad_record
            got = data.read_direction(dev.data.test, d, fmt, on_bad, None, split, allow_reverse=False)
            pairs[str(d)] = got
        check_dev_not_test(cfg, pairs, "the pilot")


__all__ = [
    "check_auto_data",
    "check_data",
    "check_dev_not_test",
    "check_eval",
    "check_merge_dev",
    "check_train",
    "eval_split",
]


def check_engine(cfg: Config) -> None:
    """`eval.engine: vllm` on a machine or model vLLM cannot run: an error before any training (auto
    falls back to transformers when it translates, and says why)."""
    if cfg.eval.engine != "vllm":
        return
    from datm import models
    from datm.eval.engines import vllm_unsupported

    why = vllm_unsupported(models.resolve(cfg.base_model))
    if why is not None:
        raise ConfigError(
            f"{cfg.source}: eval.engine: vllm, but {why}; set eval.engine to auto or transformers"
        )
