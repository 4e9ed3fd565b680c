"""Every setting checked when a config loads, before a model is: errors name the key.

Values only: names are checked against `datm.config.names`, and what needs the plan (merge weights
per merge, a training budget where the plan trains) is checked by `datm.plan.validate` once the plan
is built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datm.config import candidates, names
from datm.config.schema import Config, ConfigError


def validate(cfg: Config) -> None:
    s = cfg.source
    if not isinstance(cfg.languages, list):
        raise ConfigError(f"{s}: 'languages' must be a list of codes")
    try:
        cfg.resolved_groups()
    except ValueError as e:
        raise ConfigError(f"{s}: {e}") from None
    if cfg.strategy not in names.STRATEGIES:
        raise ConfigError(
            f"{s}: strategy {cfg.strategy!r} unknown; expected one of {sorted(names.STRATEGIES)}"
        )
    if cfg.prompt not in ("alma", "chat"):
        raise ConfigError(f"{s}: prompt must be 'alma' or 'chat', got {cfg.prompt!r}")
    if cfg.data.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"{s}: data.on_bad_record must be 'error' or 'skip'")
    if cfg.data.format not in ("auto", "alma", "tsv", "datasets", "flores"):
        raise ConfigError(f"{s}: data.format must be auto, alma, tsv, datasets or flores")
    if cfg.data.eval_on not in ("test", "dev"):
        raise ConfigError(f"{s}: data.eval_on must be test or dev, got {cfg.data.eval_on!r}")
    _validate_numbers(cfg)
    validate_auto(cfg)
    t = cfg.train
    if cfg.strategy not in names.UNTRAINED_STRATEGIES and t.steps is None and t.epochs is None:
        raise ConfigError(
            f"{s}: train: give 'steps' (per adapter) or 'epochs' (passes over each adapter's data)"
        )
    if t.steps is not None and t.epochs is not None:
        raise ConfigError(f"{s}: train: give 'steps' or 'epochs', not both")
    if t.schedule not in ("inverse_sqrt", "cosine", "constant"):
        raise ConfigError(f"{s}: train.schedule must be inverse_sqrt, cosine or constant")
    for section, value in (("train", t.precision), ("eval", cfg.eval.precision)):
        if value not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"{s}: {section}.precision must be auto, bf16 or fp32, got {value!r}")
    if cfg.eval.engine not in ("auto", *names.ENGINES):
        raise ConfigError(
            f"{s}: eval.engine must be auto or one of {list(names.ENGINES)}, got {cfg.eval.engine!r}"
        )
    if cfg.eval.engine == "vllm" and cfg.eval.beams > 1:
        raise ConfigError(
            f"{s}: eval.engine: vllm decodes greedily, and eval.beams is {cfg.eval.beams}: set "
            "eval.beams: 1, or eval.engine: transformers (or auto) for beam search"
        )
    candidates.validate(cfg)  # the merge method, and merge auto's keys
    if cfg.merge.form not in names.MERGE_FORMS:
        raise ConfigError(
            f"{s}: merge.form must be one of {', '.join(names.MERGE_FORMS)}, got {cfg.merge.form!r}"
        )
    validate_scaleout(cfg)


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "max_retries")


def validate_scaleout(cfg: Config) -> None:
    """The executor, its resources per task kind, and the training options for GPUs."""
    s = cfg.source
    if cfg.executor not in names.EXECUTORS:
        raise ConfigError(f"{s}: executor must be one of {sorted(names.EXECUTORS)}, got {cfg.executor!r}")
    if not isinstance(cfg.resources, dict):
        raise ConfigError(
            f"{s}: resources: expected a mapping of task kind to resources, e.g. {{train: {{num_gpus: 1}}}}"
        )
    for kind, res in cfg.resources.items():
        if kind not in names.TASK_KINDS:
            raise ConfigError(
                f"{s}: resources.{kind}: unknown task kind; expected some of {list(names.TASK_KINDS)}"
            )
        if not isinstance(res, dict):
            raise ConfigError(f"{s}: resources.{kind}: expected a mapping such as {{num_gpus: 1}}")
        for key, value in res.items():
            if key not in RESOURCE_KEYS:
                raise ConfigError(
                    f"{s}: resources.{kind}.{key}: unknown; expected some of {list(RESOURCE_KEYS)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{s}: resources.{kind}.{key}: expected a number >= 0, got {value!r}")
    t = cfg.train
    if t.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"{s}: train.attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, "
            f"got {t.attn_implementation!r}"
        )
    for key in ("gradient_checkpointing", "packing"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"{s}: train.{key} must be true or false, got {getattr(t, key)!r}")


@dataclass(frozen=True)
class Number:
    """What a numeric setting may hold: integer or real, its bounds, and whether it may be null."""

    integer: bool
    low: float | None = None  # None: unbounded
    high: float | None = None
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False
    optional: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return kind + (" " + " and ".join(bounds) if bounds else "") + (" (or null)" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        # YAML's true/false are not numbers, whatever Python's bool says.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


POSITIVE_INT = Number(integer=True, low=1)
POSITIVE_INT_OR_NULL = Number(integer=True, low=1, optional=True)

# Every numeric setting, by its dotted key.
NUMERIC_SETTINGS: dict[str, Number] = {
    "lora.r": POSITIVE_INT,
    "lora.alpha": Number(integer=False, low=0, low_open=True),
    "lora.dropout": Number(integer=False, low=0, high=1, high_open=True),
    "train.steps": POSITIVE_INT_OR_NULL,
    "train.epochs": Number(integer=False, low=0, low_open=True, optional=True),
    "data.valid_holdout": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.grad_accum": POSITIVE_INT,
    "train.lr": Number(integer=False, low=0, low_open=True),
    "train.warmup_ratio": Number(integer=False, low=0, high=1),
    "train.weight_decay": Number(integer=False, low=0),
    "train.max_examples_per_pair": POSITIVE_INT_OR_NULL,
    "train.max_length": Number(integer=True, low=2),
    "train.seed": Number(integer=True, low=0),
    "train.checkpoint_every": Number(integer=True, low=0),
    "merge.density": Number(integer=False, low=0, high=1, low_open=True),
    "merge.rank": POSITIVE_INT_OR_NULL,
    "merge.scale": Number(integer=False, low=0, low_open=True),
    "eval.max_examples": POSITIVE_INT_OR_NULL,
    "eval.beams": POSITIVE_INT,
    "eval.max_new_tokens": POSITIVE_INT,
    "eval.batch_size": POSITIVE_INT,
    "auto.threshold": Number(integer=False),
    "auto.probe_examples": POSITIVE_INT,
    "auto.pilot.fraction": Number(integer=False, low=0, high=1, low_open=True),
    "auto.pilot.max_examples": POSITIVE_INT_OR_NULL,
    "auto.pilot.samples": POSITIVE_INT,
}

MERGE_WEIGHT = Number(integer=False, low=0)


def _setting(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for key in dotted.split("."):
        value = getattr(value, key)
    return value


def _validate_numbers(cfg: Config) -> None:
    s = cfg.source
    for key, rule in NUMERIC_SETTINGS.items():
        value = _setting(cfg, key)
        if not rule.accepts(value):
            raise ConfigError(f"{s}: {key} must be {rule.describe()}, got {value!r}")
    normalize = cfg.merge.normalize
    if normalize is not None and not isinstance(normalize, bool):
        raise ConfigError(f"{s}: merge.normalize must be true, false or null, got {normalize!r}")
    weights = cfg.merge.weights
    if weights is None:
        return
    if not isinstance(weights, list) or not weights:
        raise ConfigError(
            f"{s}: merge.weights must be a list of numbers (one per merged source), got {weights!r}"
        )
    for i, w in enumerate(weights):
        if not MERGE_WEIGHT.accepts(w):
            raise ConfigError(f"{s}: merge.weights[{i}] must be {MERGE_WEIGHT.describe()}, got {w!r}")
    if sum(weights) <= 0:
        raise ConfigError(f"{s}: merge.weights must not all be 0, got {weights}")


def check_merge_weights(cfg: Config, merges: dict[str, int]) -> None:
    """merge.weights weighs each merge's sources in order: every merge needs as many sources."""
    weights = cfg.merge.weights
    if weights is None:
        return
    wrong = {name: n for name, n in merges.items() if n != len(weights)}
    if wrong:
        raise ConfigError(
            f"{cfg.source}: merge.weights has {len(weights)} value(s), but merge(s) {wrong} "
            f"(name: number of sources) need one weight per source"
        )


