"""`merge_adapters`: plan the module tasks, merge them one by one, write the form, record provenance
(see the package docstring of `datm.merge`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from datm import artifacts
from datm.log import is_main_process
from datm.merge.base import MERGE_INFO, MergeError, derive_seed
from datm.merge.forms import Form, FormJob, LowRankForm, get_form
from datm.merge.io import SafetensorsStreamWriter
from datm.merge.methods import Method, MethodSettings, get_method
from datm.merge.ops import (
    EXACT_SVD_MAX_DIM,
    SVD_NITER,
    SVD_OVERSAMPLE,
    SVD_SEED,
    check_density,
    resolve_weights,
)
from datm.merge.sources import LoraSource, ModuleTask, load_factor, plan_merge, read_source

MERGE_SEED = 0  # the seed methods that draw random numbers derive their per-module seeds from


@dataclass
class ModuleReport:
    shape: list[int]
    rel_error: float
    kept_energy: float
    params: int
    delta_norm: float
    error_norm: float


def execute(
    tasks: Sequence[ModuleTask],
    sources: Sequence[LoraSource],
    form: Form,
    job: FormJob,
    out_file: Path,
    progress: bool = True,
) -> dict[str, ModuleReport]:
    """Merge module by module into the safetensors file `out_file`; returns a report per module.

    Only the current module's tensors are in memory at any time: every source's A and B, and a few
    out×in matrices (the sources' ΔW are formed one at a time, see `ties_merge_factored`).
    """
    reports: dict[str, ModuleReport] = {}
    writer = SafetensorsStreamWriter(out_file, form.metadata())
    with ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(src.weights_file, framework="pt", device="cpu")) for src in sources
        ]
        show = progress and is_main_process()  # one bar, not one per process of a launcher
        for task in tqdm(tasks, desc=f"merge ({job.method.name}, {form.name})", disable=not show):
            a_list = [load_factor(h, k, s) for h, k, s in zip(handles, task.a_keys, sources, strict=True)]
            b_list = [load_factor(h, k, s) for h, k, s in zip(handles, task.b_keys, sources, strict=True)]
            factors = list(zip(a_list, b_list, task.scalings, strict=True))
            settings = replace(job.settings, seed=derive_seed(job.settings.seed, task.name))
            module_job = FormJob(job.method, settings, job.weights, job.rank, job.first)
            result = job.method.apply(factors, job.weights, settings)  # λ · the method's merge
            merged, written, params = form.write(writer, task, result, factors, module_job)
            del a_list, b_list, factors, result
            reports[task.name] = _compare(merged, written, params)
            del merged, written
    writer.close()
    return reports


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
    scale: float = 1.0  # the global scale λ the merged ΔW was multiplied by
    normalize: bool | None = None  # TIES family: mean (True) or sum of the agreeing entries; None: other

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeResult:
        # merges recorded before `scale` and `normalize` existed were made at λ 1 with the defaults
        return cls(**{**{k: d[k] for k in cls.__dataclass_fields__ if k in d}, "out": Path(d["out"])})


def merge_adapters(
    sources: list[Path],
    out: Path,
    method: str = "ties",
    density: float = 0.2,
    rank: int | None = None,
    form: str = "lowrank",
    weights: list[float] | None = None,
    progress: bool = True,
    scale: float = 1.0,
    normalize: bool | None = None,
) -> MergeResult:
    """Merge PEFT LoRA directories `sources` into the directory `out` (see the module docstring).

    `density` is TIES's kept fraction (ignored by linear); `weights` are per-source (TIES default 1,
    linear default 1/n); `rank` is the lowrank form's rank (default: the sources' largest r); `scale`
    is the global λ every method's merged ΔW is multiplied by (exactly; > 0, default 1); `normalize`
    chooses the agreeing entries' mean (True) or sum (False) for ties and dare_ties (None: the
    method's paper — ties the mean, dare_ties the sum). One source is allowed for linear: lowrank
    then simply re-factors it (with weight 1 by default).
    A finished `out` is never redone: its recorded result is returned if it was made with the same
    request, and a different request is an error.
    """
    out = Path(out)
    sources = [Path(s) for s in sources]
    merge_method, merge_form = _validate_args(sources, method, density, rank, form)
    settings = _resolve_settings(merge_method, density, scale, normalize)
    request = _request(sources, method, form, settings, rank, weights)
    if artifacts.is_done(out):
        return _recorded_result(out, request)
    started = time.perf_counter()
    srcs = [read_source(p) for p in sources]
    tasks = plan_merge(srcs)
    asked_rank, rank = rank, merge_form.resolve_rank(rank, srcs, merge_method)
    default_weight = merge_method.default_weight(len(srcs))
    job = FormJob(
        method=merge_method,
        settings=settings,
        weights=resolve_weights(weights, len(srcs), default=default_weight),
        rank=rank,
        first=srcs[0],
    )

    staging = artifacts.staging_dir(out)
    out_file = staging / merge_form.weights_file
    reports = execute(tasks, srcs, merge_form, job, out_file, progress)
    n_bytes = out_file.stat().st_size
    merge_form.write_config(staging, job, tasks, {name: r.params for name, r in reports.items()})
    result = _merge_result(out, method, form, job, len(tasks), reports, n_bytes, started)
    info = _merge_info(result, request, asked_rank, job, srcs, merge_form, reports)
    artifacts.atomic_write_json(staging / MERGE_INFO, info)
    artifacts.publish_dir(staging, out)
    artifacts.mark_done(out, result.to_dict())
    return result


def _resolve_settings(
    merge_method: Method, density: float, scale: float, normalize: bool | None
) -> MethodSettings:
    """The settings the merge runs with and records, once `merge_method` has checked them: density 1.0
    for a method that trims nothing, the scale as a float, and `normalize` resolved to the method's
    choice (None for a method without one)."""
    settings = MethodSettings(density=density, seed=MERGE_SEED, scale=scale, normalize=normalize)
    merge_method.check_settings(settings)
    return replace(
        settings,
        density=density if merge_method.uses_density else 1.0,
        scale=float(scale),
        normalize=merge_method.normalize(settings) if merge_method.normalize_default is not None else None,
    )


def _merge_result(
    out: Path,
    method: str,
    form: str,
    job: FormJob,
    n_modules: int,
    reports: dict[str, ModuleReport],
    n_bytes: int,
    started: float,
) -> MergeResult:
    """The merge's summary: the modules' errors combined over all modules, and the time since `started`."""
    total_delta = sum(r.delta_norm**2 for r in reports.values())
    total_error = sum(r.error_norm**2 for r in reports.values())
    rel_error = math.sqrt(total_error / total_delta) if total_delta > 0 else 0.0
    return MergeResult(
        out=out,
        method=method,
        form=form,
        density=job.settings.density,
        rank=job.rank,
        n_modules=n_modules,
        rel_error=rel_error,
        kept_energy=1.0 - rel_error**2,
        params=sum(r.params for r in reports.values()),
        bytes=n_bytes,
        seconds=round(time.perf_counter() - started, 3),
        scale=job.settings.scale,
        normalize=job.settings.normalize,
    )


def _merge_info(
    result: MergeResult,
    request: dict[str, Any],
    asked_rank: int | None,
    job: FormJob,
    srcs: list[LoraSource],
    merge_form: Form,
    reports: dict[str, ModuleReport],
) -> dict[str, Any]:
    """The provenance written to MERGE_INFO: the result, the request as asked, the sources (with their
    fingerprints), the SVD settings of the lowrank form, and every module's report."""
    return {
        **result.to_dict(),
        "request": {**request, "rank": asked_rank, "weights": job.weights},
        "weights": job.weights,
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
        "rel_error_means": merge_form.error_meaning,
        "svd": {
            "exact_max_min_dim": EXACT_SVD_MAX_DIM,
            "oversample": SVD_OVERSAMPLE,
            "niter": SVD_NITER,
            "seed": SVD_SEED,
        }
        if result.form == LowRankForm.name
        else None,
        "seed": MERGE_SEED,
        "modules": {name: asdict(r) for name, r in reports.items()},
        "versions": artifacts.library_versions(),
    }


