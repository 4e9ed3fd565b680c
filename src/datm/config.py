"""The experiment config: one YAML file, parsed into typed sections with errors that name the key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datm import languages as L
from datm.errors import DatmError
from datm.log import get_logger

log = get_logger(__name__)


class ConfigError(DatmError):
    pass


@dataclass
class DataConfig:
    train: str | None = None  # pattern with {xx} (one file per pair, both directions) or {src}/{tgt}
    test: str | None = None
    valid: str | None = None
    format: str = "auto"  # auto | alma | tsv | datasets | flores
    test_split: str | None = None  # default: 'devtest' for FLORES, 'test' for datasets
    on_bad_record: str = "error"  # error | skip (skipped records are counted and reported)


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps per adapter
    epochs: float | None = None  # passes over each adapter's data (the fair budget across strategies)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "inverse_sqrt"  # inverse_sqrt (ALMA) | cosine | constant
    warmup_ratio: float = 0.01
    weight_decay: float = 0.01
    max_examples_per_pair: int | None = None
    max_length: int = 256
    seed: int = 1
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs flash-attn and a CUDA GPU)
    packing: bool = False  # pack each batch's examples into few rows (attention isolated per example)


@dataclass
class MergeConfig:
    method: str = "ties"  # a registered merge method (ties, linear, ...) or auto (datm.merge_select)
    density: float = 0.2
    rank: int | None = None  # rank of the re-factored LoRA; default: the adapters' rank
    form: str = "lowrank"  # lowrank | factor | dense | sparse
    weights: list[float] | None = None
    # method auto: [{method, density, rank}, ...] or a grid {methods, densities, ranks}
    candidates: list[dict[str, Any]] | dict[str, Any] | None = None
    select_on: str = "valid"  # auto chooses on the dev set (data.valid, or held-out training pairs)
    dev_size: int = 200  # auto: dev sentences per direction (and the held-out slice's size)


@dataclass
class CometConfig:
    """`eval.comet`: a model name or path, or a mapping with these keys."""

    model: str  # hub name (Unbabel/wmt22-comet-da), model directory or .ckpt file
    python: str | None = None  # interpreter of an environment with unbabel-comet (`datm comet-env DIR`)
    batch_size: int = 8
    device: str = "cpu"  # cpu | cuda


@dataclass
class EvalConfig:
    max_examples: int | None = 100
    beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 8
    precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp32
    comet: CometConfig | None = None  # YAML: a model name/path, or {model, python, batch_size, device}


@dataclass
class PilotConfig:
    """`auto.source: pilot`: short separate and joint trainings, scored on the dev split."""

    fraction: float = 0.25  # of each adapter's training budget (train.steps or train.epochs)
    max_examples: int | None = None  # dev segments scored per direction; default eval.max_examples
    metric: str = "chrf"  # chrf | bleu: the Δ that decides
    samples: int = 1000  # bootstrap resamples of the Δ intervals (reported; the decision is on Δ)


@dataclass
class AutoConfig:
    """How `strategy: auto` measures, per direction, whether joint training helps."""

    source: str = "pilot"  # pilot | probe | file (datm.auto.SOURCES)
    threshold: float = 0.0  # a direction whose measurement is above it is trained jointly
    measurements: str | None = None  # source file: a probe.json or a pilot's analysis.json
    pilot: PilotConfig = field(default_factory=PilotConfig)
    probe_examples: int = 32  # source probe: training examples per direction


@dataclass
class Config:
    languages: list[str]
    data: DataConfig
    strategy: str = "datm"
    auto: AutoConfig = field(default_factory=AutoConfig)
    base_model: str | None = None
    groups: dict[str, list[str]] | None = None
    prompt: str = "alma"  # alma | chat
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"
    executor: str = "local"  # local | ray (datm.tasks.executors)
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # per task kind, for ray
    adapter_cache: str | None = None  # trained adapters shared across runs (datm.adapter_cache)
    source: str = "<dict>"  # the file it came from, for error messages

    def resolved_groups(self) -> dict[str, list[str]]:
        return L.resolve_groups(self.languages, self.groups)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_SECTIONS = {
    "data": DataConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "eval": EvalConfig,
}


def _auto_section(raw: Any, source: str) -> AutoConfig:
    auto = _section(AutoConfig, raw, f"{source}: auto")
    if not isinstance(auto.pilot, PilotConfig):
        auto.pilot = _section(PilotConfig, auto.pilot, f"{source}: auto.pilot")
    return auto


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
    return cls(**raw)


def _resolve_path(value: str | None, base: Path) -> str | None:
    """Relative paths resolve against the config file's folder; hub ids (no such path) stay as given."""
    if value is None:
        return None
    if value.startswith("flores:"):
        return "flores:" + str(_resolve_path(value.removeprefix("flores:"), base))
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if value.startswith((".", "..")) or "{" in value or candidate.exists() or "/" not in value:
        return str(candidate)
    return value  # e.g. 'haoranxu/X-ALMA-13B-Pretrain'


