"""Merge PEFT LoRA adapters into one module (TIES, linear, ... on the true weight deltas).

The package, along its seams:

- `ops`: the math (trim, TIES — factored, the production path, and dense, the test oracle —,
  linear, the truncated-SVD re-factoring);
- `sources`: reading PEFT directories (configs and safetensors headers) and planning one
  `ModuleTask` per LoRA module;
- `io`: the streaming safetensors writer;
- `methods`: merge methods, one registered class each, with one interface on a module's factored
  sources: ``apply(factors, weights, settings) -> ΔW`` where factors = [(A_i, B_i, s_i)],
  ΔW_i = s_i · B_i @ A_i, and settings carry the density, a seed derived per module
  (`derive_seed(seed, module name)`), the global scale λ (every method's merged ΔW is multiplied
  by it, exactly) and, for ties and dare_ties, whether the agreeing entries are averaged or summed.
  A method returns a dense float32 ΔW or a low-rank result (``.factors(k)``, ``.dense()``, e.g. a
  thin SVD `LowRank`), which the lowrank form writes without a dense SVD. New methods are small
  classes with `@register`; the SVD-based ones' math is in `recent`, the factorizations and SVD
  building blocks both use in `lowrank` (so `methods` and `recent` never import each other);
- `forms`: the forms a merged ΔW is written in (lowrank, factor, dense, sparse), one registered
  class each: how it is written, its size in parameters and bytes, the error it records, how it is
  recognised on disk and how it is applied at translation (LoRA through peft, or a delta);
- `delta`: applying delta forms to a model's weights and restoring them exactly.

What to do is planned apart from doing it (as mergekit does): `plan_merge` returns one small
`ModuleTask` per module; `execute` then streams the modules one by one, loading each source's A and
B for that module alone, merging, writing the result and dropping it before the next. Each source's
dense ΔW is formed from its factors only while it is used, so peak memory is the module's small
factors plus about four of its out×in matrices, whatever the model size and the number of sources.
Every form records in ``merge_info.json`` how far what it wrote is from the merged ΔW.

The public names below are resolved on first use (module `__getattr__`), so that importing the
light registries (`datm.merge.forms`, `datm.merge.methods`) from the config and the CLI does not
load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from datm.merge.base import MergeError

_WHERE = {
    "merge_adapters": "api",
    "MergeResult": "api",
    "ModuleReport": "api",
    "execute": "api",
    "FORMS": "forms",
    "Form": "forms",
    "get_form": "forms",
    "METHODS": "methods",
    "Method": "methods",
    "get_method": "methods",
    "LowRank": "lowrank",
    "derive_seed": "base",
    "AppliedDelta": "delta",
    "apply_delta": "delta",
    "iter_delta": "delta",
    "load_delta": "delta",
    "trim": "ops",
    "ties_merge": "ops",
    "ties_merge_factored": "ops",
    "linear_merge": "ops",
    "linear_merge_factored": "ops",
    "lowrank_factor": "ops",
    "delta_of": "ops",
    "read_source": "sources",
    "plan_merge": "sources",
    "SafetensorsStreamWriter": "io",
}

__all__ = ["MergeError", *_WHERE]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"datm.merge.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'datm.merge' has no attribute {name!r}")
