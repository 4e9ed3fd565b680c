"""`merge: {method: auto}`: choose each group's merge by translation quality on the dev set.

Per merge (group), every candidate (method × density × rank) is merged into
`candidates/MERGE/CANDIDATE/module/` through the public `merge_adapters`, the group's **dev** sentences
of the directions the merged module serves are translated with it, and chrF++ is scored. The best
candidate (highest mean chrF++ over those directions; ties go to the smaller module, then to the
earlier candidate in the config) is published as `merged/MERGE/`, and the table of candidates with the
choice goes into its `merge_info.json` (key `selection`) and the run's report.

The dev sentences are the first `merge.dev_size` of a direction's dev pairs (`datm.data.dev`: the
`valid` split where it has one, otherwise `data.valid_holdout` seeded training pairs that training
then does not use). The test split is never read here.

Everything is an artifact: a finished candidate merge (merge_adapters' DONE marker) or candidate
translation (`translations.json`, made for a fingerprinted dev set with recorded eval settings) is
reused when the task runs again with the same dev set and settings. The selection records those
settings too (`settings`), and a rerun that asks for others is refused (`datm.runner`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datm import artifacts, data
from datm import languages as L
from datm.artifacts import RunDir
from datm.config import Config, ConfigError
from datm.config.candidates import AUTO, Candidate, config_candidates, normalizing_methods
from datm.data import dev as dev_data
from datm.eval.worker import Worker, made_with, translation_session
from datm.plan import Plan

SELECTION_FILE = "selection.json"
TRANSLATIONS_FILE = "translations.json"


# --- dev sets ----------------------------------------------------------------------------------------


def auto_merges(cfg: Config, plan: Plan) -> dict[str, list[str]]:
    """merge name -> the directions it serves, for the plan's merges chosen by `auto`."""
    return {
        m.name: [d for d, mod in plan.routes.items() if mod == m.name]
        for m in plan.merges
        if m.method == AUTO
    }


def dev_pairs(cfg: Config, direction: L.Direction) -> tuple[str, list[data.Pair]]:
    """('valid' | 'held-out', the first `merge.dev_size` dev pairs) of one direction (`datm.data.dev`)."""
    origin, pairs = dev_data.dev_pairs(cfg.dev_rule(), direction)
    return origin, pairs[: cfg.merge.dev_size]


def chosen_with(run: RunDir, name: str) -> dict[str, Any] | None:
    """The eval settings whose dev translations chose the finished merge `name` (None: not finished,
    or chosen before datm recorded them)."""
    from datm.merge.base import MERGE_INFO

    if not artifacts.is_done(run.merged(name)):
        return None
    return artifacts.read_json(run.merged(name) / MERGE_INFO).get("selection", {}).get("settings")


def describe(cfg: Config, plan: Plan) -> list[str]:
    """What `auto` adds to a plan: candidate merges, dev translations and where the dev sets come from."""
    merges = auto_merges(cfg, plan)
    if not merges:
        return []
    cands = config_candidates(cfg)
    n_dirs = sum(len(d) for d in merges.values())
    lines = [
        f"merge auto: {len(cands)} candidates x {len(merges)} merges = {len(cands) * len(merges)} candidate "
        f"merges, {len(cands) * n_dirs} dev translations ({len(cands)} x {n_dirs} directions, "
        f"<= {cfg.merge.dev_size} sentences each), chosen by chrF++ on {cfg.merge.select_on}",
        "  candidates: " + ", ".join(c.name for c in cands),
    ]
    rule = cfg.dev_rule()
    for name, directions in merges.items():
        for d in directions:
            if dev_data.has_valid(rule, L.Direction.parse(d)):
                src = f"valid split (first {cfg.merge.dev_size})"
            else:
                src = f"no valid split: the first {cfg.merge.dev_size} of its held-out training pairs"
            lines.append(f"  dev {d} ({name}): {src}")
    return lines


# --- choosing ----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One candidate's line of the selection table."""

    candidate: str
    method: str
    density: float
    rank: int | None
    chrf: dict[str, float]  # per direction, on the dev set
    mean_chrf: float
    bytes: int
    merge_seconds: float
    same_as: str | None = None  # an earlier candidate that wrote identical weights (not re-translated)
    scale: float = 1.0  # the candidate's global scale λ


@dataclass(frozen=True)
class Selection:
    """merge auto's choice for one merge: the dev sets, every candidate's row, the chosen one and the
    eval settings its dev translations were made with (selection.json; `selection` in merge_info.json)."""

    select_on: str
    dev: dict[str, dict[str, Any]]  # direction -> where its dev set comes from, size, fingerprint
    candidates: list[Row]
    chosen: str
    settings: dict[str, Any]
    metric: str = "chrF++ (mean over the merged module's directions)"
    rule: str = "highest mean dev chrF++; ties: fewer bytes, then the earlier candidate"

    def to_json(self) -> dict[str, Any]:
        return {
            "select_on": self.select_on,
            "metric": self.metric,
            "rule": self.rule,
            "dev": self.dev,
            "candidates": [asdict(r) for r in self.candidates],
            "chosen": self.chosen,
            "settings": self.settings,
        }


