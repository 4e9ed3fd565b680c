"""Train one LoRA adapter on a list of tokenized examples and write one PEFT directory.

Knows nothing about strategies. The loop is short on purpose (nanoGPT style) and reads top to
bottom in `train_adapter`: set up (optimizer, schedule, resume from a checkpoint), a fixed order of
micro-batches that depends only on the seed, the steps (logits and loss only at target positions:
`datm.train.batches`), periodic checkpoints, and the save. The processes of a launch are
`datm.train.distributed`.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from datm import artifacts
from datm.config import LoraConfig, TrainConfig
from datm.data import Example, length_batches
from datm.device import pick_precision
from datm.errors import DatmError
from datm.train.batches import TargetLoss, collate, collate_packed
from datm.train.distributed import gathered_lora_state, make_accelerator

CHECKPOINT = ".checkpoint"
SCHEDULES = {"inverse_sqrt": "inverse_sqrt", "cosine": "cosine", "constant": "constant_with_warmup"}


class TrainError(DatmError):
    pass


@dataclass
class TrainResult:
    out: Path
    steps: int
    examples: int
    final_loss: float
    seconds: float
    examples_per_second: float
    resumed_from: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def steps_for(n_examples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil((cfg.epochs or 1.0) * n_examples / per_step))


def set_activation_checkpointing(model: Any, on: bool) -> None:
    """Gradient (activation) checkpointing: recompute each layer's activations in backward.
    Non-reentrant, so inputs need not require grad and dropout's RNG is replayed exactly."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def peft_lora_config(cfg: LoraConfig) -> Any:
    """peft's LoraConfig for a config's `lora` section (training and the probe wrap a model with it)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )


def save_checkpoint(
    ckpt: Path, accel: Any, model: Any, optimizer: Any, scheduler: Any, step: int, losses: list[float]
) -> None:
    """Called by every process (each contributes its RNG state); only the main one writes."""
    from accelerate.utils import gather_object
    from peft import get_peft_model_state_dict

    rng = gather_object([torch.get_rng_state()]) if accel.num_processes > 1 else [torch.get_rng_state()]
    if not accel.is_main_process:
        return
    stage = artifacts.staging_dir(ckpt)
    torch.save(
        {
            "step": step,
            "lora": get_peft_model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,  # one state per process: dropout draws differ between ranks
            "world_size": accel.num_processes,
            "losses": losses,
        },
        stage / "state.pt",
    )
    if ckpt.exists():
        shutil.rmtree(ckpt)
    stage.rename(ckpt)


def load_checkpoint(path: Path, accel: Any) -> dict[str, Any]:
    state = torch.load(path, weights_only=False)
    saved = state.get("world_size", 1)
    if saved != accel.num_processes:
        raise TrainError(
            f"{path}: checkpoint written by {saved} process(es), resumed by {accel.num_processes}; the "
            f"global batches would differ. Launch {saved} process(es) again, or delete {path.parent} to "
            "restart"
        )
    rng = state["rng"]
    state["rng"] = rng[accel.process_index] if isinstance(rng, list) else rng
    return state


def optimizer_and_schedule(model: Any, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable (LoRA) weights, and the config's learning-rate schedule."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        SCHEDULES[cfg.schedule],
        optimizer,
        num_warmup_steps=max(1, int(cfg.warmup_ratio * total_steps)),
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


def resume(ckpt: Path, accel: Any, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, list[float]]:
    """(the step to start from, the losses so far): from `ckpt` when an interrupted run left one."""
    from peft import set_peft_model_state_dict

    if not (ckpt / "state.pt").is_file():
        return 0, []
    state = load_checkpoint(ckpt / "state.pt", accel)
    set_peft_model_state_dict(model, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["losses"]


def micro_batch_order(
    examples: Sequence[Example], cfg: TrainConfig, total_steps: int, accel: Any
) -> list[list[int]]:
    """This process's micro-batches (indices into `examples`), in a fixed order that depends only on
    the seed: a resumed run replays it exactly. Rank r takes every N-th of the global order."""
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_steps * cfg.grad_accum * accel.num_processes:
        order += length_batches(examples, cfg.batch_size, cfg.seed + epoch)
        epoch += 1
    return order[accel.process_index :: accel.num_processes]


@dataclass
class Training:
    """One adapter's training in progress: the prepared model, optimizer and schedule, and where it is."""

    accel: Any
    peft_model: Any
    loss_module: Any
    optimizer: Any
    scheduler: Any
    autocast: Any
    precision: str
    total_steps: int
    order: list[list[int]]  # this process's micro-batches, in order
    pad_id: int
    ckpt: Path
    start: int  # the step it (re)starts from
    losses: list[float]

    def step(self, cfg: TrainConfig, examples: Sequence[Example], step: int) -> tuple[float, int]:
        """Optimizer step `step` over its grad_accum micro-batches: (the step's loss, examples seen)."""
        accel, step_loss, seen = self.accel, 0.0, 0
        micro_batches = self.order[step * cfg.grad_accum : (step + 1) * cfg.grad_accum]
        for idx in micro_batches:
            chosen = [examples[i] for i in idx]
            packed = collate_packed(chosen, self.pad_id, cfg.max_length) if cfg.packing else None
            batch = {k: v.to(accel.device) for k, v in (packed or collate(chosen, self.pad_id)).items()}
            with accel.accumulate(self.loss_module), self.autocast:
                loss = self.loss_module(**batch)
                accel.backward(loss)
                self.optimizer.step()
                self.scheduler.step() if accel.sync_gradients else None
                self.optimizer.zero_grad()
            step_loss += loss.item() / len(micro_batches)
            seen += len(idx)
        if accel.num_processes > 1:  # the global batch's loss, as one process would log it
            step_loss = accel.reduce(torch.tensor([step_loss]), reduction="mean").item()
        return step_loss, seen


