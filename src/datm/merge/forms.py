"""The forms a merged module is written in: one registered class per form.

A `Form` knows how to write one module of the merge, its size in parameters and bytes, what the
error it records means, how it is recognised on disk and how it is applied at translation (as a
LoRA through peft, or as a delta added to the base weights). Adding a form = one class here with
`@register`; merge, config, the CLI, the plan and translate look forms up here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from datm import artifacts
from datm.config import names
from datm.log import get_logger
from datm.merge.base import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DELTA_CONFIG,
    DELTA_WEIGHTS,
    MERGE_INFO,
    MergeError,
)
from datm.plan import Plan

if TYPE_CHECKING:
    import torch

    from datm.merge.io import SafetensorsStreamWriter
    from datm.merge.methods import Merged, Method, MethodSettings
    from datm.merge.sources import LoraSource, ModuleTask

LORA = "lora"  # applied through peft, side by side with other adapters
DELTA = "delta"  # added to the base weights for the batches that use it
INDEX_BYTES = 4  # a sparse entry's int32 flat index

log = get_logger(__name__)


class Form:
    name: ClassVar[str]
    applied_as: ClassVar[str]  # LORA or DELTA
    weights_file: ClassVar[str]
    error_meaning: ClassVar[str]  # what the recorded rel_error measures
    has_rank: ClassVar[bool] = False  # a LoRA whose rank is set by the merge
    size_is_bound: ClassVar[bool] = False  # `parameters` is an upper bound, known exactly after merging

    def resolve_rank(self, rank: int | None, sources: Sequence[LoraSource], method: Method) -> int | None:
        if rank is not None:
            raise MergeError(f"rank applies to form=lowrank only; form={self.name} stores the full ΔW")
        return None

    def metadata(self) -> dict[str, str]:
        return {"format": "pt"}

    def write(
        self,
        writer: SafetensorsStreamWriter,
        task: ModuleTask,
        merged: Merged,
        factors: list[tuple[torch.Tensor, torch.Tensor, float]],
        job: FormJob,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write one module; returns (ΔW merged, ΔW as written, stored parameters), both float32."""
        raise NotImplementedError

    def write_config(
        self, staging: Path, job: FormJob, tasks: Sequence[ModuleTask], params: dict[str, int]
    ) -> None:
        raise NotImplementedError

    def parameters(self, lowrank_params: int, dense_params: int, density: float, n_sources: int) -> int:
        """Stored values of one merged module, from a LoRA's and the full weights' counts."""
        raise NotImplementedError

    def bytes(self, params: int, value_bytes: int) -> int:
        """Stored bytes of `params` values of `value_bytes` each."""
        return params * value_bytes

    def recognise(self, path: Path) -> bool:
        raise NotImplementedError


class FormJob:
    """What a form needs to know about the whole merge."""

    def __init__(
        self,
        method: Method,
        settings: MethodSettings,
        weights: list[float],
        rank: int | None,
        first: LoraSource,
    ) -> None:
        self.method, self.settings, self.weights, self.rank, self.first = (
            method,
            settings,
            weights,
            rank,
            first,
        )


FORMS: dict[str, Form] = {}


def register(cls: type[Form]) -> type[Form]:
    FORMS[cls.name] = cls()
    return cls


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise MergeError(f"unknown output form {name!r}; expected one of {', '.join(FORMS)}")
    return FORMS[name]


def form_on_disk(path: Path) -> Form | None:
    """The form of the merged module at `path`, or None for a trained (unmerged) PEFT adapter."""
    for form in FORMS.values():
        if form.recognise(Path(path)):
            return form
    return None


def applied_as(path: Path) -> str:
    """How the module at `path` is applied at translation: LORA or DELTA."""
    path = Path(path)
    form = form_on_disk(path)
    if form is not None:
        return form.applied_as
    if (path / ADAPTER_CONFIG).is_file():
        return LORA
    raise MergeError(f"module {path} is neither a PEFT adapter ({ADAPTER_CONFIG}) nor a datm delta")


class _LoraForm(Form):
    applied_as = LORA
    weights_file = ADAPTER_WEIGHTS

    def recognise(self, path: Path) -> bool:
        info = path / MERGE_INFO
        return (
            (path / ADAPTER_CONFIG).is_file()
            and info.is_file()
            and artifacts.read_json(info).get("form") == self.name
        )

    def parameters(self, lowrank_params: int, dense_params: int, density: float, n_sources: int) -> int:
        return lowrank_params

    def write_config(
        self, staging: Path, job: FormJob, tasks: Sequence[ModuleTask], params: dict[str, int]
    ) -> None:
        config = dict(job.first.config)
        config.update(self.config_changes(job.rank))
        config["inference_mode"] = True
        artifacts.atomic_write_json(staging / ADAPTER_CONFIG, config)

    def config_changes(self, rank: int | None) -> dict[str, Any]:
        return {}


