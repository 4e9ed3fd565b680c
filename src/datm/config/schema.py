"""The experiment config's sections: typed dataclasses with their defaults (`datm.config`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from datm import languages as L
from datm.data.dev import DevRule
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
    # dev pairs of a direction without `valid` (auto's pilot, merge auto): training pairs held out of
    # every training of the run, a sample seeded by train.seed (datm.data.dev)
    valid_holdout: int = 200
    eval_on: str = "test"  # test | dev: what the run translates and scores (auto's pilot runs: dev)


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
    scale: float = 1.0  # the global scale λ multiplying every method's merged ΔW
    normalize: bool | None = (
        None  # ties, dare_ties: mean (true) or sum of the agreeing entries; null: paper's
    )
    # method auto: [{method, density, rank}, ...] or a grid {methods, densities, ranks}; unset:
    # iso_c_core, core_space, knots, ties at merge.rank or the adapters' rank (candidates.DEFAULT_METHODS)
    candidates: list[dict[str, Any]] | dict[str, Any] | None = None
    select_on: str = "valid"  # auto chooses on the dev set (data.valid, or held-out training pairs)
    dev_size: int = 200  # auto: dev sentences translated per direction (the first of its dev pairs)


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
    engine: str = "auto"  # auto (vllm where installed and it runs the model) | vllm | transformers
    comet: CometConfig | None = None  # YAML: a model name/path, or {model, python, batch_size, device}

    def decoding(self) -> dict[str, Any]:
        """The settings that make hypotheses of a module's sources ('eval.KEY': value; comet only
        scores them): a finished translation records them, and is reused only under the same."""
        return {f"eval.{k}": getattr(self, k) for k in ("beams", "max_new_tokens", "batch_size", "precision")}


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

    source: str = "pilot"  # pilot | full_pilot | probe | file (datm.auto.SOURCES)
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

    def dev_rule(self) -> DevRule:
        """Where each direction's dev pairs come from (`datm.data.dev`)."""
        d = self.data
        return DevRule(
            d.valid, d.train, d.format, d.on_bad_record, d.valid_holdout, self.train.seed, self.source
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


# The top-level keys that are sections (mappings of their own), and their types; `auto` has a nested one.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "lora": LoraConfig,
    "train": TrainConfig,
    "merge": MergeConfig,
    "eval": EvalConfig,
}
