"""Typed results of evaluation, read and written in one place each:

- `RunScores`: a run's scores.json (per-direction scores, family averages, signatures, provenance),
  what the score stage writes;
- `BootstrapResult`: one paired bootstrap of system b against system a (`datm.eval.significance`).

Each has `from_json` (with errors naming the file and key) and `to_json` (the exact JSON layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datm.errors import DatmError
from datm.eval.evaluate import DirectionScores
from datm.languages import Direction


class ResultsError(DatmError):
    pass


def require(data: Any, where: str, keys: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ResultsError(f"{where}: expected an object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ResultsError(f"{where}: missing key {missing[0]!r} (expected {list(keys)})")
    return data


# ----------------------------------------------------------------------------------- scores.json


@dataclass(frozen=True)
class RunScores:
    """A run's scores.json."""

    directions: dict[str, DirectionScores]  # "de-en" -> scores, in the file's order
    averages: dict[str, dict[str, float]] = field(default_factory=dict)  # family or "all" -> metric -> mean
    signatures: dict[str, str] = field(default_factory=dict)  # metric -> sacrebleu signature
    provenance: dict[str, Any] = field(default_factory=dict)
    test_fingerprints: dict[str, str] = field(
        default_factory=dict
    )  # direction -> fingerprint of its test set

    @property
    def strategy(self) -> str | None:
        return self.provenance.get("strategy")

    def value(self, direction: str, metric: str) -> float | None:
        """One direction's score in one metric ("bleu", "chrf", "comet"); None where it has none."""
        scores = self.directions.get(direction)
        return None if scores is None else getattr(scores, metric)

    def all_signatures(self) -> dict[str, str]:
        """The run's signatures, completed by the per-direction ones it does not list."""
        out = dict(self.signatures)
        for scores in self.directions.values():
            for metric, sig in scores.signatures.items():
                out.setdefault(metric, sig)
        return out

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "scores.json") -> RunScores:
        if not isinstance(data, Mapping) or "directions" not in data:
            raise ResultsError(f"{path}: expected an object with a 'directions' key")
        directions = data["directions"]
        if not isinstance(directions, Mapping):
            raise ResultsError(f'{path}: \'directions\' must be an object {{"de-en": {{"bleu": ..}}, ..}}')
        for key, entry in directions.items():
            try:
                Direction.parse(key)
            except ValueError as e:
                raise ResultsError(f"{path}: directions.{key}: {e}") from None
            for metric in ("bleu", "chrf"):
                if not isinstance(entry, Mapping) or not isinstance(entry.get(metric), (int, float)):
                    raise ResultsError(f"{path}: directions.{key}.{metric} must be a number")
            if not isinstance(entry.get("n", 0), (int, float)):
                raise ResultsError(f"{path}: directions.{key}.n must be a number")
        return cls(
            {k: DirectionScores.from_dict({"n": 0, **v}) for k, v in directions.items()},
            dict(data.get("averages") or {}),
            dict(data.get("signatures") or {}),
            dict(data.get("provenance") or {}),
            {k: v["test_fingerprint"] for k, v in directions.items() if "test_fingerprint" in v},
        )

    def _direction_json(self, direction: str) -> dict[str, Any]:
        out = self.directions[direction].to_dict()
        if direction in self.test_fingerprints:
            out["test_fingerprint"] = self.test_fingerprints[direction]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "directions": {k: self._direction_json(k) for k in self.directions},
            "averages": self.averages,
            "signatures": self.signatures,
            "provenance": self.provenance,
        }


# ----------------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of system b against system a (b − a), as `datm.significance` computes it."""

    metric: str
    n_samples: int
    seed: int
    a: float  # corpus scores on the full test set
    b: float
    delta: float  # b − a
    mean_b: float  # mean of b's resampled scores
    ci_low: float  # 95% interval of b's score
    ci_high: float
    delta_low: float  # 95% interval of b − a
    delta_high: float
    p_value: float

    def significant(self, level: float) -> bool:
        return self.p_value < level

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str = "bootstrap result") -> BootstrapResult:
        names = [f.name for f in fields(cls)]
        data = require(data, where, names)
        return cls(**{n: data[n] for n in names})
