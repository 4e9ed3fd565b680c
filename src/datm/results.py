"""Typed results read and written by evaluate, analyze and report: one place each.

- `RunScores`: a run's scores.json (per-direction scores, family averages, signatures, provenance);
- `BootstrapResult`: one paired bootstrap of system b against system a (`datm.significance`);
- `Analysis`: what `datm analyze` writes to analysis.json (its keys are a contract: `datm plan`
  reads a pilot's analysis.json as measurements).

Each has `from_json` (with errors naming the file and key) and `to_json` (the exact JSON layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datm.errors import DatmError
from datm.evaluate import DirectionScores
from datm.languages import Direction


class ResultsError(DatmError):
    pass


def _require(data: Any, where: str, keys: Any) -> Mapping[str, Any]:
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
        data = _require(data, where, names)
        return cls(**{n: data[n] for n in names})


# ----------------------------------------------------------------------------------- analysis.json


@dataclass(frozen=True)
class DeltaRow:
    """One direction compared between two runs: Δ = b − a in the analysis metric, its interval."""

    delta: float
    low: float
    high: float
    p_value: float
    scores: dict[str, float]  # role -> corpus score: system a's role first, then b's
    metric_deltas: dict[str, float]  # metric -> point Δ ("chrf", "bleu")
    kind: str | None = None  # conflict | synergy | neutral (not given for merge degradation)

    def score(self, role: str) -> float:
        return self.scores[role]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "delta": self.delta,
            "low": self.low,
            "high": self.high,
            "p_value": self.p_value,
        }
        out.update(self.scores)
        out.update({f"{m}_delta": v for m, v in self.metric_deltas.items()})
        if self.kind is not None:
            out["kind"] = self.kind
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> DeltaRow:
        data = _require(data, where, ("delta", "low", "high", "p_value"))
        fixed = {"delta", "low", "high", "p_value", "kind"}
        deltas = {k[: -len("_delta")]: v for k, v in data.items() if k.endswith("_delta")}
        scores = {k: v for k, v in data.items() if k not in fixed and not k.endswith("_delta")}
        return cls(
            data["delta"], data["low"], data["high"], data["p_value"], scores, deltas, data.get("kind")
        )


@dataclass(frozen=True)
class FamilyDelta:
    """Mean Δ over a family's directions, with a bootstrap interval of that mean."""

    delta: float
    low: float
    high: float
    kind: str | None  # not given for merge degradation
    n_directions: int
    resampling: str  # joint (one index draw shared by the directions) | independent

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind is None:
            del out["kind"]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> FamilyDelta:
        data = _require(data, where, ("delta", "low", "high", "n_directions", "resampling"))
        return cls(
            data["delta"],
            data["low"],
            data["high"],
            data.get("kind"),
            data["n_directions"],
            data["resampling"],
        )


def _comparison_from_json(data: Any, where: str) -> tuple[dict[str, DeltaRow], dict[str, FamilyDelta]]:
    data = _require(data, where, ("directions", "families"))
    rows = {d: DeltaRow.from_json(r, f"{where}: directions.{d}") for d, r in data["directions"].items()}
    fams = {f: FamilyDelta.from_json(r, f"{where}: families.{f}") for f, r in data["families"].items()}
    return rows, fams


@dataclass(frozen=True)
class MergeDegradation:
    """merged − unmerged, over the directions the merged run serves from a merge."""

    directions: dict[str, DeltaRow]
    families: dict[str, FamilyDelta]

    def to_json(self) -> dict[str, Any]:
        return {
            "directions": {d: r.to_json() for d, r in self.directions.items()},
            "families": {f: r.to_json() for f, r in self.families.items()},
        }


@dataclass(frozen=True)
class RunRef:
    path: str
    strategy: str | None


@dataclass(frozen=True)
class Analysis:
    """What `datm analyze` produces: joint − separate, and optionally merged − unmerged (`merge`)."""

    metric: str
    n_samples: int
    seed: int
    runs: dict[str, RunRef]  # role -> run
    directions: dict[str, DeltaRow]  # joint − separate
    families: dict[str, FamilyDelta]
    merge: MergeDegradation | None = None
    pilot: dict[str, Any] | None = None  # the settings of an `auto` pilot that made this analysis

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "runs": {role: asdict(run) for role, run in self.runs.items()},
            "directions": {d: r.to_json() for d, r in self.directions.items()},
            "families": {f: r.to_json() for f, r in self.families.items()},
        }
        if self.merge is not None:
            out["merge"] = self.merge.to_json()
        if self.pilot is not None:
            out["pilot"] = self.pilot
        return out

    @classmethod
    def from_json(cls, data: Any, path: str | Path = "analysis.json") -> Analysis:
        where = str(path)
        data = _require(data, where, ("metric", "n_samples", "seed", "runs", "directions", "families"))
        rows, fams = _comparison_from_json(data, where)
        merge = (
            MergeDegradation(*_comparison_from_json(data["merge"], f"{where}: merge"))
            if "merge" in data
            else None
        )
        runs = {
            role: RunRef(**_require(r, f"{where}: runs.{role}", ("path", "strategy")))
            for role, r in data["runs"].items()
        }
        return cls(
            data["metric"], data["n_samples"], data["seed"], runs, rows, fams, merge, data.get("pilot")
        )
