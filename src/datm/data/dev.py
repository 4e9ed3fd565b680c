"""Dev data for every direction: the one rule that `auto`'s pilot and `merge: auto` decide on.

A direction's dev pairs are `data.valid`'s where it has them (a file of its own, or of its reverse
direction for a `{src}-{tgt}` pattern; every direction of FLORES or a datasets split); otherwise
`data.valid_holdout` of its training pairs, a seeded sample that every training of the run skips
(`held_out_origins`, in both directions of their file: a `{xx}` file's de-en and en-de hold out the
same lines). The test split never decides anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from datm import languages as L
from datm.data.records import DataError, Pair, detect_format, dev_split, pattern_path, read_direction

VALID = "valid"
HELD_OUT = "held-out"


@dataclass(frozen=True)
class DevRule:
    """What a config says about dev data (`Config.dev_rule()`)."""

    valid: str | None  # data.valid
    train: str | None  # data.train: where held-out pairs come from
    format: str  # data.format
    on_bad: str  # data.on_bad_record
    holdout: int  # data.valid_holdout: training pairs held out per direction without data.valid
    seed: int  # train.seed: which pairs are held out
    source: str  # the config file, for messages

    def format_of(self, path: str) -> str:
        return self.format if self.format != "auto" else detect_format(path)


def has_valid(rule: DevRule, direction: L.Direction) -> bool:
    """Whether `data.valid` has this direction (a file of its own, or of the reverse direction)."""
    if not rule.valid:
        return False
    path = pattern_path(rule.valid, direction)
    if rule.format_of(path) in ("flores", "datasets"):
        return True
    reverse = pattern_path(rule.valid, L.Direction(direction.tgt, direction.src))
    return Path(path).is_file() or ("{xx}" not in rule.valid and Path(reverse).is_file())


def held_out(rule: DevRule, direction: L.Direction) -> list[Pair]:
    """`rule.holdout` training pairs of a direction: a sample seeded by the training seed and the
    language pair (so both directions of one file hold out the same lines), kept out of training."""
    if not rule.train:
        raise DataError(f"{rule.source}: data.train is required to hold out dev pairs for {direction}")
    pairs = read_direction(rule.train, direction, rule.format, rule.on_bad, None)
    n = rule.holdout
    if len(pairs) <= n:
        raise DataError(
            f"{rule.source}: {direction} has no data.valid and only {len(pairs)} training pairs; "
            f"data.valid_holdout={n} held out as its dev set would leave none to train on "
            "(give data.valid, or a smaller data.valid_holdout)"
        )
    idx = list(range(len(pairs)))
    pair = "-".join(sorted((direction.src, direction.tgt)))
    random.Random(f"datm-dev:{rule.seed}:{pair}").shuffle(idx)
    return [pairs[i] for i in sorted(idx[:n])]


def dev_pairs(rule: DevRule, direction: L.Direction) -> tuple[str, list[Pair]]:
    """(VALID | HELD_OUT, the dev pairs) of one direction."""
    if not has_valid(rule, direction):
        return HELD_OUT, held_out(rule, direction)
    assert rule.valid is not None
    fmt = rule.format_of(pattern_path(rule.valid, direction))
    return VALID, read_direction(rule.valid, direction, fmt, rule.on_bad, None, dev_split(fmt) or "valid")


def held_out_origins(rule: DevRule, directions: Iterable[str]) -> frozenset[str]:
    """Where the held-out dev pairs of these directions come from ('file:line'): training skips
    these records, in both directions of their file."""
    origins: set[str] = set()
    for d in directions:
        direction = L.Direction.parse(d)
        if not has_valid(rule, direction):
            origins.update(p.origin for p in held_out(rule, direction))
    return frozenset(origins)


def record(rule: DevRule, directions: Iterable[str]) -> dict[str, object]:
    """What plan.json records of a run's dev data: which directions use held-out pairs, how many
    per direction, the seed that chose them, and which use data.valid."""
    ds = list(dict.fromkeys(directions))
    held = [d for d in ds if not has_valid(rule, L.Direction.parse(d))]
    return {
        "valid": [d for d in ds if d not in held],
        "held_out": held,
        "valid_holdout": rule.holdout,
        "seed": rule.seed,
    }


__all__ = ["HELD_OUT", "VALID", "DevRule", "dev_pairs", "has_valid", "held_out", "held_out_origins", "record"]
