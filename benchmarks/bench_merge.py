"""Group-wise TIES merge of 7 rank-16 LoRA adapters: datm vs peft's add_weighted_adapter.

- datm: `datm.merge.merge_adapters(sources, out, method="ties", form="lowrank", density=0.2,
  rank=16)` — streams the adapters from disk module by module, TIES on the true ΔW = s·B·A, re-factors
  by (randomized, for large modules) truncated SVD, writes a PEFT adapter.
- peft (the obvious tool): load the base model, `PeftModel.from_pretrained` + `load_adapter` for the
  7 adapters, `add_weighted_adapter(..., combination_type="ties_svd", density=0.2, svd_rank=16)`
  (its defaults otherwise: full-matrices SVD), `save_pretrained` of the merged adapter.

Two settings: (a) adapters on Gemma 3 270M (all linear layers); (b) synthetic adapters on
13B-sized modules (q_proj 5120×5120, up_proj 13824×5120, down_proj 5120×13824 per layer, a fake
model of plain nn.Linear layers for peft), with times extrapolated to 40 layers.

Each side runs in a fresh spawned process. Its time is the span from "what it needs is loaded"
(peft: the base model; datm: nothing) to "merged adapter written". Its memory is the kernel's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs at the start of the span)
minus the RSS at the start of the span, so imports, the base model and the adapters' files in the
page cache count for neither side. Afterwards the main process computes the exact dense TIES of the
ΔWs (`datm.merge.ties_merge`) and each side's relative Frobenius error against it.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
from torch import nn

HEADLINE = "merge_speedup"
METHOD = (
    "Each side in a fresh spawned process. Time: from 'what the side needs is loaded' (peft: the base "
    "model; datm: nothing) to 'merged adapter written' (peft: load 7 adapters, add_weighted_adapter, "
    "save_pretrained; datm: merge_adapters). Memory: kernel resident-set high-water mark (VmHWM, reset "
    "via /proc/self/clear_refs when the span starts) minus the RSS when it starts, so imports and the "
    "base model count for neither side. Error: relative Frobenius error of each written rank-16 "
    "adapter (B·A·scaling) against the exact dense TIES (datm.merge.ties_merge) of the 7 ΔW = s·B·A, "
    "over all modules."
)
N_ADAPTERS, RANK, ALPHA, DENSITY = 7, 16, 32, 0.2
TARGET_LAYERS = 40  # a 13B Llama-style model
# (out_features, in_features) of a 13B Llama-style model's projections, and their parent module.
SHAPES_13B = {
    "q_proj": (5120, 5120),
    "k_proj": (5120, 5120),
    "v_proj": (5120, 5120),
    "o_proj": (5120, 5120),
    "gate_proj": (13824, 5120),
    "up_proj": (13824, 5120),
    "down_proj": (5120, 13824),
}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
DEFAULT_SYNTHETIC_MODULES = ("q_proj", "up_proj", "down_proj")
QUICK_SCALE = 8  # --quick divides the 13B shapes by this (640×640, 1728×640, 640×1728)
QUICK_GEMMA_TARGETS = ["q_proj", "v_proj"]
EXACT_BOUND_MAX_DIM = 1024  # the optimal rank-r error (exact SVD) is computed up to this smaller dim


# --------------------------------------------------------------------------------------------------
# Synthetic 13B-sized model
# --------------------------------------------------------------------------------------------------


class FakeModel(nn.Module):
    """`model.layers[i].{self_attn,mlp}.<proj>` as bias-free nn.Linear layers, like a Llama model's
    names, so peft's `target_modules` and datm's module names work unchanged."""

    def __init__(self, layers: int, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            for parent in sorted({PARENT[name] for name in shapes}):
                block.add_module(parent, nn.Module())
            for name, (out_features, in_features) in shapes.items():
                # bf16 zeros: resident (touched) before either side's span starts, never initialised
                linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=torch.bfloat16)
                linear.to_empty(device="cpu")
                nn.init.zeros_(linear.weight)
                linear.weight.requires_grad_(False)
                getattr(block, PARENT[name]).add_module(name, linear)
            self.model.layers.append(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise NotImplementedError("a stand-in for a model's module names and shapes only")


def synthetic_shapes(modules: list[str], scale: int) -> dict[str, tuple[int, int]]:
    return {m: (SHAPES_13B[m][0] // scale, SHAPES_13B[m][1] // scale) for m in modules}


# --------------------------------------------------------------------------------------------------
# The two sides (each in a fresh process)
# --------------------------------------------------------------------------------------------------


def run_datm(spec: dict[str, Any]) -> dict[str, Any]:
    from datm.merge import merge_adapters

    common.set_threads(spec["threads"])
    with common.PeakMeter() as meter:
        result = merge_adapters(
            [Path(p) for p in spec["sources"]],
            Path(spec["out"]),
            method="ties",
            form="lowrank",
            density=DENSITY,
            rank=RANK,
            progress=False,
        )
    return {**meter.as_dict(), "rel_error_reported_vs_merged_dW": result.rel_error, "out": spec["out"]}


def run_peft(spec: dict[str, Any]) -> dict[str, Any]:
    from peft import PeftModel

    common.set_threads(spec["threads"])
    if spec["base"] == "gemma":
        from datm import models

        base = models.load_model(spec["model_path"])
    else:
        base = FakeModel(spec["layers"], {k: tuple(v) for k, v in spec["shapes"].items()})
    names = [f"a{i}" for i in range(len(spec["sources"]))]
    with common.PeakMeter() as meter:
        start = time.perf_counter()
        peft_model = PeftModel.from_pretrained(base, spec["sources"][0], adapter_name=names[0])
        for name, source in zip(names[1:], spec["sources"][1:], strict=True):
            peft_model.load_adapter(source, adapter_name=name)
        loaded = time.perf_counter()
        rss_loaded = common.rss_bytes()
        peft_model.add_weighted_adapter(
            names,
            [1.0] * len(names),
            "merged",
            combination_type="ties_svd",
            density=DENSITY,
            svd_rank=RANK,
        )
        merged = time.perf_counter()
        peft_model.save_pretrained(spec["out"], selected_adapters=["merged"])
        saved = time.perf_counter()
    return {
        **meter.as_dict(),
        "load_adapters_seconds": loaded - start,
        "add_weighted_adapter_seconds": merged - loaded,
        "save_seconds": saved - merged,
        "adapters_resident_bytes": rss_loaded - meter.baseline,
        "out": str(Path(spec["out"]) / "merged"),  # peft saves a non-default adapter in a subfolder
    }


# --------------------------------------------------------------------------------------------------
# Reconstruction error against the exact dense TIES merge
# --------------------------------------------------------------------------------------------------


def reconstruction_errors(sources: list[Path], outputs: dict[str, Path]) -> dict[str, Any]:
    """‖exact TIES ΔW − side's B·A·scaling‖_F / ‖exact TIES ΔW‖_F over all modules, per side; also
    the best any rank-16 LoRA can do (exact SVD truncation; small modules only) and how far peft's
    own dense TIES is from datm's (they differ only in rounding k and in ties)."""
    from contextlib import ExitStack

    from peft.utils.merge_utils import ties as peft_ties
    from safetensors import safe_open

    from datm.merge import delta_of, plan_merge, read_source, ties_merge

    srcs = [read_source(p) for p in sources]
    outs = {name: read_source(p) for name, p in outputs.items()}
    tasks = plan_merge(srcs)
    exact_sq = 0.0
    error_sq = dict.fromkeys(outs, 0.0)
    bound_sq = bound_norm_sq = 0.0
    variant_sq = variant_norm_sq = 0.0
    bound_modules = 0
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(s.weights_file, "pt")) for s in srcs]
        out_handles = {n: stack.enter_context(safe_open(s.weights_file, "pt")) for n, s in outs.items()}
        for task in tasks:
            deltas = [
                delta_of(h.get_tensor(a), h.get_tensor(b), s)
                for h, a, b, s in zip(handles, task.a_keys, task.b_keys, task.scalings, strict=True)
            ]
            exact = ties_merge(deltas, DENSITY)
            norm_sq = float(exact.square().sum())
            exact_sq += norm_sq
            for name, src in outs.items():
                mod = src.modules[task.name]
                h = out_handles[name]
                written = delta_of(h.get_tensor(mod.a_key), h.get_tensor(mod.b_key), mod.scaling)
                error_sq[name] += float((exact - written).square().sum())
            if min(exact.shape) <= EXACT_BOUND_MAX_DIM:
                singular = torch.linalg.svdvals(exact)
                bound_sq += float(singular[RANK:].square().sum())
                bound_norm_sq += norm_sq
                bound_modules += 1
                theirs = peft_ties(deltas, torch.ones(len(deltas)), DENSITY, "total")
                variant_sq += float((exact - theirs).square().sum())
                variant_norm_sq += norm_sq
            del deltas, exact
    rel = {name: math.sqrt(e / exact_sq) if exact_sq else 0.0 for name, e in error_sq.items()}
    return {
        "rel_error": rel,
        "optimal_rank_r_rel_error": math.sqrt(bound_sq / bound_norm_sq) if bound_norm_sq else None,
        "optimal_bound_modules": f"{bound_modules} of {len(tasks)} (smaller dim <= {EXACT_BOUND_MAX_DIM})",
        "peft_dense_ties_vs_exact_rel": math.sqrt(variant_sq / variant_norm_sq) if variant_norm_sq else None,
        "modules": len(tasks),
    }


