"""Merge PEFT LoRA adapters into one module (TIES or linear on the true weight deltas).

What to do is planned apart from doing it (as mergekit does): `plan_merge` reads only the sources'
configs and safetensors headers and returns one small `ModuleTask` per LoRA module; `execute` then
streams the modules one by one, loading each source's A and B for that module alone with
`safe_open`, merging, writing the result to disk and dropping it before the next module. Each source's
dense ΔW is formed from its factors only while it is used (TIES takes two passes and recomputes it), so
peak memory is the module's small factors plus about four of its out×in matrices, whatever the model
size and the number of sources.

The merge works on ΔW_i = scaling_i · B_i A_i (out×in, float32), not on A and B separately. The
merged ΔW is written in one of four forms:

- ``lowrank``: re-factored to a LoRA of rank `rank` by truncated SVD (a PEFT adapter directory);
- ``factor``: peft's behaviour, the method applied to the A and B matrices separately (a PEFT
  adapter directory; kept for comparison, its error against the ΔW merge is reported);
- ``dense``: ΔW per touched base weight (a datm delta directory, added to the base at load time);
- ``sparse``: ΔW's nonzero entries as flat indices + values (a datm delta directory).

Every form records in ``merge_info.json`` how far what it wrote is from the merged ΔW.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from datm import artifacts
from datm.errors import DatmError

METHODS = ("ties", "linear")
FORMS = ("lowrank", "factor", "dense", "sparse")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DELTA_CONFIG = "delta_config.json"
DELTA_WEIGHTS = "delta.safetensors"
MERGE_INFO = "merge_info.json"

# peft saves the tensors of a PeftModel under this prefix; what follows is the base model's module name.
PEFT_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

# Exact SVD is fast enough up to this smaller dimension; above it a seeded randomized SVD is used.
EXACT_SVD_MAX_DIM = 1024
SVD_OVERSAMPLE = 16
SVD_NITER = 8  # TIES output has a flat spectrum: 4 iterations cost ~0.2% extra error, 8 ~0.02%
SVD_SEED = 0
# Above 8× this many entries, trim thresholds are found among the entries above a sampled lower bound.
THRESHOLD_SAMPLE = 1 << 16
THRESHOLD_SEED = 0


class MergeError(DatmError):
    """Bad merge input: unreadable or inconsistent sources, or bad arguments."""


# --------------------------------------------------------------------------------------------------
# Pure building blocks
# --------------------------------------------------------------------------------------------------


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest magnitude (at least 1), zero the rest (TIES step 1).

    The count is `int(density * n)` as peft's `magnitude_based_pruning` and mergekit's `magnitude`
    compute it (the float product, floored), so that on the same ΔW they keep the same entries.
    Entries tied in magnitude with the last kept one are all kept, so the result is deterministic
    (peft's topk keeps an arbitrary subset of such ties).
    """
    _check_density(density)
    return _zero_below(delta.clone(), _trim_threshold(delta, density))


