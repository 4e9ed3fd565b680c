"""What `datm plan` and `datm tasks` print: the plan with its modules, parameters shipped and the
paper's counts beside them, what `merge: auto` adds, and the task graph with each task's status."""

from __future__ import annotations

import json
from collections import Counter

from datm import models
from datm.artifacts import RunDir
from datm.auto import build_plan
from datm.config import Config
from datm.log import get_logger
from datm.merge.forms import get_form, merged_module_parameters
from datm.plan import Plan, shipped_parameters
from datm.run.graph import build_tasks, format_status, task_status

log = get_logger(__name__)


def describe_plan(cfg: Config, as_json: bool = False) -> str:
    plan = build_plan(cfg)
    if as_json:
        return json.dumps(plan.to_dict(), indent=2)
    base_params = module_params = None
    merge_params: dict[str, int] = {}
    try:
        meta = models.meta_model(models.resolve(cfg.base_model))
        base_params = sum(p.numel() for p in meta.parameters())
        module_params = models.lora_parameter_count(meta, cfg.lora.r, cfg.lora.target_modules)
        rank = cfg.merge.rank or cfg.lora.r
        merge_params = merged_module_parameters(
            plan,
            cfg.merge.form,
            models.lora_parameter_count(meta, rank, cfg.lora.target_modules),
            models.linear_parameter_count(meta, cfg.lora.target_modules),
            cfg.merge.density,
        )
    except Exception as e:  # counting is informative only; the plan itself is still valid
        log.warning(f"(parameter counts unavailable: {e})")
    text = format_plan(plan, base_params, module_params, merge_params, cfg.merge.form)
    from datm.merge.select import describe as describe_selection

    text += "".join(f"\n{line}" for line in describe_selection(cfg, plan))  # merge: auto's extra work
    text += describe_dev(plan)
    kinds = Counter(t.kind for t in build_tasks(plan, RunDir(cfg.output_dir)))
    text += f"\ntasks: {sum(kinds.values())} = " + ", ".join(f"{n} {k}" for k, n in kinds.items())
    if base_params is not None and module_params is not None:
        total = shipped_parameters(plan, base_params, module_params, merge_params)
        text += "".join(
            f"\n{line}" for line in paper_comparison(plan, cfg, base_params, module_params, total)
        )
    return text


def describe_dev(plan: Plan) -> str:
    """Where the dev pairs the run decides on come from (plan.json's `dev`), or nothing."""
    if not plan.dev:
        return ""
    valid, held = plan.dev["valid"], plan.dev["held_out"]
    text = "\ndev pairs (decide auto's pilot and merge auto; never the test split):"
    if valid:
        text += f" data.valid for {', '.join(valid)}"
    if held:
        text += (
            f"{';' if valid else ''} {plan.dev['valid_holdout']} training pairs held out of every training "
            f"(seed {plan.dev['seed']}) for {', '.join(held)}"
        )
    return text


# Parameters shipped at X-ALMA's setting (its 49 languages and 8 groups, a 13B Llama-2 base), as
# published: Zheng et al. (2025) compare DATM's 17B with X-ALMA's 29B.
PAPER_SHIPPED = {"datm": 17e9, "group": 29e9}
XALMA_MODULES = 8  # X-ALMA ships one module per group


def paper_comparison(plan: Plan, cfg: Config, base: int, module: int, total: int) -> list[str]:
    """datm's count next to the paper's, where the plan is the paper's setting."""
    from datm.languages import XALMA_GROUPS

    xalma_langs = sorted(x for members in XALMA_GROUPS.values() for x in members)
    if sorted(plan.languages) != xalma_langs or plan.groups != XALMA_GROUPS or not 12e9 < base < 14e9:
        return []
    per_rank = module / cfg.lora.r  # a LoRA's size grows linearly with its rank
    r_datm = (PAPER_SHIPPED["datm"] - base) / 16 / per_rank
    xalma_module = (PAPER_SHIPPED["group"] - base) / XALMA_MODULES
    return [
        "paper (Zheng et al. 2025; X-ALMA's 50 languages, 13B base): DATM 17B vs X-ALMA 29B shipped",
        f"datm ({plan.strategy}): {total / 1e9:.2f}B = base {base / 1e9:.2f}B + {len(plan.shipped)} modules "
        f"x {module / 1e6:.1f}M (LoRA r={cfg.lora.r}, {cfg.lora.target_modules})",
        f"  a module is r x {per_rank / 1e6:.2f}M parameters on this base: the paper's 17B = base + 16 "
        "modules "
        f"means r ~ {r_datm:.0f}; X-ALMA's 29B = base + {XALMA_MODULES} group modules of "
        f"~{xalma_module / 1e9:.1f}B (r ~ {xalma_module / per_rank:.0f} by the same count). DATM ships twice "
        "as many modules, each a fraction of the size; with another lora.r, datm's count is "
        f"base + {len(plan.shipped)} x r x {per_rank / 1e6:.2f}M.",
    ]


def format_plan(
    plan: Plan,
    base_params: int | None = None,
    module_params: int | None = None,
    merge_params: dict[str, int] | None = None,
    merge_form: str = "lowrank",
) -> str:
    lines = [f"strategy: {plan.strategy}    groups: " + ", ".join(f"{g}={m}" for g, m in plan.groups.items())]
    lines.append("")
    lines.append(f"{'module':<22} {'kind':<8} {'built from':<40} serves")
    for a in plan.adapters:
        serves = [d for d, m in plan.routes.items() if m == a.name]
        lines.append(f"{a.name:<22} {'train':<8} {','.join(a.directions)[:40]:<40} {','.join(serves) or '-'}")
    for m in plan.merges:
        serves = [d for d, mod in plan.routes.items() if mod == m.name]
        lines.append(f"{m.name:<22} {m.method:<8} {','.join(m.sources)[:40]:<40} {','.join(serves)}")
    lines.append("")
    lines.append(
        f"adapters trained: {len(plan.adapters)}   merges: {len(plan.merges)}   "
        f"modules shipped: {len(plan.shipped)}"
    )
    if base_params is not None and module_params is not None:
        merge_params = merge_params or {}
        total = shipped_parameters(plan, base_params, module_params, merge_params)
        shipped_merges = [m for m in plan.shipped if m in merge_params]
        n_adapters = len(plan.shipped) - len(shipped_merges)
        parts = f"base {base_params:,} + {n_adapters} x {module_params:,}"
        if shipped_merges:
            bound = "≤ " if get_form(merge_form).size_is_bound else ""
            parts += f" + merged ({merge_form}): " + ", ".join(
                f"{bound}{merge_params[m]:,}" for m in shipped_merges
            )
        lines.append(f"parameters shipped: {total:,} = {parts}")
    if plan.decided_by:
        by = plan.decided_by
        lines.append(
            f"decided by: {by.get('source')} measurements > threshold {by.get('threshold')} "
            f"({by.get('measurements')})"
        )
        if by.get("note"):
            lines.append(f"  {by['note']}")
    for d, why in plan.notes.items():
        lines.append(f"  {d}: {why}")
    return "\n".join(lines)


def describe_tasks(cfg: Config, as_json: bool = False) -> str:
    """The task graph with each task's status, as a table or as JSON (for job arrays)."""
    plan = build_plan(cfg)
    run_dir = RunDir(cfg.output_dir)
    rows = task_status(run_dir, build_tasks(plan, run_dir))
    if as_json:
        doc = {"config": cfg.source, "output_dir": str(run_dir.root), "executor": cfg.executor, "tasks": rows}
        return json.dumps(doc, indent=2)
    return format_status(rows)