@register
class LowRankForm(_LoraForm):
    """The merged ΔW re-factored to a LoRA of rank `rank` by truncated SVD (a PEFT adapter)."""

    name = "lowrank"
    has_rank = True
    error_meaning = "truncated-SVD error of the rank-`rank` LoRA against the merged ΔW"

    def resolve_rank(self, rank: int | None, sources: Sequence[LoraSource], method: Method) -> int | None:
        ranks = [s.r for s in sources]
        rank = rank if rank is not None else method.default_rank(ranks)
        bound = method.max_rank(ranks)
        if bound is not None and rank > bound:
            log.info(
                "%s's ΔW has rank <= %d (the sources' ranks summed): rank %d ships as %d, exact",
                method.name,
                bound,
                rank,
                bound,
            )
            return bound
        return rank

    def write(self, writer, task, merged, factors, job):  # type: ignore[no-untyped-def]
        import torch

        from datm.merge.methods import dense_of
        from datm.merge.ops import lowrank_factor

        assert job.rank is not None
        dtype = job.first.dtype
        if isinstance(merged, torch.Tensor):
            a, b = lowrank_factor(merged, job.rank)
        else:  # a low-rank result: its own factors, no SVD of a dense matrix
            a, b = merged.factors(job.rank)
        a, b = a.to(dtype), b.to(dtype)
        writer.add(task.a_keys[0], a)
        writer.add(task.b_keys[0], b)
        return dense_of(merged), b.float() @ a.float(), a.numel() + b.numel()  # scaling 1

    def config_changes(self, rank: int | None) -> dict[str, Any]:
        # The SVD factors already hold the whole ΔW (B A = ΔW), so the adapter's scaling must be 1:
        # lora_alpha = r without rsLoRA, and no per-module patterns.
        return dict(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})


@register
class FactorForm(_LoraForm):
    """peft's behaviour: the method applied to the A and B matrices separately (kept for comparison)."""

    name = "factor"
    has_rank = True
    error_meaning = "how far merging A and B separately lands from merging the true ΔW"

    def resolve_rank(self, rank: int | None, sources: Sequence[LoraSource], method: Method) -> int | None:
        if rank is not None and rank != sources[0].r:
            raise MergeError(f"form=factor keeps the sources' rank {sources[0].r}; got rank={rank}")
        return sources[0].r

    def write(self, writer, task, merged, factors, job):  # type: ignore[no-untyped-def]
        """Like peft, source i's weight w_i and scaling s_i are folded into both factors as
        √(w_i s_i / s_out), where s_out (the first source's scaling) is the output adapter's. The
        global scale λ multiplies the merged A (so B A is λ times the merge at λ 1)."""
        import torch

        from datm.merge.methods import dense_of
        from datm.merge.ops import delta_of

        shapes = {(tuple(a.shape), tuple(b.shape)) for a, b, _ in factors}
        if len(shapes) != 1:
            raise MergeError(
                f"form=factor needs the same rank in every source; module {task.name} has ranks {task.ranks}"
            )
        weights = []
        for w, s in zip(job.weights, task.scalings, strict=True):
            if w * s / task.scalings[0] <= 0:
                raise MergeError(
                    f"form=factor needs positive weights (peft folds √weight into A and B), got {w}"
                )
            weights.append(math.sqrt(w * s / task.scalings[0]))
        eye = torch.eye(factors[0][0].shape[0])
        # The method on the A's (and B's) alone: each as a "ΔW" I @ A_i (B_i @ I), exact in float32.
        a = dense_of(job.method.merge([(f[0], eye, 1.0) for f in factors], weights, job.settings))
        b = dense_of(job.method.merge([(eye, f[1], 1.0) for f in factors], weights, job.settings))
        a = a.mul_(job.settings.scale)
        a, b = a.to(job.first.dtype), b.to(job.first.dtype)
        writer.add(task.a_keys[0], a)
        writer.add(task.b_keys[0], b)
        return dense_of(merged), delta_of(a, b, task.scalings[0]), a.numel() + b.numel()


