"""`strategy: auto`: measure, per direction, whether joint training helps, then plan from that.

One builder serves every command: `build_plan(cfg)` reads the measurements the config's `auto`
section names and applies `datm.plan.auto_plan` with its threshold, so `datm plan`, `datm run` and
`datm train` build the same plan from the same config (the command line's `--measurements` and
`--threshold` are overrides of those keys, `datm.config.load(auto_overrides=...)`). `plan.json` records
what decided it (`Plan.decided_by`).

Sources (`auto.source`, a registry):
- `pilot` (default): short separate and joint trainings scored on the dev split, Δ = joint − separate
  (`datm.pilot`);
- `full_pilot`: the same pilot at the full budget; its adapters are the run's own (linked, nothing
  trained twice), and a direction whose pilot interval includes the threshold follows the paper's
  prior (XX→En separate, En→XX joint) rather than the noise (`datm.plan.PRIOR`);
- `probe`: the LoRA-gradient cosine before training (`datm.probe`); measured *not* to predict the
  gains on this project's data (`benchmarks/results/probe_validity.md`), so it is not the default;
- `file`: measurements made elsewhere, `auto.measurements` (a probe.json or an analysis.json).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datm import artifacts
from datm.config import Config, ConfigError, names
from datm.data import dev
from datm.errors import DatmError
from datm.log import get_logger
from datm.plan import Plan, auto_plan, dev_directions, make_plan, validate
from datm.plan.strategies import PRIOR_TEXT

log = get_logger(__name__)


# What runs a run's config (`datm.run.runner.run`, handed down by the runner: the pilot's trainings
# are ordinary runs, and this package sits below the run layer).
Runner = Callable[[Config], object]


class MeasurementsMissing(DatmError):
    """The measurements an auto plan decides from have not been taken yet."""


@dataclass(frozen=True)
class Source:
    name: str
    path: Callable[[Config], Path]  # where the source's measurements are
    measure: Callable[[Config, Runner], object] | None  # takes them (None: the user supplies the file)
    describe: Callable[[Config], str]  # what it measures and what that costs
    how: str  # how a user takes the measurements
    hand_over: Callable[[Config, Plan], None] | None = None  # gives the run what measuring built


def _probe_path(cfg: Config) -> Path:
    from datm.auto.probe import default_probe_path

    return default_probe_path(cfg)


def _probe_measure(cfg: Config, run: Runner) -> object:
    from datm.auto import probe

    log.info("strategy auto: measuring gradient similarity first (datm probe)")
    return probe.probe_config(cfg, _probe_path(cfg).parent, cfg.auto.probe_examples)


def _pilot_measure(cfg: Config, run: Runner) -> object:
    from datm.auto import pilot

    log.info("strategy auto: running the pilot first")
    return pilot.run_pilot(cfg, run)


def _pilot_path(cfg: Config) -> Path:
    from datm.auto import pilot

    return pilot.analysis_path(cfg)


def _pilot_describe(cfg: Config) -> str:
    from datm.auto import pilot

    return pilot.describe(cfg)


def _pilot_hand_over(cfg: Config, plan: Plan) -> None:
    from datm.auto import pilot

    pilot.hand_over(cfg, plan)


SOURCES: dict[str, Source] = {
    "pilot": Source(
        "pilot",
        _pilot_path,
        _pilot_measure,
        _pilot_describe,
        "`datm run` (or `datm train`) runs the pilot first",
    ),
    "full_pilot": Source(
        "full_pilot",
        _pilot_path,
        _pilot_measure,
        _pilot_describe,
        "`datm run` (or `datm train`) runs the pilot first",
        _pilot_hand_over,
    ),
    "probe": Source(
        "probe",
        _probe_path,
        _probe_measure,
        lambda cfg: (
            f"probe: LoRA-gradient cosine on {cfg.auto.probe_examples} training examples per direction, "
            "before any training (it did not predict the gains: benchmarks/results/probe_validity.md)"
        ),
        "run `datm probe CONFIG` (or `datm run`, which probes first)",
    ),
    "file": Source(
        "file",
        lambda cfg: Path(str(cfg.auto.measurements)),
        None,
        lambda cfg: f"file: measurements in {cfg.auto.measurements}",
        "give an existing probe.json or analysis.json as auto.measurements",
    ),
}
names.check_registry("auto source", names.AUTO_SOURCES, SOURCES)


def measurements_path(cfg: Config) -> Path:
    return SOURCES[cfg.auto.source].path(cfg)


def describe(cfg: Config) -> str:
    """The auto section in words: where the measurements come from, what they cost, the threshold."""
    a = cfg.auto
    return f"auto: source {a.source}, threshold {a.threshold:g}: {SOURCES[a.source].describe(cfg)}"


def needs_measurements(cfg: Config) -> bool:
    """Whether strategy auto has yet to take its measurements (the pilot or the probe)."""
    if cfg.strategy != "auto" or measurements_path(cfg).is_file():
        return False
    if SOURCES[cfg.auto.source].measure is None:
        raise ConfigError(f"{cfg.source}: auto.measurements: file {measurements_path(cfg)} does not exist")
    return True


def hand_over(cfg: Config, plan: Plan) -> None:
    """Give the run what its source's measuring already built (`full_pilot`: its adapters)."""
    source = SOURCES[cfg.auto.source] if cfg.strategy == "auto" else None
    if source is not None and source.hand_over is not None:
        source.hand_over(cfg, plan)