def start_training(
    base_model: Any, examples: Sequence[Example], out: Path, lora: LoraConfig, cfg: TrainConfig, pad_id: int
) -> Training:
    """A fresh LoRA on `base_model` with its optimizer and schedule, resumed from `out`'s checkpoint
    if an interrupted run left one. Seeds first: the LoRA's initial weights depend on them."""
    from peft import get_peft_model

    # Autocast is ours rather than accelerate's: its precision is fixed per process, and one
    # process may train adapters under different configs (tests, benchmarks).
    accel = make_accelerator(cfg.grad_accum)
    precision = pick_precision(cfg.precision, accel.device)
    autocast = torch.autocast(accel.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    total_steps = steps_for(len(examples), cfg, accel.num_processes)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    peft_model = get_peft_model(base_model, peft_lora_config(lora))
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(base_model, True)
    optimizer, scheduler = optimizer_and_schedule(peft_model, cfg, total_steps)
    if accel.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    start, losses = resume(ckpt, accel, peft_model, optimizer, scheduler)
    loss_module, optimizer = accel.prepare(TargetLoss(peft_model.get_base_model()), optimizer)
    peft_model.train()
    order = micro_batch_order(examples, cfg, total_steps, accel)
    return Training(
        accel,
        peft_model,
        loss_module,
        optimizer,
        scheduler,
        autocast,
        precision,
        total_steps,
        order,
        pad_id,
        ckpt,
        start,
        losses,
    )


def save_adapter(t: Training, out: Path, info: dict[str, Any]) -> None:
    """Write the finished adapter (main process): staged, then published in place of the training
    directory, so the checkpoint goes only once the final adapter is safely there."""
    full_state = gathered_lora_state(t.accel, t.loss_module)  # every process takes part (FSDP)
    if t.accel.is_main_process:
        stage = artifacts.staging_dir(out.parent / f"{out.name}.final")
        t.peft_model.save_pretrained(stage, state_dict=full_state)
        artifacts.atomic_write_json(stage / "train_info.json", info)
        artifacts.publish_dir(stage, out)
        artifacts.mark_done(out, {"kind": "adapter", "steps": t.total_steps})
    t.accel.wait_for_everyone()


def train_adapter(
    base_model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    out: Path,
    lora: LoraConfig,
    cfg: TrainConfig,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a fresh LoRA on `base_model` and write a PEFT directory at `out`.

    A finished `out` is never retrained; an interrupted run resumes from `out/.checkpoint`.
    The base model is left without adapters when this returns.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if artifacts.is_done(out):
        return TrainResult(out=out, **artifacts.read_json(out / "train_info.json")["result"])
    if not examples:
        raise TrainError(f"adapter {out.name}: no training examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t = start_training(base_model, examples, out, lora, cfg, pad_id)
    show = progress and t.accel.is_main_process  # one bar, as datm's messages: not one per node
    bar = tqdm(total=t.total_steps, initial=t.start, desc=f"train {out.name}", disable=not show, unit="step")
    t0, seen = time.perf_counter(), 0
    for step in range(t.start, t.total_steps):
        step_loss, n = t.step(cfg, examples, step)
        seen += n
        t.losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{t.scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < t.total_steps:
            save_checkpoint(t.ckpt, t.accel, t.peft_model, t.optimizer, t.scheduler, done, t.losses)
        if on_step is not None:
            on_step(done, step_loss)
    bar.close()
    seconds = time.perf_counter() - t0
    if t.accel.num_processes > 1:  # examples of the global batches
        seen = int(t.accel.reduce(torch.tensor([seen]), reduction="sum").item())
    result = TrainResult(
        out=out,
        steps=t.total_steps,
        examples=len(examples),
        final_loss=float(sum(t.losses[-10:]) / max(1, len(t.losses[-10:]))),
        seconds=round(seconds, 2),
        examples_per_second=round(seen / seconds, 3) if seconds > 0 else 0.0,
        resumed_from=t.start,
    )
    save_adapter(t, out, train_info(result, t, examples, lora, cfg, provenance))
    t.accel.free_memory()  # accelerate keeps references to what it prepared; this adapter is done
    t.peft_model.unload()  # give the base model back without LoRA layers
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(base_model, False)
    return result


def train_info(
    result: TrainResult,
    t: Training,
    examples: Sequence[Example],
    lora: LoraConfig,
    cfg: TrainConfig,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """What train_info.json records: the result, losses, settings, device and library versions."""
    return {
        "result": {k: v for k, v in result.to_dict().items() if k != "out"},
        "losses": t.losses,
        "lora": asdict(lora),
        "train": asdict(cfg),
        "directions": sorted({e.direction for e in examples}),
        "precision": t.precision,
        "device": str(t.accel.device),
        "world_size": t.accel.num_processes,
        "versions": artifacts.library_versions(),
        **(provenance or {}),
    }
