"""Fault injection: SIGKILL `datm run` at random moments of training, merging and translation, run it
again after each kill, and get bit-identical adapters, merged modules, translations and scores."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import tiny_config, write_alma
from processes import kill_tree

SEED = 16  # fixes the kill moments
KILLS = ("train", "train", "train", "merge", "translate", "translate")  # the stage each kill aims at
ADAPTERS = ("de-en", "cs-en", "en-xx.g")
DIRECTIONS = ("de-en", "cs-en", "en-de", "en-cs")


@dataclass
class Kill:
    mark: str  # wait for this to appear ...
    delay: float  # ... then this long, then SIGKILL


def _config(path: Path, model: Path, data: Path) -> Path:
    raw = tiny_config(
        model,
        data,
        "out",
        languages=["de", "cs"],
        groups={"g": ["de", "cs"]},
        lora={"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: the random state must resume too
        train={"steps": 30, "batch_size": 4, "lr": 0.01, "checkpoint_every": 5, "precision": "fp32"},
        eval={"max_examples": 6, "max_new_tokens": 12, "precision": "fp32"},
    )
    path.write_text(json.dumps(raw))
    return path


def _start(cfg: Path) -> subprocess.Popen:
    # One thread: tiny matrices crawl when two threads compete on a busy two-core machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (cfg.parent / "log.txt").open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "datm.cli", "run", str(cfg)],
            cwd=cfg.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


# Progress marks: paths that appear in this order in an uninterrupted run (a checkpoint comes and
# goes; the others stay). `merged` appears when the merge starts writing.
def _marks() -> list[str]:
    marks = []
    for a in ADAPTERS:
        marks += [f"adapters/{a}", f"adapters/{a}/.checkpoint", f"adapters/{a}/DONE.json"]
    marks += ["merged", "merged/xx-en.g/DONE.json"]
    marks += [f"translations/{d}.hyp.txt" for d in DIRECTIONS]
    return [*marks, "scores.json"]


def _next_kill(out: Path, kill: Kill) -> Kill:
    """The kill as planned, unless a run resumed past its mark: then at the next mark to come.
    (Passed: the mark or a later one is on disk.)"""
    marks = _marks()
    present = [(out / m).exists() for m in marks]
    passed = [any(present[i:]) for i in range(len(marks))]
    i = marks.index(kill.mark)
    if not passed[i]:
        return kill
    return Kill(next(m for m, p in zip(marks[i:], passed[i:], strict=True) if not p), 0.0)


def _stage(out: Path) -> str:
    """Which stage a run stopped in, from what it left on disk."""
    if not all((out / "adapters" / a / "DONE.json").is_file() for a in ADAPTERS):
        return "train"
    if not (out / "merged" / "xx-en.g" / "DONE.json").is_file():
        return "merge"
    if not all((out / "translations" / f"{d}.hyp.txt").is_file() for d in DIRECTIONS):
        return "translate"
    return "score"


def _timeline(cfg: Path) -> dict[str, float]:
    """Run uninterrupted; when each progress mark first appeared, in seconds."""
    out, marks, seen = cfg.parent / "out", _marks(), {}
    t0 = time.monotonic()
    proc = _start(cfg)
    while proc.poll() is None:
        for m in marks:
            if m not in seen and (out / m).exists():
                seen[m] = time.monotonic() - t0
        time.sleep(0.001)
    assert proc.returncode == 0, (cfg.parent / "log.txt").read_text()[-3000:]
    assert sorted(seen, key=seen.get) == marks, seen  # every mark seen, in the expected order
    return seen


def _schedule(timeline: dict[str, float], rng: random.Random) -> list[Kill]:
    """Random moments inside each aimed-at stage of the uninterrupted run, each expressed as the
    last progress mark before it plus a delay (times shift when a run resumes; marks do not)."""
    order = sorted(timeline, key=timeline.get)
    t = timeline
    last_train, merged = t["adapters/en-xx.g/DONE.json"], t["merged/xx-en.g/DONE.json"]
    windows = {
        "train": (t["adapters/de-en"], last_train),
        "merge": (last_train, merged),
        "translate": (merged, t[f"translations/{DIRECTIONS[-1]}.hyp.txt"]),
    }
    kills, used = [], set()
    for stage in KILLS:
        lo, hi = windows[stage]
        while True:  # one kill per mark, so that every kill interrupts new work
            moment = lo + (hi - lo) * rng.random()
            mark = max((m for m in order if t[m] <= moment), key=t.get)
            if mark not in used:
                break
        used.add(mark)
        gap = min(t[m] for m in order if t[m] > t[mark]) - t[mark]
        # at most half way to the next mark: a resumed run may go faster than the measured one
        kills.append(Kill(mark, min(moment - t[mark], gap / 2)))
    return sorted(kills, key=lambda k: t[k.mark])


def _outputs(out: Path) -> dict[str, object]:
    """What must come out the same: weights byte for byte, texts, numbers (not timings, dates)."""
    got: dict[str, object] = {}
    for f in sorted(out.glob("adapters/*/*.safetensors")) + sorted(out.glob("merged/*/*.safetensors")):
        got[str(f.relative_to(out))] = f.read_bytes()
    for f in sorted(out.glob("translations/*.txt")):
        got[str(f.relative_to(out))] = f.read_text()
    for a in ADAPTERS:
        info = json.loads((out / "adapters" / a / "train_info.json").read_text())
        got[f"{a} losses"] = info["losses"]
        got[f"{a} final_loss"] = info["result"]["final_loss"]
    merge = json.loads((out / "merged" / "xx-en.g" / "merge_info.json").read_text())
    got["merge errors"] = {m: (r["error_norm"], r["delta_norm"]) for m, r in merge["modules"].items()}
    scores = json.loads((out / "scores.json").read_text())
    got["scores"] = (scores["directions"], scores["averages"], scores["provenance"]["modules"])
    return got


def test_sigkill_at_random_moments_then_rerun_gives_bit_identical_results(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    for lang in ("de", "cs"):
        write_alma(data / f"train.{lang}-en.jsonl", lang, 12)
        write_alma(data / f"test.{lang}-en.jsonl", lang, 6)
        write_alma(data / f"test.en-{lang}.jsonl", lang, 6)
    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    ref = _config(tmp_path / "ref" / "c.json", tiny_model_dir, data)
    killed = _config(tmp_path / "killed" / "c.json", tiny_model_dir, data)

    timeline = _timeline(ref)
    kills = _schedule(timeline, random.Random(SEED))
    out, landed = killed.parent / "out", []
    for planned in kills:
        kill = _next_kill(out, planned)
        proc = _start(killed)
        while not (out / kill.mark).exists() and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(kill.delay)
        assert proc.poll() is None, f"finished before the kill after {kill}"
        kill_tree(proc)
        landed.append(_stage(out))
    proc = _start(killed)
    assert proc.wait(timeout=300) == 0, (killed.parent / "log.txt").read_text()[-3000:]

    assert len(landed) >= 5 and {"train", "merge", "translate"} <= set(landed), (landed, kills)
    want, got = _outputs(ref.parent / "out"), _outputs(out)
    assert want.keys() == got.keys()
    assert [k for k in want if want[k] != got[k]] == []
