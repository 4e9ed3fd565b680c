"""One prepared check for a GPU machine (≤ 8 minutes, nothing downloaded): datm's training,
routed translation and merging at real model shapes, with random weights built from configs.

1. LoRA r16 training steps (datm.train.train_adapter: target-only loss, bf16, gradient
   checkpointing, sequence packing) on a Gemma-3-270M-shaped and a Llama-3-8B-shaped model →
   tokens/s, model FLOP utilisation (MFU) against a bf16 matmul measured in the same run, and peak
   GPU memory. Model FLOPs per token: 2·N forward + 2·N backward through the frozen linear layers
   (no weight gradients), the LM head at target positions only, attention within each packed
   example (×3 for forward and backward); the recomputation of checkpointing is not counted.
2. Routed translation: 10 random LoRA modules loaded side by side, batches whose rows each use a
   different module (peft adapter_names), greedy decoding of a fixed number of tokens; tokens/s
   next to the same batches on the bare base model.
3. TIES merge (datm.merge.merge_adapters, form lowrank) of 7 rank-16 adapters of the 8B-shaped
   model's linear layers (the first --merge-layers layers; the time for all layers is extrapolated,
   as merging streams one module at a time). The merge runs on the CPU.

`--tiny` shrinks every shape so the same code path runs on a CPU in a minute (not a result).
Results: benchmarks/results/gpu_check.{md,json} (with --tiny: the quick-results folder).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common
import torch

HEADLINE = "mfu_8b_lora"
MFU_GOAL = 0.40
LORA_R, LORA_ALPHA = 16, 32
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
    ),
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    ),
}
TINY: dict[str, dict[str, Any]] = {
    "gemma3-270m": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16
    ),
    "llama3-8b": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def build_model(shape: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**SHAPES[shape], **(TINY[shape] if tiny else {})}
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    """Dense bf16 n×n products per second on this device: the roof MFU is measured against."""
    n = 1024 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0 or reps < 10:
        for _ in range(10):
            a @ b
        reps += 10
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_params(model: Any) -> int:
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def flops_per_example(model: Any, prompt: int, target: int) -> float:
    cfg = model.config
    n = prompt + target
    attn_width = cfg.num_attention_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads
    )
    linear = 4 * linear_params(model) * n
    head = 4 * cfg.hidden_size * cfg.vocab_size * target
    attention = 3 * cfg.num_hidden_layers * 2 * 2 * attn_width * n * n / 2  # causal: half the pairs
    return linear + head + attention


def train_check(
    model: Any, name: str, args: Any, device: torch.device, roof: float, work: Path
) -> dict[str, Any]:
    from datm.config import LoraConfig, TrainConfig
    from datm.data import Example
    from datm.train import train_adapter

    prompt, target = (24, 24) if args.tiny else (48, 48)
    n_examples = args.batch_size * args.steps
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (n_examples, prompt + target), generator=g).tolist()
    examples = [Example(row, prompt, "xx-en") for row in ids]
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=2e-4,
        precision="bf16",
        seed=1,
        checkpoint_every=0,
        max_length=1024 if not args.tiny else 256,
        gradient_checkpointing=True,
        packing=True,
    )
    lora = LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules="all-linear")
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = train_adapter(
        model,
        SimpleNamespace(pad_token_id=0, eos_token_id=1),
        examples,
        work / f"adapter-{name}",
        lora,
        cfg,
        progress=False,
        on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )
    timed_steps = len(stamps) - 1  # the first step warms up (kernels, allocator)
    seconds = stamps[-1] - stamps[0]
    tokens = timed_steps * args.batch_size * (prompt + target)
    achieved = timed_steps * args.batch_size * flops_per_example(model, prompt, target) / seconds / 1e12
    return {
        "steps_timed": timed_steps,
        "tokens_per_step": args.batch_size * (prompt + target),
        "tokens_per_second": tokens / seconds,
        "seconds_per_step": seconds / timed_steps,
        "model_tflops": achieved,
        "mfu": achieved / roof,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "final_loss": res.final_loss,
        "linear_params": linear_params(model),
    }


def translate_check(model: Any, name: str, args: Any, device: torch.device, work: Path) -> dict[str, Any]:
    from peft import PeftModel

    from datm.plan import BASE

    names = [f"m{i}" for i in range(10)]
    paths = common.make_random_lora_adapters(
        model, work / f"modules-{name}", names, LORA_R, LORA_ALPHA, "all-linear", 7, b_scale=0.01
    )
    peft_model = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(paths[n]), adapter_name=n)
    peft_model.eval()
    rows, prompt, new = (10, 16, 8) if args.tiny else (args.translate_batch, 64, 64)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (rows, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)

    def generate(adapter_names: list[str]) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                adapter_names=adapter_names,
            )
        sync(device)
        assert out.shape[1] == prompt + new
        return time.perf_counter() - start

    mixed = [names[i % len(names)] for i in range(rows)]
    generate(mixed)  # warm-up
    t_mixed = generate(mixed)
    t_base = generate([BASE] * rows)
    peft_model.unload()
    return {
        "modules": len(names),
        "rows": rows,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "mixed_tokens_per_second": rows * new / t_mixed,
        "base_tokens_per_second": rows * new / t_base,
        "mixed_over_base_time": t_mixed / t_base,
    }


def merge_check(model: Any, args: Any, work: Path) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from datm.merge import merge_adapters

    layers = list(range(min(args.merge_layers, model.config.num_hidden_layers)))
    paths = []
    for i in range(7):
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            target_modules=LLAMA_LINEARS,
            layers_to_transform=layers,
            init_lora_weights=False,
        )
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(str(work / f"merge-src-{i}"))
        model = peft_model.unload()
        paths.append(work / f"merge-src-{i}")
    with common.PeakMeter() as meter:
        res = merge_adapters(
            paths, work / "merged", method="ties", density=0.2, form="lowrank", progress=False
        )
    scale = model.config.num_hidden_layers / len(layers)
    return {
        "sources": 7,
        "layers_merged": len(layers),
        "modules": 7 * len(layers),
        "seconds": meter.seconds,
        "seconds_all_layers_extrapolated": meter.seconds * scale,
        "peak_rss_above_start_bytes": meter.above_baseline,
        "rel_error": res.rel_error,
        "cpu_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", dest="quick", action="store_true", help="tiny shapes on any device (CPU ok)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per shape (default 12; tiny 3)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default 64; tiny 8)")
    parser.add_argument("--translate-batch", type=int, default=32)
    parser.add_argument("--merge-layers", type=int, default=None, help="layers merged (default 2; tiny 1)")
    args = parser.parse_args()
    args.tiny = args.quick
    args.steps = args.steps or (3 if args.tiny else 12)
    args.batch_size = args.batch_size or (8 if args.tiny else 64)
    args.merge_layers = args.merge_layers or (1 if args.tiny else 2)
    common.set_threads(args.threads)
    from datm import device as D

    device = D.current()
    if device.type != "cuda" and not args.tiny:
        raise common.BenchError("no CUDA device here; run with --tiny to check the code path on a CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # GPU timings do not depend on the host's CPU load: recorded, never refused
    record = common.new_record(
        "gpu_check", HEADLINE, args.tiny, {k: v for k, v in vars(args).items() if k != "out"}, True
    )
    record["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    started = time.perf_counter()
    roof = matmul_tflops(device, args.tiny)
    record["matmul_bf16_tflops"] = roof
    common.log(f"{record['device']}: bf16 matmul {roof:.1f} TFLOP/s")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results: dict[str, Any] = {}
    for shape in SHAPES:
        model = build_model(shape, args.tiny, device, dtype)
        common.log(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters, training")
        results[shape] = {"train": train_check(model, shape, args, device, roof, work)}
        common.log(f"{shape}: {common.dump(results[shape]['train'])}")
        results[shape]["translate"] = translate_check(model, shape, args, device, work)
        common.log(f"{shape}: {common.dump(results[shape]['translate'])}")
        if shape == "llama3-8b":
            results[shape]["merge"] = merge_check(model, args, work)
            common.log(f"{shape}: {common.dump(results[shape]['merge'])}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["results"] = results
    record["seconds_total"] = time.perf_counter() - started
    mfu = results["llama3-8b"]["train"]["mfu"]
    record[HEADLINE] = round(mfu, 4)
    common.add_check(record, f"8B LoRA step MFU >= {MFU_GOAL:.0%}", mfu >= MFU_GOAL, f"{mfu:.1%}", hard=False)
    common.add_check(
        record,
        "within 8 minutes",
        record["seconds_total"] <= 480,
        f"{record['seconds_total']:.0f} s",
        hard=False,
    )
    rows = []
    for shape, r in results.items():
        t, tr = r["train"], r["translate"]
        mem = common.gib(t["peak_gpu_memory_bytes"]) if t["peak_gpu_memory_bytes"] else "-"
        rows.append(
            [
                shape,
                round(t["tokens_per_second"]),
                f"{t['mfu']:.1%}",
                mem,
                round(tr["mixed_tokens_per_second"]),
                round(tr["base_tokens_per_second"]),
                round(tr["mixed_over_base_time"], 2),
            ]
        )
    merge = results["llama3-8b"]["merge"]
    body = "\n\n".join(
        [
            f"Device: {record['device']}; bf16 matmul roof {roof:.1f} TFLOP/s (measured here).",
            "## Training (LoRA r16, bf16, gradient checkpointing, packing) and routed translation "
            "(10 modules)",
            common.markdown_table(
                [
                    "shape",
                    "train tokens/s",
                    "MFU",
                    "peak GPU memory",
                    "mixed-batch gen tokens/s",
                    "base gen tokens/s",
                    "mixed / base time",
                ],
                rows,
            ),
            "## Merge (TIES, 7 rank-16 adapters, lowrank form, on the CPU)",
            f"{merge['modules']} modules of {merge['layers_merged']} layers in {merge['seconds']:.1f} s "
            f"({merge['cpu_threads']} threads; all {SHAPES['llama3-8b']['num_hidden_layers']} layers: "
            f"~{merge['seconds_all_layers_extrapolated']:.0f} s), "
            f"peak RSS +{common.gib(merge['peak_rss_above_start_bytes'])}, "
            f"relative error {merge['rel_error']:.3f}.",
        ]
    )
    common.write_results(common.output_dir(args), record, body)
    return 1 if common.failed_hard_checks(record) else 0


if __name__ == "__main__":
    raise SystemExit(main())