def dev_settings(cfg: Config, model_path: str) -> dict[str, Any]:
    """What merge auto's dev translations are made with (eval decoding and engine; every candidate
    has the config's merge form, so one engine translates them all)."""
    from datm.merge.forms import FORMS

    return made_with(cfg, model_path, FORMS[cfg.merge.form].applied_as)


def choose(rows: list[Row]) -> Row:
    """Highest mean dev chrF++; ties go to the smaller module, then to the earlier candidate."""
    order = {id(r): i for i, r in enumerate(rows)}
    return min(rows, key=lambda r: (-r.mean_chrf, r.bytes, order[id(r)]))


def _fingerprint(module: Path) -> str:
    return artifacts.fingerprint_files(sorted(module.glob("*.safetensors")))


def _translate(
    cfg: Config,
    worker: Worker,
    modules: dict[str, Path],
    devs: dict[str, list[data.Pair]],
    done: Callable[[str, dict[str, list[str]]], None],
) -> None:
    """Dev hypotheses of each module (direction -> lines), one base model for all; `done(name, hyps)`
    is called as each module finishes, so that a killed task keeps what it translated."""
    from datm.eval.translate import Request

    with translation_session(worker, modules, cfg) as translate:
        requests = [Request(L.Direction.parse(d), p.src) for d, pairs in devs.items() for p in pairs]
        for name in modules:
            hyps = translate(requests, dict.fromkeys(devs, name))
            by_direction, start = {}, 0
            for d, pairs in devs.items():
                by_direction[d] = hyps[start : start + len(pairs)]
                start += len(pairs)
            done(name, by_direction)


def select_merge(cfg: Config, plan: Plan, run: RunDir, name: str, worker: Worker) -> Selection:
    """Merge `name` with every candidate, score each on the dev set, publish the best as
    `run.merged(name)`; returns the selection (also in its merge_info.json)."""
    from datm.merge.base import MERGE_INFO

    selection = score_candidates(cfg, plan, run, name, worker)
    _publish(run.candidate_module(name, selection.chosen), run.merged(name), selection, MERGE_INFO)
    return selection


def score_candidates(cfg: Config, plan: Plan, run: RunDir, name: str, worker: Worker) -> Selection:
    """Merge `name` with every candidate of `cfg.merge` and score each on the dev set (finished
    merges and dev translations are reused); the selection table and choice, also written to
    `run.candidates(name)/selection.json`. Publishes nothing."""
    from datm.eval import evaluate

    devs, dev_origin = _dev_sets(cfg, plan, name)
    settings = dev_settings(cfg, worker.model_path)  # what the dev translations are made with
    cands = config_candidates(cfg)
    results, same_as = _merge_candidates(cfg, plan, run, name, cands, worker)
    hyps = _dev_translations(cfg, run, name, [c for c in cands if same_as[c.name] is None], devs, worker)
    refs = {d: [p.tgt for p in pairs] for d, pairs in devs.items()}
    for d, pairs in devs.items():  # what the candidates were scored on, for people to read
        src, ref = run.candidate_dev(name, d)
        artifacts.atomic_write_text(src, data.write_text(p.src for p in pairs))
        artifacts.atomic_write_text(ref, data.write_text(refs[d]))
    rows = []
    for c in cands:
        h = hyps[same_as[c.name] or c.name]
        chrf = {d: round(evaluate.score_chrf(h[d], refs[d])[0], 4) for d in devs}
        res = results[c.name]
        mean = round(sum(chrf.values()) / len(chrf), 4)
        rows.append(
            Row(
                c.name,
                c.method,
                c.density,
                res.rank,
                chrf,
                mean,
                res.bytes,
                res.seconds,
                same_as[c.name],
                c.scale,
            )
        )
    dev = {
        d: {
            "source": dev_origin[d],
            "n": len(devs[d]),
            "fingerprint": artifacts.fingerprint_texts(f"{p.src}\t{p.tgt}" for p in devs[d]),
        }
        for d in devs
    }
    selection = Selection(cfg.merge.select_on, dev, rows, choose(rows).candidate, settings)
    artifacts.atomic_write_json(run.candidates(name) / SELECTION_FILE, selection.to_json())
    return selection


def _dev_sets(cfg: Config, plan: Plan, name: str) -> tuple[dict[str, list[data.Pair]], dict[str, str]]:
    """The dev pairs of each direction the merged module serves, and where each set comes from."""
    devs: dict[str, list[data.Pair]] = {}
    dev_origin: dict[str, str] = {}
    for d in auto_merges(cfg, plan)[name]:
        dev_origin[d], devs[d] = dev_pairs(cfg, L.Direction.parse(d))
        if not devs[d]:
            raise ConfigError(f"{cfg.source}: the dev set of {d} is empty; merge auto needs dev sentences")
    return devs, dev_origin


