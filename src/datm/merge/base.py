"""What every part of the merge package shares, with no heavy imports: the error type, the names
of the files merged modules are made of, and the per-module seed rule."""

from __future__ import annotations

import hashlib

from datm.errors import DatmError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DELTA_CONFIG = "delta_config.json"
DELTA_WEIGHTS = "delta.safetensors"
MERGE_INFO = "merge_info.json"


class MergeError(DatmError):
    """Bad merge input: unreadable or inconsistent sources, or bad arguments."""


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (e.g. the run's seed and a module name)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1