def from_dict(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping at top level")
    top = {f.name for f in dataclasses.fields(Config)} - {"source"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(top)}")
    if "languages" not in raw or not raw["languages"]:
        raise ConfigError(
            f"{source}: key 'languages' is required (a list of non-English codes, e.g. [de, cs])"
        )
    if "data" not in raw:
        raise ConfigError(f"{source}: key 'data' is required (with at least 'train' and 'test' patterns)")
    kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k not in _SECTIONS}
    for key, cls in _SECTIONS.items():
        kwargs[key] = _section(cls, raw.get(key), f"{source}: {key}")
    kwargs["auto"] = _auto_section(raw.get("auto"), source)
    cfg = Config(**kwargs, source=source)
    base = base_dir or Path.cwd()
    cfg.data.train = _resolve_path(cfg.data.train, base) if cfg.data.format != "datasets" else cfg.data.train
    cfg.data.test = _resolve_path(cfg.data.test, base) if cfg.data.format != "datasets" else cfg.data.test
    cfg.data.valid = _resolve_path(cfg.data.valid, base) if cfg.data.format != "datasets" else cfg.data.valid
    cfg.output_dir = str(
        (base / cfg.output_dir) if not Path(cfg.output_dir).is_absolute() else cfg.output_dir
    )
    if cfg.base_model is not None:
        cfg.base_model = _resolve_path(cfg.base_model, base)
    if cfg.adapter_cache is not None:
        if not isinstance(cfg.adapter_cache, str) or not cfg.adapter_cache:
            raise ConfigError(f"{source}: adapter_cache must be a directory path, got {cfg.adapter_cache!r}")
        cfg.adapter_cache = str(base / Path(cfg.adapter_cache).expanduser())
    cfg.eval.comet = comet_config(cfg.eval.comet, f"{source}: eval.comet", base)
    if cfg.auto.measurements is not None:
        if not isinstance(cfg.auto.measurements, str):
            raise ConfigError(
                f"{source}: auto.measurements must be a file path, got {cfg.auto.measurements!r}"
            )
        cfg.auto.measurements = str(base / Path(cfg.auto.measurements).expanduser())
    validate(cfg)
    return cfg


def comet_config(raw: Any, where: str, base: Path) -> CometConfig | None:
    """`eval.comet` as given (a model, or a mapping), with paths resolved against `base`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"model": raw}
    comet = _section(CometConfig, raw, where) if isinstance(raw, dict) and "model" in raw else None
    if comet is None or not isinstance(comet.model, str) or not comet.model:
        raise ConfigError(
            f"{where}: expected a COMET model (name or path) or a mapping with 'model' and optionally "
            "'python', 'batch_size', 'device'"
        )
    comet.model = str(_resolve_path(comet.model, base))
    if comet.python is not None:
        # a path (relative to the config's folder), or a command looked up on PATH
        python = Path(comet.python).expanduser()
        comet.python = str(base / python) if "/" in comet.python else comet.python
    if comet.device not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: device must be 'cpu' or 'cuda', got {comet.device!r}")
    if not isinstance(comet.batch_size, int) or comet.batch_size < 1:
        raise ConfigError(f"{where}: batch_size must be an integer >= 1, got {comet.batch_size!r}")
    return comet


def load(path: str | Path, auto_overrides: dict[str, Any] | None = None) -> Config:
    """The config in a YAML file. `auto_overrides` (the command line's `--measurements`,
    `--threshold`) replace keys of its `auto` section before it is parsed and validated, so every
    command builds its plan from the same keys."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if auto_overrides:
        if not isinstance(raw, dict) or raw.get("strategy") != "auto":
            keys = ", ".join(f"auto.{k}" for k in sorted(auto_overrides))
            strategy = raw.get("strategy", "datm") if isinstance(raw, dict) else None
            raise ConfigError(
                f"{path}: --measurements and --threshold (overriding {keys}) are for strategy auto; "
                f"the config has strategy {strategy!r}"
            )
        section = raw.get("auto") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: auto: expected a mapping, got {type(section).__name__}")
        raw = {**raw, "auto": {**section, **auto_overrides}}
    cfg = from_dict(raw, source=str(path), base_dir=path.resolve().parent)
    keys = ", ".join(f"auto.{k}" for k in sorted(auto_overrides or {}))
    overridden = f" (command line: {keys})" if keys else ""
    log.debug(f"config {path}{overridden}: strategy {cfg.strategy}, output_dir {cfg.output_dir}")
    return cfg