def _trim_threshold(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """The smallest magnitude `trim` keeps (the keep-th largest), or None when it keeps everything."""
    n = delta.numel()
    if n == 0 or density >= 1.0:
        return None
    keep = max(1, int(density * n))  # exactly peft's and mergekit's count
    return _kth_largest(delta.abs().reshape(-1), keep)


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of the 1-D `values` (no NaN), exactly what torch.kthvalue gives.

    kthvalue copies its whole input and an int64 index per entry. On large inputs a lower bound is
    taken from a seeded random sample, a few standard errors below the k-th largest, and kthvalue
    runs on the entries at or above it only. When at least k entries pass the bound, all k largest
    are among them, so the answer is exact; if the sample misled (very rare), the full kthvalue runs.
    """
    n = values.numel()
    if n > 8 * THRESHOLD_SAMPLE:
        generator = torch.Generator().manual_seed(THRESHOLD_SEED)
        sample = values[torch.randint(n, (THRESHOLD_SAMPLE,), generator=generator)]
        fraction = k / n
        margin = 6 * math.sqrt(fraction * (1 - fraction) / THRESHOLD_SAMPLE) + 2 / THRESHOLD_SAMPLE
        sample_k = min(THRESHOLD_SAMPLE, math.ceil((fraction + margin) * THRESHOLD_SAMPLE))
        bound = torch.kthvalue(sample, THRESHOLD_SAMPLE - sample_k + 1).values
        candidates = values[values >= bound]
        if candidates.numel() >= k:
            return torch.kthvalue(candidates, candidates.numel() - k + 1).values
        del candidates
    return torch.kthvalue(values, n - k + 1).values


def _zero_below(delta: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Set `delta`'s entries of magnitude below `threshold` to 0, in place (None keeps all); returns it."""
    if threshold is None:
        return delta
    # |x| >= t as (x >= t or x <= -t): two boolean masks instead of a float copy of |delta|.
    keep = delta.ge(threshold)
    keep.logical_or_(delta.le(-threshold))
    return delta.masked_fill_(keep.logical_not_(), 0.0)


def ties_merge(
    deltas: Sequence[torch.Tensor], density: float, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """TIES-merging (Yadav et al., 2023) of same-shaped task deltas, computed in float32.

    1. trim each delta to its top-`density` entries by magnitude;
    2. multiply by its weight w_i (default 1) and elect, per entry, the sign of the sum over sources;
    3. take, per entry, the weighted disjoint mean of the sources whose trimmed value is nonzero and
       has the elected sign: Σ_agreeing w_i·t_i / Σ_agreeing w_i. This is the mean of the agreeing
       values weighted by w (mergekit's TIES with `normalize: true`); with unit weights it is the
       paper's and peft's plain mean over the agreeing sources.

    A sum of exactly 0 elects + (peft's majority_sign_method="total" and mergekit's "sum" do the
    same); an entry that every source trimmed to 0 merges to 0, and so does one whose agreeing
    weights sum to 0 (possible only with negative weights; mergekit then divides by 1, as here).
    """
    _check_same_shape(deltas)
    weights = _resolve_weights(weights, len(deltas), default=1.0)
    trimmed = [trim(d.float(), density).mul_(w) for d, w in zip(deltas, weights, strict=True)]
    elected = torch.zeros_like(trimmed[0])
    for t in trimmed:
        elected.add_(t)
    _elect_sign(elected)
    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for t, w in zip(trimmed, weights, strict=True):
        agrees = (t * elected) > 0  # nonzero with the elected sign
        total.add_(t * agrees)
        divisor.add_(agrees, alpha=w)
    return total.div_(divisor.masked_fill_(divisor.eq(0), 1.0))  # entries no source agrees on stay 0


def ties_merge_factored(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    density: float,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """`ties_merge` of LoRA deltas ΔW_i = s_i · B_i @ A_i given as factors (A_i, B_i, s_i).

    The result equals ``ties_merge([delta_of(a, b, s) for a, b, s in factors], density, weights)``
    bit for bit (for finite deltas), but no two ΔW_i exist at once: pass 1 forms each ΔW_i, finds its
    trim threshold and adds its weighted trimmed values to the sign-electing sum; pass 2 forms each
    ΔW_i again from its (small) factors, trims it with the stored threshold and adds the entries that
    agree with the elected sign (and their weights to the divisor). Peak: about four out×in float32
    matrices (ΔW_i, the elected signs, the weighted sum, the divisor) whatever the number of sources.
    """
    _check_density(density)
    if not factors:
        raise MergeError("nothing to merge: no deltas given")
    shapes = {(b.shape[0], a.shape[-1]) for a, b, _ in factors}
    if len(shapes) != 1:
        raise MergeError(f"deltas to merge must share one shape, got {sorted(shapes)}")
    weights = _resolve_weights(weights, len(factors), default=1.0)

    thresholds: list[torch.Tensor | None] = []
    elected: torch.Tensor | None = None
    for (a, b, scaling), w in zip(factors, weights, strict=True):
        delta = delta_of(a, b, scaling)
        thresholds.append(_trim_threshold(delta, density))
        trimmed = _zero_below(delta, thresholds[-1]).mul_(w)
        if elected is None:
            elected = torch.zeros_like(trimmed)
        elected.add_(trimmed)
        del delta, trimmed
    assert elected is not None
    _elect_sign(elected)

    total = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for (a, b, scaling), w, threshold in zip(factors, weights, thresholds, strict=True):
        trimmed = _zero_below(delta_of(a, b, scaling), threshold).mul_(w)
        # Multiplying by the elected sign (±1) in place: > 0 marks the agreeing entries, and a
        # second multiplication restores them exactly (x · ±1 · ±1 = x); the rest are zeroed.
        agrees = trimmed.mul_(elected) > 0
        divisor.add_(agrees, alpha=w)
        trimmed.mul_(elected).masked_fill_(agrees.logical_not_(), 0.0)
        total.add_(trimmed)
        del trimmed, agrees
    del elected
    return total.div_(divisor.masked_fill_(divisor.eq(0), 1.0))  # entries no source agrees on stay 0


def _elect_sign(summed: torch.Tensor) -> torch.Tensor:
    """Turn the per-entry sum of the sources into the elected sign, in place: +1 where ≥ 0, else −1."""
    return summed.sign_().masked_fill_(summed.eq(0), 1.0)


def linear_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Task arithmetic: Σ w_i Δ_i in float32 (weights default to 1/n, i.e. the mean)."""
    _check_same_shape(deltas)
    weights = _resolve_weights(weights, len(deltas), default=1.0 / len(deltas))
    merged = torch.zeros_like(deltas[0], dtype=torch.float32)
    for d, w in zip(deltas, weights, strict=True):
        merged.add_(d.float(), alpha=w)
    return merged


def merge_deltas(
    method: str, deltas: Sequence[torch.Tensor], density: float, weights: Sequence[float] | None
) -> torch.Tensor:
    if method == "ties":
        return ties_merge(deltas, density, weights)
    if method == "linear":
        return linear_merge(deltas, weights)
    raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")


def merge_factored(
    method: str,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    density: float,
    weights: Sequence[float] | None,
) -> torch.Tensor:
    """`merge_deltas` on the LoRA deltas s_i · B_i @ A_i of factors (A_i, B_i, s_i), forming one at a time."""
    if method == "ties":
        return ties_merge_factored(factors, density, weights)
    if method == "linear":
        if not factors:
            raise MergeError("nothing to merge: no deltas given")
        weights = _resolve_weights(weights, len(factors), default=1.0 / len(factors))
        merged: torch.Tensor | None = None
        for (a, b, scaling), w in zip(factors, weights, strict=True):
            delta = delta_of(a, b, scaling)
            if merged is None:
                merged = torch.zeros_like(delta)
            if merged.shape != delta.shape:
                raise MergeError(
                    f"deltas to merge must share one shape, got {list(merged.shape)} and {list(delta.shape)}"
                )
            merged.add_(delta, alpha=w)
            del delta
        assert merged is not None
        return merged
    raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")


def lowrank_factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ΔW (out×in) as B @ A by truncated SVD: B = U_k √S_k (out×rank), A = √S_k V_kᵀ (rank×in).

    Splitting √S between the factors keeps A and B on the same scale. k = min(rank, out, in); when
    rank exceeds the matrix's smaller dimension the extra rows/columns are zero, so every module
    has the same rank. Small matrices use the exact SVD; large ones a randomized SVD with a fixed
    seed, so the result is deterministic.
    """
    if rank < 1:
        raise MergeError(f"rank must be >= 1, got {rank}")
    if delta.dim() != 2:
        raise MergeError(f"lowrank_factor expects a matrix, got shape {list(delta.shape)}")
    delta = delta.float()
    out_features, in_features = delta.shape
    k = min(rank, out_features, in_features)
    small_dim = min(out_features, in_features)
    q = min(k + SVD_OVERSAMPLE, small_dim)
    if small_dim <= EXACT_SVD_MAX_DIM or 2 * q >= small_dim:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        # svd_lowrank draws its random projection from the global RNG: seed a forked RNG so the
        # factors do not depend on (or disturb) whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SVD_SEED)
            u, s, v = torch.svd_lowrank(delta, q=q, niter=SVD_NITER)
        vh = v.T
    root = s[:k].sqrt()
    b = torch.zeros(out_features, rank)
    a = torch.zeros(rank, in_features)
    b[:, :k] = u[:, :k] * root
    a[:k, :] = root[:, None] * vh[:k, :]
    return a, b


def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise MergeError(f"density must be in (0, 1], got {density!r}")


def _check_same_shape(deltas: Sequence[torch.Tensor]) -> None:
    if not deltas:
        raise MergeError("nothing to merge: no deltas given")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise MergeError(f"deltas to merge must share one shape, got {sorted(shapes)}")


def _resolve_weights(weights: Sequence[float] | None, n: int, default: float) -> list[float]:
    if weights is None:
        return [default] * n
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} sources; give one weight per source")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise MergeError(f"weights must be finite numbers, got {list(weights)}")
    return [float(w) for w in weights]


# --------------------------------------------------------------------------------------------------
# Sources and plan
# --------------------------------------------------------------------------------------------------


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

    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    with safe_open(weights_file, framework="pt", device="cpu") as f:
        shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
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

    modules: dict[str, LoraModule] = {}
    for name in sorted(a_keys):
        a_shape, b_shape = shapes[a_keys[name]], shapes[b_keys[name]]
        rank = int(_pattern_value(rank_pattern, name, r))
        module_alpha = float(_pattern_value(alpha_pattern, name, alpha))
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise MergeError(
                f"{weights_file}: module {name} has lora_A {a_shape} and lora_B {b_shape}; expected "
                f"[{rank}, in] and [out, {rank}] (rank {rank} from {ADAPTER_CONFIG})"
            )
        modules[name] = LoraModule(
            a_key=a_keys[name],
            b_key=b_keys[name],
            rank=rank,
            out_features=b_shape[0],
            in_features=a_shape[1],
            scaling=lora_scaling(module_alpha, rank, use_rslora),
        )
    dtype_names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if len(dtypes) != 1 or next(iter(dtypes)) not in dtype_names:
        raise MergeError(f"{weights_file}: expected LoRA weights of one float dtype, found {sorted(dtypes)}")
    return LoraSource(
        path=path,
        config=config,
        r=r,
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        base_model=config.get("base_model_name_or_path"),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        dtype=dtype_names[next(iter(dtypes))],
        modules=modules,
    )


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


# --------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# --------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


class SafetensorsStreamWriter:
    """Writes a .safetensors file one tensor at a time, so the whole output never sits in memory.

    The header (which must come first) needs every tensor's offset, so tensor bytes go to a side
    file as they arrive and `close` writes the header, then copies them in. Tensors are laid out by
    decreasing item size so each one starts aligned to its dtype.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or {}
        self._side_path = self.path.with_name(self.path.name + ".data")
        self._side = open(self._side_path, "wb")  # closed in close()
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, start, size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise MergeError(f"{self.path}: tensor {name!r} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise MergeError(f"{self.path}: cannot store dtype {tensor.dtype} for {name!r}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        start = self._side.tell()
        self._side.write(memoryview(flat.numpy()))
        self._entries[name] = (_SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), start, flat.numel())

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        self._side.close()
        order = sorted(self._entries, key=lambda n: -_dtype_size(self._entries[n][0]))
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in order:
            dtype, shape, _, size = self._entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % 8)  # the format allows space padding; keeps data aligned
        with open(self.path, "wb") as out, open(self._side_path, "rb") as side:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            for name in order:
                _, _, start, size = self._entries[name]
                side.seek(start)
                while size > 0:
                    block = side.read(min(size, 1 << 24))
                    out.write(block)
                    size -= len(block)
            out.flush()
            os.fsync(out.fileno())
        self._side_path.unlink()
        return self.path.stat().st_size


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}[name]


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeSettings:
    method: str
    form: str
    density: float
    rank: int | None  # lowrank only
    weights: list[float]  # one per source, already resolved


@dataclass
class ModuleReport:
    shape: list[int]
    rel_error: float
    kept_energy: float
    params: int
    delta_norm: float
    error_norm: float


def delta_of(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One source's ΔW = scaling · B @ A in float32."""
    return (b.float() @ a.float()) * scaling


def execute(
    tasks: Sequence[ModuleTask],
    sources: Sequence[LoraSource],
    settings: MergeSettings,
    out_file: Path,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, ModuleReport]:
    """Merge module by module into the safetensors file `out_file`; returns a report per module.

    Only the current module's tensors are in memory at any time: every source's A and B, and a few
    out×in matrices (the sources' ΔW are formed one at a time, see `ties_merge_factored`).
    """
    dtype = sources[0].dtype
    fan_in_fan_out = sources[0].fan_in_fan_out
    reports: dict[str, ModuleReport] = {}
    writer = SafetensorsStreamWriter(out_file, metadata)
    with ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(src.weights_file, framework="pt", device="cpu")) for src in sources
        ]
        for task in tqdm(tasks, desc=f"merge ({settings.method}, {settings.form})", disable=not progress):
            a_list = [_load_factor(h, k, s) for h, k, s in zip(handles, task.a_keys, sources, strict=True)]
            b_list = [_load_factor(h, k, s) for h, k, s in zip(handles, task.b_keys, sources, strict=True)]
            factors = list(zip(a_list, b_list, task.scalings, strict=True))
            merged = merge_factored(settings.method, factors, settings.density, settings.weights)
            del factors
            if settings.form == "lowrank":
                assert settings.rank is not None
                a, b = lowrank_factor(merged, settings.rank)
                a, b = a.to(dtype), b.to(dtype)
                writer.add(task.a_keys[0], a)
                writer.add(task.b_keys[0], b)
                written = b.float() @ a.float()  # scaling 1 (lora_alpha = rank)
                params = a.numel() + b.numel()
            elif settings.form == "factor":
                a, b = _factor_merge(task, a_list, b_list, settings)
                a, b = a.to(dtype), b.to(dtype)
                writer.add(task.a_keys[0], a)
                writer.add(task.b_keys[0], b)
                written = delta_of(a, b, task.scalings[0])
                params = a.numel() + b.numel()
            else:
                stored = merged.to(dtype)
                base_layout = stored.T if fan_in_fan_out else stored  # Conv1D-style weights are in×out
                if settings.form == "dense":
                    writer.add(task.weight_name, base_layout)
                    params = stored.numel()
                else:
                    flat = base_layout.contiguous().reshape(-1)
                    indices = torch.nonzero(flat, as_tuple=True)[0]
                    index_dtype = torch.int32 if flat.numel() <= torch.iinfo(torch.int32).max else torch.int64
                    writer.add(f"{task.weight_name}.indices", indices.to(index_dtype))
                    writer.add(f"{task.weight_name}.values", flat[indices])
                    params = indices.numel()
                written = stored.float()
            del a_list, b_list
            reports[task.name] = _compare(merged, written, params)
            del merged, written
    writer.close()
    return reports


