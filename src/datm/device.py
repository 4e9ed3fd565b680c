"""The one place that picks the device and the dtypes a process computes in.

Under `accelerate launch` (and FSDP / DeepSpeed through it) every process gets its own GPU; under
Ray a task sees the GPUs it was given (CUDA_VISIBLE_DEVICES); otherwise the first GPU, else the CPU.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def current() -> torch.device:
    """This process's device: accelerate's choice (cuda:LOCAL_RANK, mps, or cpu)."""
    from accelerate import PartialState

    return PartialState().device


def _cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (its first processor's), or None."""
    text = _cpuinfo()
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE) if text is not None else None
    return match.group(1).strip() if match else None


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it ('unknown' where it does not)."""
    if _cpuinfo() is None:
        return platform.processor() or "unknown"
    return _cpuinfo_field("model name") or "unknown"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86: avx2, avx512_bf16, amx_bf16, ...); empty where unknown."""
    flags = _cpuinfo_field("flags")
    return set(flags.split()) if flags else set()


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def pick_precision(precision: str, device: torch.device) -> str:
    """'bf16' or 'no' for accelerate. bf16 autocast only where the hardware runs it fast."""
    import torch

    if precision != "auto":
        return "bf16" if precision == "bf16" else "no"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_fast_bf16() else "no"


def base_dtype(train_precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base weights during LoRA training: bf16 on a GPU that trains in bf16
    (half the memory, no per-step casts; LoRA weights stay fp32 in peft), fp32 elsewhere (on a CPU,
    bf16 autocast over fp32 weights measured faster and keeps today's numbers)."""
    import torch

    if device.type == "cuda" and pick_precision(train_precision, device) == "bf16":
        return torch.bfloat16
    return torch.float32