def validate_auto(cfg: Config) -> None:
    """The `auto` section: its source, and what that source needs (read only by strategy auto)."""
    s, a = cfg.source, cfg.auto
    if not isinstance(a.source, str) or a.source not in names.AUTO_SOURCES:
        raise ConfigError(f"{s}: auto.source must be one of {sorted(names.AUTO_SOURCES)}, got {a.source!r}")
    if a.pilot.metric not in ("chrf", "bleu"):
        raise ConfigError(f"{s}: auto.pilot.metric must be 'chrf' or 'bleu', got {a.pilot.metric!r}")
    if a.measurements is not None and a.source != "file":
        raise ConfigError(
            f"{s}: auto.measurements is read only with auto.source: file (source is {a.source!r}); "
            "the pilot and the probe write their own measurements under output_dir"
        )
    if cfg.strategy != "auto":
        return
    if a.source == "file":
        if a.measurements is None:
            raise ConfigError(
                f"{s}: auto.source file needs auto.measurements: a probe.json (`datm probe`) or an "
                "analysis.json (`datm analyze`)"
            )
        if not Path(a.measurements).is_file():
            raise ConfigError(f"{s}: auto.measurements: file {a.measurements} does not exist")
    if a.source in (*names.PILOT_SOURCES, "probe") and not cfg.data.train:
        raise ConfigError(f"{s}: auto.source {a.source} trains or probes on data.train: give data.train")
