"""LoRA training throughput on Gemma 3 270M: datm's trainer vs transformers.Trainer + peft.

Both sides train a fresh LoRA (r=16, alpha=32, all linear layers, dropout 0) on the same ALMA
prompts (real WMT human-written pairs), with the same batch size, number of steps, seed, AdamW,
learning rate, inverse-sqrt schedule with 1 warm-up step, no gradient clipping, and bf16 autocast on
the CPU. What differs is what each does per step:

- datm (`datm.train.train_adapter`): batches of similar length, logits only at target positions;
- baseline (`transformers.Trainer`): random batches padded to the batch maximum by
  `DataCollatorForSeq2Seq`, the model's own loss over full logits (262k-word vocabulary at every
  position).

Each side runs in its own fresh process (accelerate's state is process-wide) after one warm-up step
on other examples; the timed span is everything from a bare base model to a saved adapter. The
script also checks that the two losses are the same function (same fixed batches, both ways), and
estimates the fraction of the machine's dense bf16 matmul throughput that training reaches.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

from datm.data import Example, PromptFormat, read_direction, select, tokenize_pairs
from datm.languages import XX_EN, Direction

HEADLINE = "train_speedup"
LORA_R, LORA_ALPHA = 16, 32
LR, WEIGHT_DECAY, WARMUP_STEPS = 2e-4, 0.01, 1
MAX_LENGTH = 256
LOSS_TOL = {"fp32": 1e-4, "bf16": 1e-3}  # |target_loss − full-logits loss| on the same batch
FIRST_STEP_TOL = 1e-2  # a run's logged first-step loss vs the base model's loss on that batch (bf16)


def lora_config() -> Any:
    from datm.config import LoraConfig

    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules="all-linear")


def train_config(steps: int, batch_size: int, seed: int) -> Any:
    from datm.config import TrainConfig

    # warmup_ratio 0.01 gives max(1, int(0.01·steps)) = 1 warm-up step for fewer than 200 steps.
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=LR,
        schedule="inverse_sqrt",
        warmup_ratio=0.01,
        weight_decay=WEIGHT_DECAY,
        seed=seed,
        precision="bf16",
        checkpoint_every=0,
    )


# --------------------------------------------------------------------------------------------------
# The two sides (each runs in a fresh process)
# --------------------------------------------------------------------------------------------------


def run_datm(model_path: str, warm: list[Example], timed: list[Example], spec: dict[str, Any]) -> dict:
    from datm import models
    from datm.train import train_adapter

    common.set_threads(spec["threads"])
    tok = models.load_tokenizer(model_path)
    model = models.load_model(model_path)
    work = Path(spec["workdir"])
    warm_cfg = train_config(1, spec["batch_size"], spec["seed"])
    train_adapter(model, tok, warm, work / "datm-warmup", lora_config(), warm_cfg, progress=False)

    step_ends: list[float] = []
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        step_ends.append(time.perf_counter())
        losses.append(loss)

    cfg = train_config(spec["steps"], spec["batch_size"], spec["seed"])
    with common.PeakMeter() as meter:
        result = train_adapter(
            model, tok, timed, work / "datm", lora_config(), cfg, progress=False, on_step=on_step
        )
    return {
        **_side_timing(meter, step_ends, len(timed), spec),
        "loop_seconds_reported": result.seconds,
        "losses": losses,
        "first_step_loss": losses[0],
    }


def run_baseline(model_path: str, warm: list[Example], timed: list[Example], spec: dict[str, Any]) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from datm import models

    common.set_threads(spec["threads"])
    tok = models.load_tokenizer(model_path)
    tok.padding_side = "right"
    model = models.load_model(model_path)
    work = Path(spec["workdir"])
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)

    class FirstBatchTrainer(Trainer):
        """Trainer that keeps a copy of its first batch, so the check can recompute its loss."""

        first_batch: dict[str, torch.Tensor] | None = None

        def compute_loss(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            if self.first_batch is None:
                self.first_batch = {k: v.detach().clone() for k, v in inputs.items()}
            return super().compute_loss(model, inputs, *args, **kwargs)

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(time.perf_counter())

    def train(examples: list[Example], steps: int, out: Path) -> tuple[Any, FirstBatchTrainer]:
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=LORA_R,
                lora_alpha=LORA_ALPHA,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
        args = TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=spec["batch_size"],
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="inverse_sqrt",
            warmup_steps=WARMUP_STEPS,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=0.0,  # datm does not clip either
            bf16=True,
            use_cpu=True,
            seed=spec["seed"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        dataset = [
            {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples
        ]
        trainer = FirstBatchTrainer(
            model=peft_model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[StepClock()],
        )
        trainer.train()
        trainer.save_model(str(out / "adapter"))
        return peft_model, trainer

    peft_model, _ = train(warm, 1, work / "hf-warmup")
    model = peft_model.unload()
    step_ends.clear()
    with common.PeakMeter() as meter:
        peft_model, trainer = train(timed, spec["steps"], work / "hf")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.first_batch is not None
    first_batch = {
        k: v for k, v in trainer.first_batch.items() if k in ("input_ids", "attention_mask", "labels")
    }
    return {
        **_side_timing(meter, step_ends, len(timed), spec),
        "train_runtime_reported": trainer.state.log_history[-1].get("train_runtime"),
        "losses": losses,
        "first_step_loss": losses[0] if losses else None,
        "first_batch": first_batch,
    }


def _side_timing(meter: common.PeakMeter, step_ends: list[float], n_examples: int, spec: dict) -> dict:
    """End-to-end throughput (timed span) and steady-state throughput (between step ends)."""
    steady = None
    if len(step_ends) >= 2:
        per_step = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
        steady = spec["batch_size"] / per_step
    gaps = [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]
    return {
        "seconds": meter.seconds,
        "examples_per_second": n_examples / meter.seconds,
        "steady_examples_per_second": steady,
        "median_step_seconds": statistics.median(gaps) if gaps else None,
        "peak_rss_above_baseline_bytes": meter.above_baseline,
    }


# --------------------------------------------------------------------------------------------------
# Checks run in the main process
# --------------------------------------------------------------------------------------------------


def loss_equivalence(model: Any, tok: Any, batches: list[list[Example]]) -> list[dict[str, float]]:
    """datm's target-only loss and the model's full-logits loss on the same padded batches."""
    from datm.train import collate, target_loss

    rows = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.eval()
    for i, batch_examples in enumerate(batches):
        batch = collate(batch_examples, pad)
        for precision in ("fp32", "bf16"):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                ours = float(target_loss(model, batch))
                full = float(model(**batch).loss)
            rows.append({"batch": i, "precision": precision, "target_loss": ours, "full_logits_loss": full})
    return rows


def collator_matches(tok: Any, batch_examples: list[Example]) -> bool:
    """The baseline's padding collator makes the same tensors as datm's collate on one batch."""
    from transformers import DataCollatorForSeq2Seq

    from datm.train import collate

    tok.padding_side = "right"
    collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    theirs = collator(
        [
            {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in batch_examples
        ]
    )
    ours = collate(batch_examples, tok.pad_token_id)
    return all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


def base_batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> float:
    from datm.train import target_loss

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return float(target_loss(model, batch))


def training_flops(model: Any, examples: list[Example]) -> dict[str, float]:
    """Useful work of one pass over `examples` (padding and non-target logits excluded).

    The conventional 6·N·tokens (forward 2N, backward 4N) for the non-embedding and LoRA weights,
    plus the LM head 2·vocab·hidden per target token, ×3 for forward and backward. With frozen base
    weights backward skips their weight gradients, so ~4·N·tokens is closer to what must be done:
    both are reported; the fraction of peak uses the 6N convention.
    """
    from datm import models

    embedding = model.get_input_embeddings().weight
    vocab, hidden = embedding.shape
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding.numel()
    lora = models.lora_parameter_count(model, LORA_R, "all-linear")
    tokens = sum(len(e.input_ids) for e in examples)
    targets = sum(len(e.input_ids) - e.n_prompt for e in examples)
    head = 3 * 2 * vocab * hidden * targets
    return {
        "non_embedding_params": non_embedding,
        "lora_params": lora,
        "tokens": tokens,
        "target_tokens": targets,
        "flops_6n": 6 * (non_embedding + lora) * tokens + head,
        "flops_4n": 4 * non_embedding * tokens + 6 * lora * tokens + head,
    }


def padded_tokens(examples: list[Example], batch_size: int, seed: int) -> dict[str, int]:
    """Tokens the forward pass sees per side: datm's length buckets vs random batches (same seed
    does not give the Trainer's order, so this is the expectation over random orders, estimated
    with 20 shuffles)."""
    import random

    from datm.data import length_batches

    lengths = [len(e.input_ids) for e in examples]
    ours = sum(len(b) * max(lengths[i] for i in b) for b in length_batches(examples, batch_size, seed))
    random_totals = []
    for s in range(20):
        order = list(range(len(examples)))
        random.Random(seed + s).shuffle(order)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        random_totals.append(sum(len(c) * max(lengths[i] for i in c) for c in chunks))
    return {
        "real": sum(lengths),
        "datm_padded": ours,
        "random_batches_padded": int(statistics.mean(random_totals)),
    }


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--direction", default="de-en", help="training direction (ALMA train file)")
    parser.add_argument("--examples", type=int, default=None, help="timed examples per side (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--check-batches", type=int, default=None, help="fixed batches (default 3; quick 1)")
    args = parser.parse_args()
    if args.quick and args.threads is None:
        args.threads = 1  # quick runs check plumbing, often on a shared machine (see common.check_load)
    common.set_threads(args.threads)
    n_examples = args.examples or (16 if args.quick else 64)
    n_check = args.check_batches or (1 if args.quick else 3)
    if n_examples % args.batch_size:
        raise common.BenchError(
            f"--examples {n_examples} is not a multiple of --batch-size {args.batch_size}"
        )
    steps = n_examples // args.batch_size
    out_dir = common.output_dir(args)

    from datm import models

    direction = Direction.parse(args.direction)
    if direction.family != XX_EN:
        raise common.BenchError(f"--direction must be XX-en (ALMA train files are per XX), got {direction}")
    model_path = common.base_model_path()
    tok = models.load_tokenizer(model_path)
    pattern = str(common.DATA_DIR / "train.{xx}-en.jsonl")
    common.data_file(f"train.{direction.foreign}-en.jsonl")
    pairs = select(read_direction(pattern, direction), n_examples + args.batch_size, args.seed)
    examples, report = tokenize_pairs(pairs, PromptFormat(tok, "alma"), MAX_LENGTH)
    if len(examples) < n_examples + args.batch_size:
        raise common.BenchError(f"only {len(examples)} usable examples in {pattern} for {direction}")
    warm, timed = examples[: args.batch_size], examples[args.batch_size : args.batch_size + n_examples]

    settings = {
        "model": model_path,
        "data": pattern.format(xx=direction.foreign),
        "direction": str(direction),
        "examples": n_examples,
        "batch_size": args.batch_size,
        "steps": steps,
        "warmup_steps_untimed": 1,
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": "all-linear"},
        "optimizer": {
            "lr": LR,
            "schedule": "inverse_sqrt",
            "warmup_steps": WARMUP_STEPS,
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": None,
        },
        "precision": "bf16 autocast (CPU)",
        "max_length": MAX_LENGTH,
        "truncated_examples": report.truncated,
        "seed": args.seed,
    }
    record = common.new_record("bench_train", HEADLINE, args.quick, settings, args.allow_load)
    common.log(f"{n_examples} examples of {direction}, batch {args.batch_size}, {steps} steps per side")

    common.log("measuring dense 2048×2048 matmul throughput")
    roof = {"bf16": common.matmul_gflops(torch.bfloat16), "fp32": common.matmul_gflops(torch.float32)}
    common.log(f"matmul: bf16 {roof['bf16']:.0f} GFLOP/s, fp32 {roof['fp32']:.0f} GFLOP/s")

    with tempfile.TemporaryDirectory(prefix="datm-bench-train-") as tmp:
        spec = {
            "threads": args.threads,
            "workdir": tmp,
            "batch_size": args.batch_size,
            "steps": steps,
            "seed": args.seed,
        }
        common.log("datm side (fresh process)")
        datm_side = common.run_isolated(run_datm, model_path, warm, timed, spec)
        common.log(f"datm: {datm_side['examples_per_second']:.3f} examples/s ({datm_side['seconds']:.1f} s)")
        common.log("baseline side: transformers.Trainer + peft (fresh process)")
        base_side = common.run_isolated(run_baseline, model_path, warm, timed, spec)
        common.log(
            f"baseline: {base_side['examples_per_second']:.3f} examples/s ({base_side['seconds']:.1f} s)"
        )

    # Checks on the base model (LoRA B starts at 0, so a first step's loss is the base model's).
    model = models.load_model(model_path)
    check_batches = [timed[i * args.batch_size : (i + 1) * args.batch_size] for i in range(n_check)]
    check_batches = [b for b in check_batches if b]
    rows = loss_equivalence(model, tok, check_batches)
    for precision, tol in LOSS_TOL.items():
        worst = max(
            abs(r["target_loss"] - r["full_logits_loss"]) for r in rows if r["precision"] == precision
        )
        common.add_check(
            record,
            f"target_loss == full-logits loss ({precision}, {len(check_batches)} fixed batches)",
            worst <= tol,
            f"max |difference| {worst:.2e} (tolerance {tol:g})",
        )
    common.add_check(
        record,
        "baseline collator pads like datm's collate",
        collator_matches(tok, check_batches[0]),
        "DataCollatorForSeq2Seq vs datm.train.collate on the first fixed batch: identical tensors",
    )
    from datm.data import length_batches
    from datm.train import collate

    datm_first = collate(
        [timed[i] for i in length_batches(timed, args.batch_size, args.seed)[0]], tok.pad_token_id
    )
    expected_first = {
        "datm": base_batch_loss(model, datm_first),
        "baseline": base_batch_loss(model, base_side.pop("first_batch")),
    }
    for side_name, side in (("datm", datm_side), ("baseline", base_side)):
        got, want = side["first_step_loss"], expected_first[side_name]
        common.add_check(
            record,
            f"{side_name} first-step loss == base model's loss on its first batch",
            got is not None and abs(got - want) <= FIRST_STEP_TOL * max(1.0, abs(want)),
            f"logged {got:.4f}, recomputed {want:.4f} (the two runs batch differently, so their "
            "first batches, and losses, differ from each other)",
        )

    flops = training_flops(model, timed)
    padding = padded_tokens(timed, args.batch_size, args.seed)
    for side in (datm_side, base_side):
        achieved = flops["flops_6n"] / side["seconds"] / 1e9
        side["useful_gflops_per_second"] = achieved
        side["fraction_of_bf16_matmul_peak"] = achieved / roof["bf16"]
    speedup = datm_side["examples_per_second"] / base_side["examples_per_second"]
    steady = (
        common.ratio(datm_side["steady_examples_per_second"], base_side["steady_examples_per_second"])
        if datm_side["steady_examples_per_second"] and base_side["steady_examples_per_second"]
        else None
    )
    record.update(
        {
            HEADLINE: speedup,
            "train_speedup_steady_state": steady,
            "datm": datm_side,
            "baseline": base_side,
            "loss_equivalence": rows,
            "first_step_loss_recomputed": expected_first,
            "matmul_gflops": roof,
            "flops": flops,
            "tokens_per_pass": padding,
            "method": (
                "Each side in a fresh spawned process; one untimed warm-up step (other examples); timed "
                "span = bare base model -> trained adapter saved (LoRA attach, optimizer, steps, save). "
                "examples_per_second = examples / timed span; steady = batch / mean step time between "
                "the first and last step ends. Useful FLOPs = 6·(non-embedding + LoRA params)·real tokens "
                "+ 3·2·vocab·hidden·target tokens, the same for both sides; fraction = useful FLOP/s / "
                "dense bf16 2048² matmul FLOP/s measured in this run."
            ),
        }
    )

    print()
    print(
        f"datm     : {datm_side['examples_per_second']:.3f} examples/s end-to-end, "
        f"{datm_side['steady_examples_per_second'] or float('nan'):.3f} steady, "
        f"{datm_side['fraction_of_bf16_matmul_peak']:.1%} of bf16 matmul peak"
    )
    print(
        f"baseline : {base_side['examples_per_second']:.3f} examples/s end-to-end, "
        f"{base_side['steady_examples_per_second'] or float('nan'):.3f} steady, "
        f"{base_side['fraction_of_bf16_matmul_peak']:.1%} of bf16 matmul peak"
    )
    print(f"{HEADLINE} = {speedup:.2f}x (steady state {steady or float('nan'):.2f}x)")

    body = "\n\n".join(
        [
            "## What is measured\n\n" + record["method"],
            "## Throughput\n\n"
            + common.markdown_table(
                [
                    "side",
                    "examples/s (end-to-end)",
                    "examples/s (steady)",
                    "timed s",
                    "first-step loss",
                    "useful GFLOP/s",
                    "of bf16 peak",
                    "peak RSS above start",
                ],
                [
                    [
                        name,
                        s["examples_per_second"],
                        s["steady_examples_per_second"] or "-",
                        s["seconds"],
                        s["first_step_loss"],
                        s["useful_gflops_per_second"],
                        f"{s['fraction_of_bf16_matmul_peak']:.1%}",
                        common.gib(s["peak_rss_above_baseline_bytes"]),
                    ]
                    for name, s in (("datm", datm_side), ("transformers.Trainer + peft", base_side))
                ],
            ),
            f"train_speedup (datm / baseline) = **{speedup:.2f}×** end-to-end, "
            f"{steady or float('nan'):.2f}× steady state.",
            f"Dense 2048² matmul: bf16 {roof['bf16']:.0f} GFLOP/s, fp32 {roof['fp32']:.0f} GFLOP/s. "
            f"Tokens per pass: {padding['real']} real, {padding['datm_padded']} as datm batches them, "
            f"~{padding['random_batches_padded']} in random padded batches. Target tokens "
            f"{flops['target_tokens']}; useful FLOPs {flops['flops_6n'] / 1e12:.2f} T (6N convention), "
            f"{flops['flops_4n'] / 1e12:.2f} T (4N, frozen base).",
            "## Loss equivalence on fixed batches\n\n"
            + common.markdown_table(
                ["batch", "precision", "target_loss (datm)", "model loss (full logits)", "|diff|"],
                [
                    [
                        r["batch"],
                        r["precision"],
                        f"{r['target_loss']:.6f}",
                        f"{r['full_logits_loss']:.6f}",
                        f"{abs(r['target_loss'] - r['full_logits_loss']):.1e}",
                    ]
                    for r in rows
                ],
            ),
        ]
    )
    common.write_results(out_dir, record, body)
    failed = common.failed_hard_checks(record)
    if failed:
        print(f"FAILED checks: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
