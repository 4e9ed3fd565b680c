"""The processes of a launch (one, or N under `accelerate launch` / torchrun, on GPUs or CPUs), as
accelerate sees them: every caller asks here, so all agree on the world size."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from datm.errors import DatmError


def launched_on_cpu() -> bool:
    """Several processes (torchrun / `accelerate launch --multi_gpu`) on a machine without an
    accelerator: accelerate treats them as one process each unless told to use the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def process_state() -> Any:
    """accelerate's view of the processes of this launch (rank, world size, main process).
    DATM_DIST_TIMEOUT (seconds) sets how long a collective waits for a slow rank (torch's default: 30 min).

    Under torchrun or `accelerate launch --multi_gpu --num_processes N` on CPUs this is N
    processes on gloo; every caller must go through here so all agree on the world size.
    """
    from accelerate import PartialState

    kwargs: dict[str, Any] = {}
    timeout = os.environ.get("DATM_DIST_TIMEOUT")
    if timeout:
        try:
            kwargs["timeout"] = timedelta(seconds=float(timeout))
        except ValueError:
            raise DatmError(f"DATM_DIST_TIMEOUT: expected seconds, got {timeout!r}") from None
    return PartialState(cpu=launched_on_cpu(), **kwargs)


def make_accelerator(grad_accum: int) -> Any:
    from accelerate import Accelerator

    process_state()  # fixes the process group first, so the Accelerator shares it
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=launched_on_cpu())


def gathered_lora_state(accel: Any, loss_module: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard of every weight: gather the adapter's weights whole
    (a collective, so every process calls this) for the main process to write. None elsewhere:
    the main process's model holds them whole (DDP, DeepSpeed ZeRO-2, one process)."""
    from accelerate.utils import DistributedType

    if accel.distributed_type != DistributedType.FSDP:
        return None
    full = accel.get_state_dict(loss_module)  # TargetLoss: keys start with "causal_lm."
    return {"base_model.model." + k.removeprefix("causal_lm."): v for k, v in full.items() if "lora_" in k}