class DeltaForm(Form):
    applied_as = DELTA
    weights_file = DELTA_WEIGHTS
    error_meaning = (
        "rounding error of the stored dtype against the merged ΔW (the error of ΔW as applied to the base "
        "in its serving dtype is measured when served: applied_rel_error in translations/<dir>.info.json)"
    )

    def metadata(self) -> dict[str, str]:
        return {"format": "pt", "datm_form": self.name}

    def recognise(self, path: Path) -> bool:
        config = path / DELTA_CONFIG
        return config.is_file() and artifacts.read_json(config).get("form") == self.name

    def write(self, writer, task, merged, factors, job):  # type: ignore[no-untyped-def]
        from datm.merge.methods import dense_of

        merged = dense_of(merged)
        stored = merged.to(job.first.dtype)
        base_layout = stored.T if job.first.fan_in_fan_out else stored  # Conv1D-style weights are in×out
        params = self.store(writer, task.weight_name, base_layout)
        return merged, stored.float(), params  # in float32 `stored.float()` is `merged` itself: error 0

    def store(self, writer: SafetensorsStreamWriter, name: str, delta: torch.Tensor) -> int:
        raise NotImplementedError

    def read(self, handle: Any, name: str, shape: list[int]) -> torch.Tensor:
        """The dense float32 ΔW of weight `name` from the open delta file."""
        raise NotImplementedError

    def tensor_names(self, name: str) -> list[str]:
        raise NotImplementedError

    def write_config(
        self, staging: Path, job: FormJob, tasks: Sequence[ModuleTask], params: dict[str, int]
    ) -> None:
        modules = []
        for task in tasks:
            shape = [task.out_features, task.in_features]
            entry: dict[str, Any] = {
                "module": task.name,
                "weight": task.weight_name,
                "shape": shape[::-1] if job.first.fan_in_fan_out else shape,
            }
            entry.update(self.config_entry(params[task.name]))
            modules.append(entry)
        config = {"form": self.name, "base_model_name_or_path": job.first.base_model, "modules": modules}
        artifacts.atomic_write_json(staging / DELTA_CONFIG, config)

    def config_entry(self, params: int) -> dict[str, Any]:
        return {}


@register
class DenseForm(DeltaForm):
    """ΔW per touched base weight, added to the base at translation."""

    name = "dense"

    def store(self, writer: SafetensorsStreamWriter, name: str, delta: torch.Tensor) -> int:
        writer.add(name, delta)
        return delta.numel()

    def tensor_names(self, name: str) -> list[str]:
        return [name]

    def read(self, handle: Any, name: str, shape: list[int]) -> torch.Tensor:
        return handle.get_tensor(name).float()

    def parameters(self, lowrank_params: int, dense_params: int, density: float, n_sources: int) -> int:
        return dense_params


@register
class SparseForm(DeltaForm):
    """ΔW's nonzero entries as flat int32 indices + values; TIES keeps at most density × sources
    of the entries, so the planned size is an upper bound."""

    name = "sparse"
    size_is_bound = True

    def store(self, writer: SafetensorsStreamWriter, name: str, delta: torch.Tensor) -> int:
        import torch

        flat = delta.contiguous().reshape(-1)
        indices = torch.nonzero(flat, as_tuple=True)[0]
        index_dtype = torch.int32 if flat.numel() <= torch.iinfo(torch.int32).max else torch.int64
        writer.add(f"{name}.indices", indices.to(index_dtype))
        writer.add(f"{name}.values", flat[indices])
        return indices.numel()

    def tensor_names(self, name: str) -> list[str]:
        return [f"{name}.indices", f"{name}.values"]

    def read(self, handle: Any, name: str, shape: list[int]) -> torch.Tensor:
        import torch

        flat = torch.zeros(math.prod(shape), dtype=torch.float32)
        flat[handle.get_tensor(f"{name}.indices").long()] = handle.get_tensor(f"{name}.values").float()
        return flat.reshape(shape)

    def config_entry(self, params: int) -> dict[str, Any]:
        return {"nnz": params}

    def parameters(self, lowrank_params: int, dense_params: int, density: float, n_sources: int) -> int:
        return int(min(1.0, density * n_sources) * dense_params)

    def bytes(self, params: int, value_bytes: int) -> int:
        return params * (value_bytes + INDEX_BYTES)


names.check_registry("merge form", names.MERGE_FORMS, FORMS)


def merged_module_parameters(
    plan: Plan, form: str, lowrank_params: int, dense_params: int, density: float
) -> dict[str, int]:
    """Stored parameters of each merged module of a plan under a merge form (a form
    whose size is known only after merging, as sparse, gives an upper bound)."""
    merge_form = get_form(form)
    return {
        m.name: merge_form.parameters(lowrank_params, dense_params, density, len(m.sources))
        for m in plan.merges
    }