def measure(cfg: Config, run: Runner) -> None:
    """Take the config's measurements; `run` runs a run's config (the pilot's trainings)."""
    measure_with = SOURCES[cfg.auto.source].measure
    assert measure_with is not None, "needs_measurements() first"
    measure_with(cfg, run)


def measurements_from_file(path: str | Path, groups: dict[str, list[str]]) -> tuple[dict[str, float], str]:
    """Measurements and their kind ("probe" or "pilot") from a probe.json (`datm probe`) or an
    analysis.json (`datm analyze`, or a pilot's: per direction Δ = joint − separate)."""
    from datm.auto.probe import ProbeError, auto_measurements_from_probe

    path = Path(path)
    if not path.is_file():
        raise MeasurementsMissing(f"measurements file {path} does not exist")
    raw = artifacts.read_json(path)
    if isinstance(raw, dict) and "matrix" in raw:
        return auto_measurements_from_probe(raw, groups), "probe"
    if isinstance(raw, dict) and isinstance(raw.get("directions"), dict):
        try:
            return {d: float(row["delta"]) for d, row in raw["directions"].items()}, "pilot"
        except (KeyError, TypeError, ValueError):
            pass
    raise ProbeError(
        f"{path}: neither a probe.json (from `datm probe`) nor an analysis.json (from `datm analyze`)"
    )


def build_plan(cfg: Config) -> Plan:
    """The one plan builder of every command: the strategy's plan (`auto`: from the measurements its
    config names), checked against the config (`datm.plan.validate`), with the record of its dev data
    (`Plan.dev`: which directions hold training pairs out as their dev set, how many, the seed)."""
    if cfg.strategy == "auto":
        plan = _auto_plan(cfg)
    else:
        plan = make_plan(cfg.strategy, cfg.languages, cfg.resolved_groups(), cfg.merge.method)
    validate(cfg, plan)
    directions = dev_directions(cfg, plan)
    if directions:  # what decides on dev pairs, and where they come from (held out of training or not)
        plan.dev = dev.record(cfg.dev_rule(), directions)
    return plan


def _auto_plan(cfg: Config) -> Plan:
    """The auto plan of a config, from the measurements its `auto` section names."""
    path = measurements_path(cfg)
    if not path.is_file():
        raise MeasurementsMissing(
            f"{cfg.source}: strategy auto decides from measurements and {path} does not exist yet; "
            f"{SOURCES[cfg.auto.source].how}"
        )
    if cfg.auto.source in names.PILOT_SOURCES:
        from datm.auto import pilot

        pilot.check_current(cfg, artifacts.read_json(path), path)
    groups = cfg.resolved_groups()
    measurements, kind = measurements_from_file(path, groups)
    undecided = _undecided(cfg, path) if cfg.auto.source == "full_pilot" else frozenset()
    a = cfg.auto
    try:
        plan = auto_plan(cfg.languages, groups, measurements, a.threshold, kind, cfg.merge.method, undecided)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    plan.decided_by = {
        "source": a.source,
        "kind": kind,
        "threshold": a.threshold,
        "measurements": str(path),
        "fingerprint": artifacts.fingerprint_files([path]),
        "values": measurements,
    }
    if a.source == "full_pilot":
        plan.decided_by["prior"] = {"directions": sorted(undecided), "rule": PRIOR_TEXT}
        if len(undecided) == len(measurements):
            plan.decided_by["note"] = (
                f"no direction's pilot interval excludes {a.threshold:g}: nothing measured is above "
                f"the noise, so every direction follows {PRIOR_TEXT}"
            )
    return plan


def _undecided(cfg: Config, path: Path) -> frozenset[str]:
    """The directions of a pilot's analysis.json whose Δ interval includes auto.threshold."""
    rows = artifacts.read_json(path)["directions"]
    t = cfg.auto.threshold
    return frozenset(d for d, r in rows.items() if r["low"] <= t <= r["high"])


__all__ = [
    "SOURCES",
    "MeasurementsMissing",
    "build_plan",
    "describe",
    "hand_over",
    "Runner",
    "measure",
    "needs_measurements",
    "measurements_from_file",
    "measurements_path",
]
