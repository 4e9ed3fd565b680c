"""Train one LoRA adapter on a list of tokenized examples and write one PEFT directory.

Knows nothing about strategies. The loop is short on purpose (nanoGPT style): batches of similar
length, logits and loss computed only at target positions (the LM head of a 262k-word vocabulary
would otherwise dominate), AdamW, a transformers LR schedule, periodic checkpoints to resume from.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from datm import artifacts
from datm.config import LoraConfig, TrainConfig
from datm.data import IGNORE_INDEX, Example, length_batches
from datm.device import cpu_has_fast_bf16, pick_precision  # noqa: F401 (their home was here)
from datm.errors import DatmError

CHECKPOINT = ".checkpoint"


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


def _launched_on_cpu() -> bool:
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
            raise TrainError(f"DATM_DIST_TIMEOUT: expected seconds, got {timeout!r}") from None
    return PartialState(cpu=_launched_on_cpu(), **kwargs)


def make_accelerator(grad_accum: int) -> Any:
    from accelerate import Accelerator

    process_state()  # fixes the process group first, so the Accelerator shares it
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=_launched_on_cpu())


def steps_for(n_examples: int, cfg: TrainConfig, world_size: int = 1) -> int:
    if cfg.steps is not None:
        return cfg.steps
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil((cfg.epochs or 1.0) * n_examples / per_step))


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into rows of at most `capacity` tokens (a longer
    example gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(examples: Sequence[Example], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """The same examples as `collate`, packed several to a row. Position ids restart at every
    example and no attention mask is given, so transformers isolates the examples from each other
    (a block-diagonal causal mask with sdpa/eager, variable-length kernels with flash-attention).
    Every example starts with prompt tokens (label ignored), so no loss crosses a boundary."""
    rows = pack_rows([len(e.input_ids) for e in examples], capacity)
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        # the padding tail is a sequence of its own (positions from 0), with no labels
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def target_loss(causal_lm: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens, projecting only those positions through
    the LM head (same value as the full-logits loss, a fraction of the cost). A packed batch
    (`collate_packed`) carries position_ids instead of an attention mask."""
    hidden = causal_lm.get_decoder()(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), labels[keep])


class TargetLoss(torch.nn.Module):
    """The loss as a module's forward, so that accelerate's DDP wrapper sees (and syncs) it."""

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        self.causal_lm = causal_lm

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return target_loss(self.causal_lm, {**batch, "position_ids": position_ids})


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


def gathered_lora_state(accel: Any, loss_module: Any) -> dict[str, torch.Tensor] | None:
    """Under FSDP each process holds a shard of every weight: gather the adapter's weights whole
    (a collective, so every process calls this) for the main process to write. None elsewhere:
    the main process's model holds them whole (DDP, DeepSpeed ZeRO-2, one process)."""
    from accelerate.utils import DistributedType

    if accel.distributed_type != DistributedType.FSDP:
        return None
    full = accel.get_state_dict(loss_module)  # TargetLoss: keys start with "causal_lm."
    return {"base_model.model." + k.removeprefix("causal_lm."): v for k, v in full.items() if "lora_" in k}


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


def _save_checkpoint(
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


def _load_checkpoint(path: Path, accel: Any) -> dict[str, Any]:
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
    from peft import get_peft_model, set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    out = Path(out)
    if artifacts.is_done(out):
        info = artifacts.read_json(out / "train_info.json")
        return TrainResult(out=out, **info["result"])
    if not examples:
        raise TrainError(f"adapter {out.name}: no training examples")

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
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    names = {"inverse_sqrt": "inverse_sqrt", "cosine": "cosine", "constant": "constant_with_warmup"}
    scheduler = get_scheduler(
        names[cfg.schedule],
        optimizer,
        num_warmup_steps=max(1, int(cfg.warmup_ratio * total_steps)),
        num_training_steps=total_steps,
    )

    if accel.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    start, losses = 0, []
    if (ckpt / "state.pt").is_file():
        state = _load_checkpoint(ckpt / "state.pt", accel)
        set_peft_model_state_dict(peft_model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]
    loss_module, optimizer = accel.prepare(TargetLoss(peft_model.get_base_model()), optimizer)
    peft_model.train()

    # Micro-batches in a fixed order that depends only on the seed: resuming replays it exactly.
    micro_per_step = cfg.grad_accum
    order: list[list[int]] = []
    epoch = 0
    while len(order) < total_steps * micro_per_step * accel.num_processes:
        order += length_batches(examples, cfg.batch_size, cfg.seed + epoch)
        epoch += 1
    order = order[accel.process_index :: accel.num_processes]

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    show = progress and accel.is_main_process  # one bar, as datm's messages: not one per node
    bar = tqdm(total=total_steps, initial=start, desc=f"train {out.name}", disable=not show, unit="step")
    t0, seen = time.perf_counter(), 0
    for step in range(start, total_steps):
        step_loss = 0.0
        for micro in range(micro_per_step):
            idx = order[step * micro_per_step + micro]
            chosen = [examples[i] for i in idx]
            packed = collate_packed(chosen, pad_id, cfg.max_length) if cfg.packing else None
            batch = {k: v.to(accel.device) for k, v in (packed or collate(chosen, pad_id)).items()}
            with accel.accumulate(loss_module), autocast:
                loss = loss_module(**batch)
                accel.backward(loss)
                optimizer.step()
                scheduler.step() if accel.sync_gradients else None
                optimizer.zero_grad()
            step_loss += loss.item() / micro_per_step
            seen += len(idx)
        if accel.num_processes > 1:  # the global batch's loss, as one process would log it
            step_loss = accel.reduce(torch.tensor([step_loss]), reduction="mean").item()
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < total_steps:
            _save_checkpoint(ckpt, accel, peft_model, optimizer, scheduler, done, losses)
        if on_step is not None:
            on_step(done, step_loss)
    bar.close()
    seconds = time.perf_counter() - t0
    if accel.num_processes > 1:  # examples of the global batches
        seen = int(accel.reduce(torch.tensor([seen]), reduction="sum").item())

    result = TrainResult(
        out=out,
        steps=total_steps,
        examples=len(examples),
        final_loss=float(sum(losses[-10:]) / max(1, len(losses[-10:]))),
        seconds=round(seconds, 2),
        examples_per_second=round(seen / seconds, 3) if seconds > 0 else 0.0,
        resumed_from=start,
    )
    full_state = gathered_lora_state(accel, loss_module)  # every process takes part (FSDP)
    if accel.is_main_process:
        stage = artifacts.staging_dir(out.parent / f"{out.name}.final")
        peft_model.save_pretrained(stage, state_dict=full_state)
        info = {
            "result": {k: v for k, v in result.to_dict().items() if k != "out"},
            "losses": losses,
            "lora": asdict(lora),
            "train": asdict(cfg),
            "directions": sorted({e.direction for e in examples}),
            "precision": precision,
            "device": str(accel.device),
            "world_size": accel.num_processes,
            "versions": artifacts.library_versions(),
            **(provenance or {}),
        }
        artifacts.atomic_write_json(stage / "train_info.json", info)
        # The checkpoint goes only once the final adapter is safely in place.
        artifacts.publish_dir(stage, out)
        artifacts.mark_done(out, {"kind": "adapter", "steps": total_steps})
    accel.wait_for_everyone()
    accel.free_memory()  # accelerate keeps references to what it prepared; this adapter is done
    peft_model.unload()  # give the base model back without LoRA layers
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(base_model, False)
    return result
