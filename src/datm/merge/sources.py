"""Reading PEFT LoRA directories (config and safetensors header only) and planning one `ModuleTask`
per module; the sources' factors are loaded later, module by module."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from datm import artifacts
from datm.merge.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MergeError

# peft saves the tensors of a PeftModel under this prefix; what follows is the base model's module name.
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    a_key: str
    b_key: str
    rank: int
    out_features: int
    in_features: int
    scaling: float


@dataclass(frozen=True)
class LoraSource:
    """One PEFT LoRA adapter directory, read from its config and safetensors header (no tensors)."""

    path: Path
    config: dict[str, Any]
    r: int
    lora_alpha: float
    use_rslora: bool
    base_model: str | None
    fan_in_fan_out: bool
    dtype: torch.dtype
    modules: dict[str, LoraModule]  # base-model module name -> its LoRA tensors

    @property
    def weights_file(self) -> Path:
        return self.path / ADAPTER_WEIGHTS


@dataclass(frozen=True)
class ModuleTask:
    """Merge one module: source i's ΔW is scalings[i] · B(b_keys[i]) @ A(a_keys[i])."""

    name: str  # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    a_keys: tuple[str, ...]
    b_keys: tuple[str, ...]
    scalings: tuple[float, ...]
    ranks: tuple[int, ...]
    out_features: int
    in_features: int

    @property
    def weight_name(self) -> str:
        """The base model's weight this module's ΔW is added to."""
        return f"{self.name}.weight"


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """peft's LoRA scaling: alpha/√r with rank-stabilized LoRA, alpha/r otherwise."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module name that ends with it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_source(path: Path) -> LoraSource:
    """Read and check one PEFT LoRA directory's config and tensor header."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    weights_file = path / ADAPTER_WEIGHTS
    config = _read_config(path, config_file, weights_file)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise MergeError(f"{config_file}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise MergeError(f"{config_file}: 'lora_alpha' must be a number, got {alpha!r}")
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise MergeError(f"{config_file}: 'rank_pattern' and 'alpha_pattern' must be JSON objects")

    shapes, dtypes = _read_header(weights_file)
    modules: dict[str, LoraModule] = {}
    for name, (a_key, b_key) in _lora_keys(weights_file, shapes).items():
        a_shape, b_shape = shapes[a_key], shapes[b_key]
        rank = int(_pattern_value(rank_pattern, name, r))
        module_alpha = float(_pattern_value(alpha_pattern, name, alpha))
        _check_module_shapes(weights_file, name, a_shape, b_shape, rank)
        modules[name] = LoraModule(
            a_key=a_key,
            b_key=b_key,
            rank=rank,
            out_features=b_shape[0],
            in_features=a_shape[1],
            scaling=lora_scaling(module_alpha, rank, use_rslora),
        )
    dtype = _one_dtype(weights_file, dtypes)
    return LoraSource(
        path=path,
        config=config,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        base_model=config.get("base_model_name_or_path"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        dtype=dtype,
        modules=modules,
    )


def _read_config(path: Path, config_file: Path, weights_file: Path) -> dict[str, Any]:
    """The adapter's config, once both of its files are there and it asks for nothing merging cannot do."""
    if not config_file.is_file():
        raise MergeError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    if not weights_file.is_file():
        raise MergeError(f"{path}: no {ADAPTER_WEIGHTS} (only safetensors adapters can be merged)")
    config = artifacts.read_json(config_file)
    if not isinstance(config, dict):
        raise MergeError(f"{config_file}: expected a JSON object")

    def unsupported(what: str) -> MergeError:
        return MergeError(f"{config_file}: {what} is not supported by merging")

    if config.get("peft_type", "LORA") != "LORA":
        raise unsupported(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        raise unsupported("use_dora=true (DoRA magnitudes cannot be merged as a ΔW)")
    if config.get("modules_to_save"):
        raise unsupported(f"modules_to_save={config['modules_to_save']!r} (fully trained modules)")
    if config.get("lora_bias"):
        raise unsupported("lora_bias=true")
    return config


def _read_header(weights_file: Path) -> tuple[dict[str, list[int]], set[str]]:
    """The shape of every tensor in `weights_file`, and the set of their dtype names (no tensor is read)."""
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    return shapes, dtypes


def _lora_keys(weights_file: Path, shapes: dict[str, list[int]]) -> dict[str, tuple[str, str]]:
    """Module name -> its (lora_A, lora_B) tensor keys, by module name; every tensor must be one of a pair."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in shapes:
        if key.endswith(LORA_A_SUFFIX):
            a_keys[_module_name(key, LORA_A_SUFFIX)] = key
        elif key.endswith(LORA_B_SUFFIX):
            b_keys[_module_name(key, LORA_B_SUFFIX)] = key
        else:
            raise MergeError(
                f"{weights_file}: unsupported tensor {key!r}; only the lora_A/lora_B weights of linear "
                "layers can be merged (no embeddings, biases, DoRA magnitudes or modules_to_save)"
            )
    for name in sorted(set(a_keys) ^ set(b_keys)):
        missing = "lora_B" if name in a_keys else "lora_A"
        raise MergeError(f"{weights_file}: module {name} has no {missing} weight")
    if not a_keys:
        raise MergeError(f"{weights_file}: holds no LoRA weights")
    return {name: (a_keys[name], b_keys[name]) for name in sorted(a_keys)}


def _check_module_shapes(
    weights_file: Path, name: str, a_shape: list[int], b_shape: list[int], rank: int
) -> None:
    """lora_A must be [rank, in] and lora_B [out, rank]."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
        raise MergeError(
            f"{weights_file}: module {name} has lora_A {a_shape} and lora_B {b_shape}; expected "
            f"[{rank}, in] and [out, {rank}] (rank {rank} from {ADAPTER_CONFIG})"
        )


def _one_dtype(weights_file: Path, dtypes: set[str]) -> torch.dtype:
    """The one float dtype all of the adapter's tensors are stored in."""
    dtype_names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if len(dtypes) != 1 or next(iter(dtypes)) not in dtype_names:
        raise MergeError(f"{weights_file}: expected LoRA weights of one float dtype, found {sorted(dtypes)}")
    return dtype_names[next(iter(dtypes))]


def _module_name(key: str, suffix: str) -> str:
    name = key[: -len(suffix)]
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def plan_merge(sources: Sequence[LoraSource]) -> list[ModuleTask]:
    """Check that the sources agree (base model, modules, shapes) and list one task per module."""
    if not sources:
        raise MergeError("no sources to merge")
    first = sources[0]
    for src in sources[1:]:
        if src.base_model != first.base_model:
            raise MergeError(
                f"{src.path}: base_model_name_or_path is {src.base_model!r} but {first.path} has "
                f"{first.base_model!r}; adapters of different base models cannot be merged"
            )
        if src.fan_in_fan_out != first.fan_in_fan_out:
            raise MergeError(f"{src.path}: fan_in_fan_out differs from {first.path}")
        only_here = sorted(set(src.modules) - set(first.modules))
        only_first = sorted(set(first.modules) - set(src.modules))
        if only_here:
            raise MergeError(f"{src.path}: has LoRA module {only_here[0]} which {first.path} lacks")
        if only_first:
            raise MergeError(f"{src.path}: lacks LoRA module {only_first[0]} which {first.path} has")
    tasks = []
    for name, mod in first.modules.items():
        for src in sources[1:]:
            other = src.modules[name]
            if (other.out_features, other.in_features) != (mod.out_features, mod.in_features):
                raise MergeError(
                    f"{src.path}: module {name} is {other.out_features}×{other.in_features} but "
                    f"{mod.out_features}×{mod.in_features} in {first.path}"
                )
        per_source = [src.modules[name] for src in sources]
        tasks.append(
            ModuleTask(
                name=name,
                a_keys=tuple(m.a_key for m in per_source),
                b_keys=tuple(m.b_key for m in per_source),
                scalings=tuple(m.scaling for m in per_source),
                ranks=tuple(m.rank for m in per_source),
                out_features=mod.out_features,
                in_features=mod.in_features,
            )
        )
    return tasks


def load_factor(handle: Any, key: str, source: LoraSource) -> torch.Tensor:
    """One A or B tensor of `source` from its open safetensors `handle`, in float32, checked finite."""
    tensor = handle.get_tensor(key).float()
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{source.weights_file}: {key} holds NaN or infinite values; it cannot be merged")
    return tensor