def _merge_candidates(
    cfg: Config, plan: Plan, run: RunDir, name: str, cands: list[Candidate], worker: Worker
) -> tuple[dict[str, Any], dict[str, str | None]]:
    """Every candidate merged (finished ones reused): the merge results, and for each candidate the
    earlier candidate whose module is byte-identical (None: its own)."""
    from datm.merge import merge_adapters

    spec = next(m for m in plan.merges if m.name == name)
    sources = [run.adapter(s) for s in spec.sources]
    results, prints = {}, {}
    for c in cands:
        results[c.name] = merge_adapters(
            sources,
            run.candidate_module(name, c.name),
            method=c.method,
            density=c.density,
            rank=c.rank,
            form=cfg.merge.form,
            weights=cfg.merge.weights,
            progress=worker.progress,
            scale=c.scale,
            normalize=cfg.merge.normalize if c.method in normalizing_methods() else None,
        )
        prints[c.name] = _fingerprint(run.candidate_module(name, c.name))
    same_as = {}
    for i, c in enumerate(cands):
        same_as[c.name] = next((e.name for e in cands[:i] if prints[e.name] == prints[c.name]), None)
    return results, same_as


def _dev_translations(
    cfg: Config,
    run: RunDir,
    name: str,
    cands: list[Candidate],
    devs: dict[str, list[data.Pair]],
    worker: Worker,
) -> dict[str, dict[str, list[str]]]:
    """Each candidate's dev translations: those kept from before for the same dev sources and eval
    settings, the others made now (each written as soon as its candidate is translated)."""
    dev_fp = artifacts.fingerprint_obj({d: [p.src for p in pairs] for d, pairs in devs.items()})
    settings = dev_settings(cfg, worker.model_path)

    def recorded(c: Candidate) -> dict[str, list[str]] | None:
        f = run.candidate(name, c.name) / TRANSLATIONS_FILE
        if not f.is_file():
            return None
        rec = artifacts.read_json(f)
        same = rec.get("dev_fingerprint") == dev_fp and rec.get("settings") == settings
        return rec["hyps"] if same else None

    kept = {c.name: recorded(c) for c in cands}
    hyps = {n: h for n, h in kept.items() if h is not None}
    todo = {n: run.candidate_module(name, n) for n, h in kept.items() if h is None}

    def record(n: str, h: dict[str, list[str]]) -> None:
        artifacts.atomic_write_json(
            run.candidate(name, n) / TRANSLATIONS_FILE,
            {"dev_fingerprint": dev_fp, "settings": settings, "hyps": h},
        )
        hyps[n] = h

    if todo:
        _translate(cfg, worker, todo, devs, record)
    return hyps


def _publish(module: Path, final: Path, selection: Selection, info_name: str) -> None:
    """A copy of the chosen candidate's module as the group's merged module, its merge_info.json
    extended with the selection."""
    staging = artifacts.staging_dir(final)
    for f in module.iterdir():
        if f.is_file() and f.name != artifacts.DONE:
            shutil.copy2(f, staging / f.name)
    info = artifacts.read_json(staging / info_name)
    info["out"] = str(final)
    info["selection"] = selection.to_json()
    artifacts.atomic_write_json(staging / info_name, info)
    artifacts.publish_dir(staging, final)
    done = artifacts.read_json(module / artifacts.DONE)
    artifacts.mark_done(
        final,
        {k: v for k, v in done.items() if k != "finished_at"}
        | {"out": str(final), "chosen": selection.chosen},
    )


# --- report ------------------------------------------------------------------------------------------


def report_section(run_dir: Path, merges: Iterable[Path] | None = None) -> str:
    """Markdown: each auto-chosen merge's candidates table and choice ('' when there is none)."""
    infos = merges if merges is not None else sorted(RunDir(run_dir).merged_dir.glob("*/merge_info.json"))
    out: list[str] = []
    for f in infos:
        sel = artifacts.read_json(f).get("selection")
        if not sel:
            continue
        if not out:
            out += ["## Merge chosen on the dev set (merge: auto)", ""]
        dirs = list(sel["dev"])
        dev = ", ".join(f"{d}: {v['n']} {v['source']}" for d, v in sel["dev"].items())
        out += [f"### {Path(f).parent.name}: chose `{sel['chosen']}`", "", f"Dev sentences: {dev}.", ""]
        out.append("| candidate | " + " | ".join(f"{d} chrF++" for d in dirs) + " | mean | MB | merge s |")
        out.append("|---" * (len(dirs) + 4) + "|")
        for r in sel["candidates"]:
            mark = "**" if r["candidate"] == sel["chosen"] else ""
            cells = " | ".join(f"{r['chrf'][d]:.2f}" for d in dirs)
            out.append(
                f"| {mark}{r['candidate']}{mark} | {cells} | {r['mean_chrf']:.2f} | "
                f"{r['bytes'] / 1e6:.2f} | {r['merge_seconds']:.1f} |"
            )
        out += ["", f"Rule: {sel['rule']}. The test split is never used to choose.", ""]
    return "\n".join(out)