def validate(cfg: Config) -> None:
    from datm.plan import STRATEGIES  # local: plan imports config types only at type-check time

    s = cfg.source
    if not isinstance(cfg.languages, list):
        raise ConfigError(f"{s}: 'languages' must be a list of codes")
    try:
        cfg.resolved_groups()
    except ValueError as e:
        raise ConfigError(f"{s}: {e}") from None
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"{s}: strategy {cfg.strategy!r} unknown; expected one of {sorted(STRATEGIES)}")
    if cfg.prompt not in ("alma", "chat"):
        raise ConfigError(f"{s}: prompt must be 'alma' or 'chat', got {cfg.prompt!r}")
    if cfg.data.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"{s}: data.on_bad_record must be 'error' or 'skip'")
    if cfg.data.format not in ("auto", "alma", "tsv", "datasets", "flores"):
        raise ConfigError(f"{s}: data.format must be auto, alma, tsv, datasets or flores")
    _validate_numbers(cfg)
    validate_auto(cfg)
    t = cfg.train
    if t.steps is None and t.epochs is None and _trains(cfg):
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
    m = cfg.merge
    from datm import merge_select  # local: it imports this module
    from datm.merge.forms import FORMS

    merge_select.validate(cfg)  # the method against the merge registry, and auto's keys
    if m.form not in FORMS:
        raise ConfigError(f"{s}: merge.form must be one of {', '.join(FORMS)}, got {m.form!r}")
    validate_scaleout(cfg)


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "max_retries")


def validate_scaleout(cfg: Config) -> None:
    """The executor, its resources per task kind, and the training options for GPUs."""
    from datm.tasks.executors import EXECUTORS  # local: the executors import config types
    from datm.tasks.graph import KINDS

    s = cfg.source
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"{s}: executor must be one of {sorted(EXECUTORS)}, got {cfg.executor!r}")
    if not isinstance(cfg.resources, dict):
        raise ConfigError(
            f"{s}: resources: expected a mapping of task kind to resources, e.g. {{train: {{num_gpus: 1}}}}"
        )
    for kind, res in cfg.resources.items():
        if kind not in KINDS:
            raise ConfigError(f"{s}: resources.{kind}: unknown task kind; expected some of {list(KINDS)}")
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
    check_merge_weights(cfg, _planned_merges(cfg))


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


def _planned_merges(cfg: Config) -> dict[str, int]:
    """Merge name -> number of sources of the config's plan (none known before `auto` measures)."""
    from datm.plan import make_plan

    if cfg.strategy == "auto":
        return {}  # checked when the auto plan is built
    plan = make_plan(cfg.strategy, cfg.languages, cfg.resolved_groups(), cfg.merge.method)
    return {m.name: len(m.sources) for m in plan.merges}


def _trains(cfg: Config) -> bool:
    """Whether the config's plan trains anything (zero_shot does not, so it needs no train budget)."""
    from datm.plan import make_plan

    if cfg.strategy == "auto":
        return True
    return bool(make_plan(cfg.strategy, cfg.languages, cfg.resolved_groups(), cfg.merge.method).adapters)


def validate_auto(cfg: Config) -> None:
    """The `auto` section: its source, and what that source needs (read only by strategy auto)."""
    from datm.auto import SOURCES  # local: datm.auto imports this module

    s, a = cfg.source, cfg.auto
    if not isinstance(a.source, str) or a.source not in SOURCES:
        raise ConfigError(f"{s}: auto.source must be one of {sorted(SOURCES)}, got {a.source!r}")
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
    if a.source == "pilot" and not cfg.data.valid:
        raise ConfigError(
            f"{s}: auto.source pilot scores its trainings on the dev split: give data.valid "
            "(the test split never decides the plan), or choose auto.source probe or file"
        )
    if a.source in ("pilot", "probe") and not cfg.data.train:
        raise ConfigError(f"{s}: auto.source {a.source} trains or probes on data.train: give data.train")