def _validate_args(
    sources: list[Path], method: str, density: float, rank: int | None, form: str
) -> tuple[Method, Form]:
    merge_method, merge_form = get_method(method), get_form(form)
    check_density(density)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise MergeError(f"rank must be an integer >= 1, got {rank!r}")
    if rank is not None and not merge_form.has_rank:
        raise MergeError(f"rank applies to form=lowrank only; form={form} stores the full ΔW")
    if not sources:
        raise MergeError("no sources to merge")
    if len(sources) < merge_method.min_sources:
        raise MergeError(
            f"{merge_method.title} needs at least {merge_method.min_sources} "
            f"sources, got {len(sources)} (method=linear can re-factor a single one)"
        )
    resolved = [str(p.resolve()) for p in sources]
    if len(set(resolved)) != len(resolved):
        raise MergeError(f"a source is listed twice: {[str(p) for p in sources]}")
    return merge_method, merge_form


def _request(
    sources: list[Path],
    method: str,
    form: str,
    settings: MethodSettings,
    rank: int | None,
    weights: list[float] | None,
) -> dict[str, Any]:
    return {
        "sources": [str(p.resolve()) for p in sources],
        "method": method,
        "form": form,
        "density": settings.density,
        "rank": rank,
        "weights": weights,
        "scale": settings.scale,
        "normalize": settings.normalize,
    }


def _as_made(request: dict[str, Any]) -> dict[str, Any]:
    """A recorded request in today's terms: one recorded before `scale` (issue 24) was made at λ 1,
    ties and dare_ties with the agreeing entries' mean, and its iso_c is today's iso_c_core."""
    if "scale" in request:
        return request
    method = "iso_c_core" if request["method"] == "iso_c" else request["method"]
    normalize = True if method in ("ties", "dare_ties") else None
    return {**request, "method": method, "scale": 1.0, "normalize": normalize}


def _recorded_result(out: Path, asked: dict[str, Any]) -> MergeResult:
    """The finished merge in `out`, if it answers this request (unset rank/weights match anything)."""
    info_file = out / MERGE_INFO
    if not info_file.is_file():
        raise MergeError(
            f"{out} is marked finished but has no {MERGE_INFO}; it was not made by merge_adapters"
        )
    info = artifacts.read_json(info_file)
    recorded = _as_made(info["request"])
    for key, value in asked.items():
        if value is None and key in ("rank", "weights"):
            continue  # defaults: whatever was resolved then
        if value != recorded[key]:
            raise MergeError(
                f"{out} is already a finished merge with {key}={recorded[key]!r}, but {key}={value!r} "
                "was asked; choose another output directory (finished artifacts are never overwritten)"
            )
    return MergeResult.from_dict(info)
