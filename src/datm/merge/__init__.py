"""Merging PEFT LoRA adapters: the package and its public names.

The public entry point is `merge_adapters` (in `api`, with its provenance); the package docstring of
`datm.merge.api` maps the parts (ops, sources, io, methods, forms, delta). Names are resolved on
first use, so that importing the light registries (`datm.merge.forms`, `datm.merge.methods`) from
the config and the CLI does not load torch.
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
    "LowRank": "methods",
    "derive_seed": "methods",
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
