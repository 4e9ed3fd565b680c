"""The experiment config: one YAML file, parsed into typed sections with errors that name the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datm import languages as L
from datm.errors import DatmError


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
class EvalConfig:
    max_examples: int | None = 100
    beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 8
    precision: str = "auto"  # auto (bf16 where fast) | bf16 | fp32
    comet: str | None = None  # model name or local checkpoint path


@dataclass
class Config:
    languages: list[str]
    data: DataConfig
    strategy: str = "datm"
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
    validate(cfg)
    return cfg


def load(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return from_dict(raw, source=str(path), base_dir=path.resolve().parent)


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
    t = cfg.train
    if t.steps is None and t.epochs is None:
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
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError(f"{s}: train.batch_size and train.grad_accum must be >= 1")
    m = cfg.merge
    from datm import merge_select  # local: it imports this module

    merge_select.validate(cfg)  # the method against the merge registry, and auto's keys
    if not 0 < m.density <= 1:
        raise ConfigError(f"{s}: merge.density must be in (0, 1], got {m.density}")
    if m.form not in ("lowrank", "factor", "dense", "sparse"):
        raise ConfigError(f"{s}: merge.form must be lowrank, factor, dense or sparse")
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
