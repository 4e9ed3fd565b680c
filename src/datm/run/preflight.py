"""Pre-flight: every data file the remaining work reads exists and is readable, before a model
loads (loading a base model can take minutes; a missing file should not wait for it)."""

from __future__ import annotations

from pathlib import Path

from datm import artifacts, data
from datm import languages as L
from datm.config import Config, ConfigError, names
from datm.data import dev
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
        if cfg.data.eval_on == "dev":
            check_dev(cfg, todo)
        else:
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


def check_dev(cfg: Config, directions: list[L.Direction]) -> None:
    """Dev files: data.valid where a direction has it, else the training file it holds pairs out of."""
    rule = cfg.dev_rule()
    with_valid = [d for d in directions if dev.has_valid(rule, d)]
    check_eval(cfg, with_valid, cfg.data.valid, key="valid")
    held = [d for d in directions if d not in with_valid]
    check_train(cfg, [str(d) for d in held])
    for d in held:  # enough training pairs to hold data.valid_holdout out
        dev.held_out(rule, d)


def dev_sets(cfg: Config, directions: list[str]) -> dict[str, list[data.Pair]]:
    """The data.valid pairs of these directions (`datm.data.dev`), for `check_dev_not_test` (held-out
    dev pairs are training pairs: the run's training data, not a dev set someone chose)."""
    rule = cfg.dev_rule()
    parsed = [L.Direction.parse(d) for d in directions]
    return {str(d): dev.dev_pairs(rule, d)[1] for d in parsed if dev.has_valid(rule, d)}


def check_merge_dev(cfg: Config, plan: Plan) -> None:
    """`merge: auto` chooses on dev pairs: never on test pairs."""
    from datm.merge import select as merge_select

    directions = [d for ds in merge_select.auto_merges(cfg, plan).values() for d in ds]
    check_dev_not_test(cfg, dev_sets(cfg, directions), "merge: auto")


def check_auto_data(cfg: Config) -> None:
    """Before `auto` measures: every file the measurement and the run after it may read (any
    direction may be trained; every direction is scored; the pilot scores the dev pairs)."""
    directions = list(L.directions_for(cfg.languages))
    check_train(cfg, [str(d) for d in directions])
    check_eval(cfg, directions, cfg.data.test)
    if cfg.auto.source in names.PILOT_SOURCES:
        check_dev(cfg, directions)
        check_dev_not_test(cfg, dev_sets(cfg, [str(d) for d in directions]), "the pilot")


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


__all__ = [
    "check_auto_data",
    "check_data",
    "check_dev",
    "check_dev_not_test",
    "check_engine",
    "check_eval",
    "check_merge_dev",
    "check_train",
    "eval_split",
]