# --------------------------------------------------------------------------------------------------
# One setting
# --------------------------------------------------------------------------------------------------


def compare(
    label: str, sources: list[Path], peft_spec: dict[str, Any], work: Path, threads: int | None
) -> dict:
    common.log(f"[{label}] datm side (fresh process)")
    datm_side = common.run_isolated(
        run_datm, {"sources": [str(p) for p in sources], "out": str(work / "datm-merged"), "threads": threads}
    )
    common.log(
        f"[{label}] datm: {datm_side['seconds']:.2f} s, "
        f"peak +{common.gib(datm_side['peak_above_baseline_bytes'])}"
    )
    common.log(f"[{label}] peft side (fresh process)")
    peft_side = common.run_isolated(
        run_peft,
        {
            **peft_spec,
            "sources": [str(p) for p in sources],
            "out": str(work / "peft-merged"),
            "threads": threads,
        },
    )
    common.log(
        f"[{label}] peft: {peft_side['seconds']:.2f} s (load {peft_side['load_adapters_seconds']:.2f}, merge "
        f"{peft_side['add_weighted_adapter_seconds']:.2f}, save {peft_side['save_seconds']:.2f}), "
        f"peak +{common.gib(peft_side['peak_above_baseline_bytes'])}"
    )
    common.log(f"[{label}] reconstruction error against the exact dense TIES merge")
    errors = reconstruction_errors(sources, {"datm": Path(datm_side["out"]), "peft": Path(peft_side["out"])})
    common.log(
        f"[{label}] rel. error: datm {errors['rel_error']['datm']:.4f}, "
        f"peft {errors['rel_error']['peft']:.4f}"
        + (
            f", best rank-{RANK} {errors['optimal_rank_r_rel_error']:.4f}"
            if errors["optimal_rank_r_rel_error"] is not None
            else ""
        )
    )
    return {
        "datm": datm_side,
        "peft": peft_side,
        "errors": errors,
        "merge_speedup": peft_side["seconds"] / datm_side["seconds"],
        "merge_only_speedup": peft_side["add_weighted_adapter_seconds"] / datm_side["seconds"],
        "merge_memory_ratio": common.ratio(
            datm_side["peak_above_baseline_bytes"], peft_side["peak_above_baseline_bytes"]
        ),
        "error_ratio": common.ratio(errors["rel_error"]["datm"], errors["rel_error"]["peft"]),
    }