def _load_factor(handle: Any, key: str, source: LoraSource) -> torch.Tensor:
    tensor = handle.get_tensor(key).float()
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"{source.weights_file}: {key} holds NaN or infinite values; it cannot be merged")
    return tensor


def _factor_merge(
    task: ModuleTask, a_list: list[torch.Tensor], b_list: list[torch.Tensor], settings: MergeSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's merge: the method applied to the A's and to the B's separately.

    Like peft, source i's weight w_i and scaling s_i are folded into both factors as √(w_i s_i / s_out),
    where s_out (the first source's scaling) is the output adapter's scaling.
    """
    shapes = {(tuple(a.shape), tuple(b.shape)) for a, b in zip(a_list, b_list, strict=True)}
    if len(shapes) != 1:
        raise MergeError(
            f"form=factor needs the same rank in every source; module {task.name} has ranks {task.ranks}"
        )
    factor_weights = []
    for w, s in zip(settings.weights, task.scalings, strict=True):
        if w * s / task.scalings[0] <= 0:
            raise MergeError(f"form=factor needs positive weights (peft folds √weight into A and B), got {w}")
        factor_weights.append(math.sqrt(w * s / task.scalings[0]))
    a = merge_deltas(settings.method, a_list, settings.density, factor_weights)
    b = merge_deltas(settings.method, b_list, settings.density, factor_weights)
    return a, b


def _compare(merged: torch.Tensor, written: torch.Tensor, params: int) -> ModuleReport:
    """How far `written` is from `merged`. `written` is overwritten with the error (no extra matrix)
    unless it is `merged` itself (a float32 dense/sparse form), whose error is then 0."""
    delta_norm = float(torch.linalg.matrix_norm(merged))
    error_norm = 0.0 if written is merged else float(torch.linalg.matrix_norm(written.sub_(merged)))
    rel = error_norm / delta_norm if delta_norm > 0 else 0.0
    return ModuleReport(
        shape=list(merged.shape),
        rel_error=rel,
        kept_energy=1.0 - rel**2,
        params=params,
        delta_norm=delta_norm,
        error_norm=error_norm,
    )


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    out: Path
    method: str
    form: str
    density: float  # the density used (1.0 for linear: nothing is trimmed)
    rank: int | None  # rank of the written LoRA (None for dense/sparse)
    n_modules: int
    rel_error: float | None  # ||ΔW − written||_F / ||ΔW||_F over all modules, ΔW = the method's merge
    kept_energy: float | None  # 1 − rel_error²
    params: int  # stored weight values (for sparse: nonzeros)
    bytes: int  # size of the written tensor file
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeResult:
        return cls(**{**{k: d[k] for k in cls.__dataclass_fields__}, "out": Path(d["out"])})


def merge_adapters(
    sources: list[Path],
    out: Path,
    method: str = "ties",
    density: float = 0.2,
    rank: int | None = None,
    form: str = "lowrank",
    weights: list[float] | None = None,
    progress: bool = True,
) -> MergeResult:
    """Merge PEFT LoRA directories `sources` into the directory `out` (see the module docstring).

    `density` is TIES's kept fraction (ignored by linear); `weights` are per-source (TIES default 1,
    linear default 1/n); `rank` is the lowrank form's rank (default: the sources' largest r). One
    source is allowed for linear: lowrank then simply re-factors it (with weight 1 by default).
    A finished `out` is never redone: its recorded result is returned if it was made with the same
    request, and a different request is an error.
    """
    out = Path(out)
    sources = [Path(s) for s in sources]
    _validate_args(sources, method, density, rank, form)
    if artifacts.is_done(out):
        return _recorded_result(out, sources, method, form, density, rank, weights)
    started = time.perf_counter()
    srcs = [read_source(p) for p in sources]
    tasks = plan_merge(srcs)
    if form == "lowrank" and rank is None:
        rank = max(s.r for s in srcs)
    if form == "factor" and rank is not None and rank != srcs[0].r:
        raise MergeError(f"form=factor keeps the sources' rank {srcs[0].r}; got rank={rank}")
    if form == "factor":
        rank = srcs[0].r
    settings = MergeSettings(
        method=method,
        form=form,
        density=density if method == "ties" else 1.0,
        rank=rank,
        weights=_resolve_weights(weights, len(srcs), default=1.0 if method == "ties" else 1.0 / len(srcs)),
    )

    staging = artifacts.staging_dir(out)
    if form in ("lowrank", "factor"):
        out_file = staging / ADAPTER_WEIGHTS
        metadata = {"format": "pt"}
    else:
        out_file = staging / DELTA_WEIGHTS
        metadata = {"format": "pt", "datm_form": form}
    reports = execute(tasks, srcs, settings, out_file, metadata, progress)
    n_bytes = out_file.stat().st_size

    if form in ("lowrank", "factor"):
        artifacts.atomic_write_json(staging / ADAPTER_CONFIG, _adapter_config(srcs[0], form, rank))
    else:
        artifacts.atomic_write_json(staging / DELTA_CONFIG, _delta_config(srcs[0], form, tasks, reports))

    total_delta = sum(r.delta_norm**2 for r in reports.values())
    total_error = sum(r.error_norm**2 for r in reports.values())
    rel_error = math.sqrt(total_error / total_delta) if total_delta > 0 else 0.0
    result = MergeResult(
        out=out,
        method=method,
        form=form,
        density=settings.density,
        rank=rank if form in ("lowrank", "factor") else None,
        n_modules=len(tasks),
        rel_error=rel_error,
        kept_energy=1.0 - rel_error**2,
        params=sum(r.params for r in reports.values()),
        bytes=n_bytes,
        seconds=round(time.perf_counter() - started, 3),
    )
    info = {
        **result.to_dict(),
        "request": _request(sources, method, form, settings.density, rank, settings.weights),
        "weights": settings.weights,
        "base_model_name_or_path": srcs[0].base_model,
        "sources": [
            {
                "path": str(s.path.resolve()),
                "fingerprint": artifacts.fingerprint_files([s.weights_file]),
                "r": s.r,
                "lora_alpha": s.lora_alpha,
                "use_rslora": s.use_rslora,
            }
            for s in srcs
        ],
        "rel_error_means": _ERROR_MEANING[form],
        "svd": {
            "exact_max_min_dim": EXACT_SVD_MAX_DIM,
            "oversample": SVD_OVERSAMPLE,
            "niter": SVD_NITER,
            "seed": SVD_SEED,
        }
        if form == "lowrank"
        else None,
        "modules": {name: asdict(r) for name, r in reports.items()},
        "versions": artifacts.library_versions(),
    }
    artifacts.atomic_write_json(staging / MERGE_INFO, info)
    artifacts.publish_dir(staging, out)
    artifacts.mark_done(out, result.to_dict())
    return result


_ERROR_MEANING = {
    "lowrank": "truncated-SVD error of the rank-`rank` LoRA against the merged ΔW",
    "factor": "how far merging A and B separately lands from merging the true ΔW",
    "dense": "rounding error of the stored dtype against the merged ΔW (the error of ΔW as applied to the "
    "base in its serving dtype is measured when served: applied_rel_error in translations/<dir>.info.json)",
    "sparse": "rounding error of the stored dtype against the merged ΔW (the error of ΔW as applied to the "
    "base in its serving dtype is measured when served: applied_rel_error in translations/<dir>.info.json)",
}


def _validate_args(sources: list[Path], method: str, density: float, rank: int | None, form: str) -> None:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if form not in FORMS:
        raise MergeError(f"unknown output form {form!r}; expected one of {', '.join(FORMS)}")
    _check_density(density)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be an integer >= 1, got {rank!r}")
    if rank is not None and form in ("dense", "sparse"):
        raise MergeError(f"rank applies to form=lowrank only; form={form} stores the full ΔW")
    if not sources:
        raise MergeError("no sources to merge")
    if method == "ties" and len(sources) < 2:
        raise MergeError(
            f"TIES needs at least 2 sources, got {len(sources)} (method=linear can re-factor a single one)"
        )
    resolved = [str(p.resolve()) for p in sources]
    if len(set(resolved)) != len(resolved):
        raise MergeError(f"a source is listed twice: {[str(p) for p in sources]}")


def _request(
    sources: list[Path], method: str, form: str, density: float, rank: int | None, weights: list[float] | None
) -> dict[str, Any]:
    return {
        "sources": [str(p.resolve()) for p in sources],
        "method": method,
        "form": form,
        "density": density if method == "ties" else 1.0,
        "rank": rank,
        "weights": weights,
    }


def _recorded_result(
    out: Path,
    sources: list[Path],
    method: str,
    form: str,
    density: float,
    rank: int | None,
    weights: list[float] | None,
) -> MergeResult:
    """The finished merge in `out`, if it answers this request (unset rank/weights match anything)."""
    info_file = out / MERGE_INFO
    if not info_file.is_file():
        raise MergeError(
            f"{out} is marked finished but has no {MERGE_INFO}; it was not made by merge_adapters"
        )
    info = artifacts.read_json(info_file)
    recorded = info["request"]
    asked = _request(sources, method, form, density, rank, weights)
    for key, value in asked.items():
        if value is None and key in ("rank", "weights"):
            continue  # defaults: whatever was resolved then
        if value != recorded[key]:
            raise MergeError(
                f"{out} is already a finished merge with {key}={recorded[key]!r}, but {key}={value!r} "
                "was asked; choose another output directory (finished artifacts are never overwritten)"
            )
    return MergeResult.from_dict(info)


def _adapter_config(first: LoraSource, form: str, rank: int | None) -> dict[str, Any]:
    config = dict(first.config)
    if form == "lowrank":
        # The SVD factors already hold the whole ΔW (B A = ΔW), so the adapter's scaling must be 1:
        # lora_alpha = r without rsLoRA, and no per-module patterns.
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    config["inference_mode"] = True
    return config


def _delta_config(
    first: LoraSource, form: str, tasks: Sequence[ModuleTask], reports: dict[str, ModuleReport]
) -> dict[str, Any]:
    modules = []
    for task in tasks:
        shape = [task.out_features, task.in_features]
        entry: dict[str, Any] = {
            "module": task.name,
            "weight": task.weight_name,
            "shape": shape[::-1] if first.fan_in_fan_out else shape,
        }
        if form == "sparse":
            entry["nnz"] = reports[task.name].params
        modules.append(entry)
    return {"form": form, "base_model_name_or_path": first.base_model, "modules": modules}


# --------------------------------------------------------------------------------------------------
# Using dense / sparse deltas
# --------------------------------------------------------------------------------------------------


def iter_delta(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (base weight name, dense float32 ΔW) of a dense or sparse delta directory, one at a time."""
    path = Path(path)
    config_file = path / DELTA_CONFIG
    if not config_file.is_file():
        raise MergeError(f"{path}: not a datm delta directory (no {DELTA_CONFIG})")
    config = artifacts.read_json(config_file)
    form = config.get("form")
    if form not in ("dense", "sparse"):
        raise MergeError(f"{config_file}: 'form' must be 'dense' or 'sparse', got {form!r}")
    with safe_open(path / DELTA_WEIGHTS, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for entry in config["modules"]:
            name, shape = entry["weight"], list(entry["shape"])
            wanted = [name] if form == "dense" else [f"{name}.indices", f"{name}.values"]
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise MergeError(
                    f"{path / DELTA_WEIGHTS}: no tensor {missing[0]!r} ({DELTA_CONFIG} lists it)"
                )
            if form == "dense":
                delta = f.get_tensor(name).float()
            else:
                flat = torch.zeros(math.prod(shape), dtype=torch.float32)
                flat[f.get_tensor(f"{name}.indices").long()] = f.get_tensor(f"{name}.values").float()
                delta = flat.reshape(shape)
            if list(delta.shape) != shape:
                raise MergeError(f"{path / DELTA_WEIGHTS}: {name} is {list(delta.shape)}, expected {shape}")
            yield name, delta


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    """Dense float32 ΔW per base weight name of a dense or sparse delta directory."""
    return dict(iter_delta(path))


class AppliedDelta:
    """A delta directory added to a model's weights; `restore` puts the original weights back.

    Exact by construction: each touched weight W is copied (to the CPU, so no accelerator memory is
    spent on it) before it becomes cast(W + ΔW), the sum formed in float32 and rounded once to W's
    dtype, and `restore` copies the saved W back bit for bit. Subtracting ΔW again would not be exact
    in low precision (bf16 rounding drifts the base a little with every pass), and adding ΔW as an
    extra output term would not compute the same function as a model with the merged weights.

    `rel_error` is ‖ΔW as applied − ΔW‖_F / ‖ΔW‖_F over all touched weights, where ΔW as applied is
    cast(W + ΔW) − W: what rounding to the serving dtype does to the merged module (≈0 in float32,
    often large in bf16 where ‖ΔW‖ is small against ‖W‖).
    """

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.path = Path(path)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        delta_sq = error_sq = 0.0
        with torch.no_grad():
            try:
                for name, delta in iter_delta(self.path):
                    weight = _find_weight(model, name)
                    if list(weight.shape) != list(delta.shape):
                        raise MergeError(
                            f"{self.path}: delta {name} has shape {list(delta.shape)} but the model's is "
                            f"{list(weight.shape)}"
                        )
                    original = weight.detach().to("cpu", copy=True)
                    self._saved.append((weight, original))
                    delta = delta.to(weight.device)
                    weight.copy_((weight.float() + delta).to(weight.dtype))
                    applied_error = weight.float() - original.to(weight.device).float() - delta
                    delta_sq += float(torch.linalg.vector_norm(delta)) ** 2
                    error_sq += float(torch.linalg.vector_norm(applied_error)) ** 2
                    del delta, applied_error
            except BaseException:
                self.restore()
                raise
        self.rel_error = math.sqrt(error_sq / delta_sq) if delta_sq > 0 else 0.0

    def restore(self) -> None:
        """Put back every weight this delta touched, exactly as it was."""
        with torch.no_grad():
            for weight, original in self._saved:
                weight.copy_(original.to(weight.device))
        self._saved = []

    def __enter__(self) -> AppliedDelta:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def apply_delta(model: torch.nn.Module, path: Path) -> AppliedDelta:
    """Add a delta directory to `model`'s weights in place until `.restore()` (or the end of a
    ``with`` block); see `AppliedDelta`.

    Works on a plain transformers model and on a PEFT-wrapped one (modules under
    ``base_model.model.``, LoRA layers keeping the original weight in ``base_layer``).
    """
    return AppliedDelta(model, path)


def _find_weight(model: torch.nn.Module, weight_name: str) -> torch.Tensor:
    module_name = weight_name.removesuffix(".weight")
    for prefix in ("", PEFT_PREFIX):
        try:
            module = model.get_submodule(prefix + module_name)
        except AttributeError:
            continue
        while hasattr(module, "base_layer"):  # peft's LoRA layer wraps the original layer
            module = module.base_layer
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
    raise MergeError(
        f"model has no weight {weight_name} (nor {PEFT_PREFIX}{weight_name}) to add the delta to"
    )
