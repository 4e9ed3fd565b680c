"""Training one LoRA adapter on some directions: the loop (`loop`), what a step computes on
(`batches`), the processes of a launch (`distributed`), and the store of trained adapters shared
across runs (`cache`)."""

from datm.train.batches import TargetLoss, collate, collate_packed, pack_rows, target_loss
from datm.train.distributed import gathered_lora_state, make_accelerator, process_state
from datm.train.loop import (
    CHECKPOINT,
    TrainError,
    TrainResult,
    peft_lora_config,
    set_activation_checkpointing,
    steps_for,
    train_adapter,
)

__all__ = [
    "CHECKPOINT",
    "TargetLoss",
    "TrainError",
    "TrainResult",
    "collate",
    "collate_packed",
    "gathered_lora_state",
    "make_accelerator",
    "pack_rows",
    "peft_lora_config",
    "process_state",
    "set_activation_checkpointing",
    "steps_for",
    "target_loss",
    "train_adapter",
]