def extrapolate(result: dict[str, Any], layers: int) -> dict[str, Any]:
    """Times scale linearly with the number of layers (every module is merged once). Peak memory
    does not: both sides hold one module's ΔWs at a time, so the peak is set by the largest module;
    only what stays resident grows with layers (peft keeps all 7 adapters loaded, datm streams)."""
    factor = TARGET_LAYERS / layers
    peft, datm = result["peft"], result["datm"]
    peft_peak = peft["peak_above_baseline_bytes"] + max(0, peft["adapters_resident_bytes"]) * (factor - 1)
    datm_peak = datm["peak_above_baseline_bytes"]
    return {
        "layers": TARGET_LAYERS,
        "datm_seconds": datm["seconds"] * factor,
        "peft_seconds": peft["seconds"] * factor,
        "datm_peak_bytes": datm_peak,
        "peft_peak_bytes": peft_peak,
        "merge_memory_ratio": common.ratio(datm_peak, peft_peak),
        "rule": "seconds × 40/layers for both; peak = measured peak (+ peft's resident adapters × "
        "(40/layers − 1)): per-module streaming does not grow with depth",
    }


def side_rows(label: str, result: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for side in ("datm", "peft"):
        r = result[side]
        rows.append(
            [label, side, r["seconds"], common.gib(r["peak_above_baseline_bytes"]),
             f"{result['errors']['rel_error'][side]:.4f}"]
        )  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = common.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=None, help="synthetic layers (default 1; --quick 1)")
    parser.add_argument(
        "--modules",
        default=",".join(DEFAULT_SYNTHETIC_MODULES),
        help=f"synthetic modules per layer, from {','.join(SHAPES_13B)} ('all' for every one)",
    )
    parser.add_argument("--skip-gemma", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    args = parser.parse_args()
    if args.quick and args.threads is None:
        args.threads = 1  # quick runs check plumbing, often on a shared machine (see README)
    common.set_threads(args.threads)
    out_dir = common.output_dir(args)
    layers = args.layers or 1
    modules = list(SHAPES_13B) if args.modules == "all" else [m.strip() for m in args.modules.split(",")]
    unknown = [m for m in modules if m not in SHAPES_13B]
    if unknown:
        raise common.BenchError(f"--modules: unknown {unknown}; expected names from {list(SHAPES_13B)}")
    scale = QUICK_SCALE if args.quick else 1
    shapes = synthetic_shapes(modules, scale)
    gemma_targets: list[str] | str = QUICK_GEMMA_TARGETS if args.quick else "all-linear"
    settings = {
        "adapters": N_ADAPTERS,
        "rank": RANK,
        "lora_alpha": ALPHA,
        "density": DENSITY,
        "datm_call": "merge_adapters(method='ties', form='lowrank', density=0.2, rank=16)",
        "peft_call": "add_weighted_adapter(combination_type='ties_svd', density=0.2, svd_rank=16) "
        "(svd_full_matrices default True)",
        "gemma_targets": gemma_targets,
        "synthetic_layers": layers,
        "synthetic_shapes_out_in": shapes,
        "extrapolated_to_layers": TARGET_LAYERS,
    }
    record = common.new_record("bench_merge", HEADLINE, args.quick, settings, args.allow_load)
    results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="datm-bench-merge-") as tmp:
        work = Path(tmp)
        names = [f"adapter{i}" for i in range(N_ADAPTERS)]
        if not args.skip_gemma:
            from datm import models

            model_path = common.base_model_path()
            common.log(
                f"[gemma] making {N_ADAPTERS} random rank-{RANK} adapters on Gemma 3 270M ({gemma_targets})"
            )
            model = models.load_model(model_path)
            paths = common.make_random_lora_adapters(
                model, work / "gemma-adapters", names, RANK, ALPHA, gemma_targets, args.seed
            )
            del model
            results["gemma"] = compare(
                "gemma",
                [paths[n] for n in names],
                {"base": "gemma", "model_path": model_path},
                work / "gemma",
                args.threads,
            )
        if not args.skip_synthetic:
            common.log(
                f"[13b] making {N_ADAPTERS} random rank-{RANK} adapters on {layers} layer(s) of {shapes}"
            )
            fake = FakeModel(layers, shapes)
            paths = common.make_random_lora_adapters(
                fake, work / "synthetic-adapters", names, RANK, ALPHA, modules, args.seed
            )
            del fake
            result = compare(
                "13b",
                [paths[n] for n in names],
                {"base": "synthetic", "layers": layers, "shapes": shapes},
                work / "synthetic",
                args.threads,
            )
            result["extrapolated"] = extrapolate(result, layers)
            results["synthetic_13b"] = result

    for label, result in results.items():
        common.add_check(
            record,
            f"{label}: datm error no worse than peft's",
            result["errors"]["rel_error"]["datm"] <= result["errors"]["rel_error"]["peft"] * 1.001,
            f"datm {result['errors']['rel_error']['datm']:.4f} vs "
            f"peft {result['errors']['rel_error']['peft']:.4f} "
            "(relative Frobenius error against the exact dense TIES of the ΔWs)",
            hard=False,
        )
    headline = results.get("synthetic_13b") or results.get("gemma")
    record.update(
        {
            HEADLINE: headline["merge_speedup"] if headline else None,
            "merge_memory_ratio": headline["merge_memory_ratio"] if headline else None,
            "headline_setting": "synthetic_13b" if "synthetic_13b" in results else "gemma",
            "merge_memory_ratio_40_layers": (
                results["synthetic_13b"]["extrapolated"]["merge_memory_ratio"]
                if "synthetic_13b" in results
                else None
            ),
            "merge_speedup_gemma": results["gemma"]["merge_speedup"] if "gemma" in results else None,
            "merge_memory_ratio_gemma": results["gemma"]["merge_memory_ratio"]
            if "gemma" in results
            else None,
            "results": results,
            "method": METHOD,
        }
    )

    print()
    rows = [row for label, result in results.items() for row in side_rows(label, result)]
    for row in rows:
        print(f"{row[0]:>14} {row[1]:>5}: {row[2]:8.2f} s, peak +{row[3]}, rel. error {row[4]}")
    for label, result in results.items():
        print(
            f"{label}: merge_speedup = {result['merge_speedup']:.2f}x (merge call only "
            f"{result['merge_only_speedup']:.2f}x), merge_memory_ratio = {result['merge_memory_ratio']:.2f}"
        )
        if "extrapolated" in result:
            ex = result["extrapolated"]
            print(
                f"{label} at {ex['layers']} layers (extrapolated): datm {ex['datm_seconds']:.0f} s, "
                f"peft {ex['peft_seconds']:.0f} s; peak datm +{common.gib(ex['datm_peak_bytes'])}, "
                f"peft +{common.gib(ex['peft_peak_bytes'])}"
            )

    parts = [
        "## What is measured\n\n" + record["method"],
        "## Results\n\n"
        + common.markdown_table(
            ["setting", "side", "seconds", "peak RSS above start", "rel. error vs exact TIES"], rows
        ),
    ]
    for label, result in results.items():
        errors = result["errors"]
        text = (
            f"**{label}**: merge_speedup (peft / datm time) = **{result['merge_speedup']:.2f}×** "
            f"(add_weighted_adapter alone vs datm end-to-end: {result['merge_only_speedup']:.2f}×); "
            f"merge_memory_ratio (datm / peft peak) = **{result['merge_memory_ratio']:.2f}**; "
            f"error ratio (datm / peft) = {result['error_ratio']:.3f}. peft phases: load adapters "
            f"{result['peft']['load_adapters_seconds']:.2f} s, add_weighted_adapter "
            f"{result['peft']['add_weighted_adapter_seconds']:.2f} s, "
            f"save {result['peft']['save_seconds']:.2f} s. "
            f"{errors['modules']} modules."
        )
        if errors["optimal_rank_r_rel_error"] is not None:
            text += (
                f" Best possible rank-{RANK} error (exact SVD of the exact TIES, "
                f"{errors['optimal_bound_modules']}): "
                f"{errors['optimal_rank_r_rel_error']:.4f}; peft's dense TIES vs datm's exact TIES: "
                f"{errors['peft_dense_ties_vs_exact_rel']:.2e}."
            )
        if "extrapolated" in result:
            ex = result["extrapolated"]
            text += (
                f"\n\nExtrapolated to {ex['layers']} layers of the same modules: "
                f"datm {ex['datm_seconds']:.0f} s, "
                f"peft {ex['peft_seconds']:.0f} s; peak datm +{common.gib(ex['datm_peak_bytes'])}, peft "
                f"+{common.gib(ex['peft_peak_bytes'])} (ratio {ex['merge_memory_ratio']:.2f}). "
                f"Rule: {ex['rule']}. "
                "Neither figure includes the base model, which peft needs resident (26 GB for a 13B "
                "model in bf16) and datm does not read at all."
            )
        parts.append(text)
    common.write_results(out_dir, record, "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
