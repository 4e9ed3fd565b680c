"""What every part of the merge package shares, with no heavy imports: the error type and the
names of the files merged modules are made of."""

from __future__ import annotations

from datm.errors import DatmError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DELTA_CONFIG = "delta_config.json"
DELTA_WEIGHTS = "delta.safetensors"
MERGE_INFO = "merge_info.json"


class MergeError(DatmError):
    """Bad merge input: unreadable or inconsistent sources, or bad arguments."""
