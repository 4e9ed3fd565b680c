"""The task graph, `datm tasks`, `datm run --only`, and cooperating runs on one output_dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TRAIN, save_config, tiny_config
from safetensors.torch import load_file

from datm.cli import main

SRC = str(Path(__file__).parents[1] / "src")


def write_config(
    tmp_path: Path, model_dir: Path, data_dir: Path, out: str, extra: dict | None = None, **train: object
) -> Path:
    """The tests' DATM config (conftest.tiny_config), with `train` settings changed and `extra`
    top-level keys added."""
    raw = tiny_config(model_dir, data_dir, out, train={**TRAIN, **train}, **(extra or {}))
    return save_config(tmp_path / f"{out}.yaml", raw)


def artifacts_of(out: Path) -> dict[str, bytes]:
    """Every adapter, merged module and translation of a run, by relative path."""
    files = [*out.glob("adapters/*/*.safetensors"), *out.glob("merged/*/*.safetensors")]
    files += out.glob("translations/*.txt")
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(files)}


def test_tasks_lists_the_graph_with_dependencies_and_status(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "t")
    assert main(["tasks", str(cfg), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["id"]: r for r in doc["tasks"]}
    assert list(rows)[:5] == [
        "train:de-en",
        "train:cs-en",
        "train:ru-en",
        "train:en-xx.germanic",
        "train:en-xx.slavic",
    ]
    assert rows["merge:xx-en.slavic"]["deps"] == ["train:cs-en", "train:ru-en"]
    assert rows["translate:cs-en"]["deps"] == ["merge:xx-en.slavic"]
    assert rows["translate:de-en"]["deps"] == ["train:de-en"]  # a one-language group ships its adapter
    assert rows["translate:en-ru"]["outputs"][-1] == "translations/en-ru.hyp.txt"
    assert len(rows["score"]["deps"]) == 6 and rows["report"]["deps"] == ["score"]
    assert {r["status"] for r in rows.values()} == {"waiting"}
    assert rows["train:de-en"]["ready"] and not rows["merge:xx-en.slavic"]["ready"]
    assert not (tmp_path / "t").exists()  # listing runs nothing

    assert main(["run", str(cfg), "--only", "train:cs-en"]) == 0
    assert main(["tasks", str(cfg)]) == 0
    table = capsys.readouterr().out
    assert "train:cs-en                  done" in table and "train:ru-en                  ready" in table
    assert "14 tasks: 1 done, 0 running, 13 waiting" in table


def test_only_runs_one_task_and_checks_what_it_needs(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "o")
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--only", "merge:xx-en.slavic"]) == 2
    err = capsys.readouterr().err
    assert "needs ['train:cs-en', 'train:ru-en'], not done yet" in err
    assert main(["run", str(cfg), "--only", "train:xx"]) == 2
    assert "no such task" in capsys.readouterr().err
    for t in ("train:cs-en", "train:ru-en", "merge:xx-en.slavic"):
        assert main(["run", str(cfg), "--only", t]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["cs-en", "ru-en"]
    assert (out / "merged" / "xx-en.slavic" / "DONE.json").is_file()
    assert not (out / "translations").exists()
    assert main(["run", str(cfg), "--only", "train:cs-en"]) == 0
    assert "train:cs-en: done, reused" in capsys.readouterr().out


def _datm(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "datm.cli", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kw,
    )


def test_two_concurrent_runs_build_every_artifact_once(tmp_path, tiny_model_dir, alma_dir):
    """Measured before claims: both runs trained the same adapter, then one failed ('refusing to
    overwrite'). Now they split the tasks, each artifact is built once, and both finish."""
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "shared", steps=12)
    procs = [_datm(["run", str(cfg)], tmp_path) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    lines = [line for log in logs for line in log.splitlines()]
    for a in ("de-en", "cs-en", "ru-en", "en-xx.germanic", "en-xx.slavic"):
        assert sum(line.startswith(f"train:{a}: built") for line in lines) == 1, a
    assert sum(line.startswith("merge:xx-en.slavic: built") for line in lines) == 1
    for d in ("de-en", "cs-en", "ru-en", "en-de", "en-cs", "en-ru"):
        assert sum(line.startswith(f"translate:{d}: built") for line in lines) == 1, d

    single = write_config(tmp_path, tiny_model_dir, alma_dir, "single", steps=12)
    assert main(["run", str(single)]) == 0
    a, b = artifacts_of(tmp_path / "shared"), artifacts_of(tmp_path / "single")
    assert a.keys() == b.keys() and len(a) == 5 + 1 + 18
    assert [k for k in a if a[k] != b[k]] == []
    sa, sb = (json.loads((tmp_path / o / "scores.json").read_text()) for o in ("shared", "single"))
    assert sa["directions"] == sb["directions"]


STOP_AT_CHECKPOINT = """
import pathlib, sys, time
import datm.train.loop as T
save = T.save_checkpoint
def save_then_hang(*args, **kw):
    save(*args, **kw)
    pathlib.Path(sys.argv[1]).write_text("checkpointed")
    time.sleep(600)
T.save_checkpoint = save_then_hang
from datm.cli import main
main(sys.argv[2:])
"""


def test_a_killed_worker_is_taken_over_and_its_checkpoint_resumed(tmp_path, tiny_model_dir, alma_dir, capsys):
    train = {"steps": 8, "checkpoint_every": 3}
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "k", **train)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    marker = tmp_path / "checkpointed"
    victim = subprocess.Popen(
        [sys.executable, "-c", STOP_AT_CHECKPOINT, str(marker), "run", str(cfg), "--only", "train:de-en"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.is_file():
            assert victim.poll() is None and time.monotonic() < deadline, "the worker never checkpointed"
            time.sleep(0.1)
        assert main(["tasks", str(cfg)]) == 0
        assert f":{victim.pid} (since" in capsys.readouterr().out  # listed as running, with its holder
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    out = tmp_path / "k"
    assert (out / "adapters" / "de-en" / ".checkpoint" / "state.pt").is_file()
    assert main(["run", str(cfg), "--only", "train:de-en"]) == 0
    said = capsys.readouterr().out
    assert "train:de-en: taking over from" in said and f":{victim.pid}" in said
    info = json.loads((out / "adapters" / "de-en" / "train_info.json").read_text())
    assert info["result"]["resumed_from"] == 3 and info["result"]["steps"] == 8

    ref = write_config(tmp_path, tiny_model_dir, alma_dir, "kref", **train)
    assert main(["run", str(ref), "--only", "train:de-en"]) == 0
    a = load_file(str(out / "adapters" / "de-en" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "kref" / "adapters" / "de-en" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_xalma50_example_plans_the_papers_run_from_a_config_only_base(capsys):
    example = Path(__file__).parents[1] / "examples" / "xalma50-datm.yaml"
    assert main(["plan", str(example)]) == 0
    text = capsys.readouterr().out
    assert "adapters trained: 57   merges: 8   modules shipped: 16" in text
    assert "tasks: 165 = 57 train, 8 merge, 98 translate, 1 score, 1 report" in text
    assert "base 13,015,864,320" in text  # Llama-2-13B's shape, counted without weights
    assert "DATM 17B vs X-ALMA 29B" in text and "datm (datm): 17.02B" in text
    assert main(["tasks", str(example), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["tasks"]) == 165 and doc["executor"] == "ray"
    merge = next(t for t in doc["tasks"] if t["id"] == "merge:xx-en.group8")
    assert len(merge["deps"]) == 8


def test_worker_keeps_one_model_converting_for_inference_and_reloading_for_training(tmp_path, tiny_model_dir):
    """A Ray worker may translate (bf16) and then train (fp32): it must not train on bf16 weights."""
    from datm import config as C
    from datm.eval.worker import Worker

    cfg = C.from_dict(
        {"languages": ["de"], "data": {}, "train": {"steps": 1}, "base_model": str(tiny_model_dir)}
    )
    worker = Worker(cfg, progress=False)
    fp32 = worker.model(torch.float32)
    reference = {k: v.clone() for k, v in fp32.state_dict().items()}
    assert worker.model(torch.float32) is fp32  # loaded once
    bf16 = worker.model(torch.bfloat16)
    assert bf16 is fp32 and bf16.dtype == torch.bfloat16  # converted in place, as a single run does
    again = worker.model(torch.float32)
    assert again is not bf16 and again.dtype == torch.float32
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())  # reloaded, not upcast
    assert worker.serves(cfg) and worker.fingerprint


def test_local_executor_runs_part_of_the_graph_whose_needs_are_done(tmp_path, tiny_model_dir, alma_dir):
    """As the main process does after data-parallel training: the merge's trains are not in its list."""
    from datm import config as C
    from datm.artifacts import RunDir
    from datm.auto import build_plan
    from datm.run.executors import TaskFailed, run_local
    from datm.run.graph import build_tasks

    cfg = C.load(write_config(tmp_path, tiny_model_dir, alma_dir, "part"))
    plan = build_plan(cfg)
    tasks = {t.id: t for t in build_tasks(plan, RunDir(cfg.output_dir))}
    with pytest.raises(TaskFailed, match="no task can start"):
        run_local(cfg, plan, [tasks["merge:xx-en.slavic"]], poll=0.01)  # its trains were never run
    run_local(cfg, plan, [tasks["train:cs-en"], tasks["train:ru-en"]])
    run_local(cfg, plan, [tasks["merge:xx-en.slavic"]])
    assert (tmp_path / "part" / "merged" / "xx-en.slavic" / "DONE.json").is_file()


def test_a_dependency_finished_by_another_process_during_the_scan_is_not_a_deadlock(
    tmp_path, tiny_model_dir, alma_dir, monkeypatch
):
    """The other process publishes its artifact and releases its claim between this executor's
    dependency check and its scan for claim holders: the task must start, not fail."""
    from datm import artifacts
    from datm import config as C
    from datm.artifacts import RunDir
    from datm.auto import build_plan
    from datm.run import executors
    from datm.run.graph import build_tasks

    cfg = C.load(write_config(tmp_path, tiny_model_dir, alma_dir, "race"))
    plan = build_plan(cfg)
    run = RunDir(cfg.output_dir)
    tasks = {t.id: t for t in build_tasks(plan, run)}
    executors.run_local(cfg, plan, [tasks["train:de-en"]])
    adapter = run.adapter("de-en")
    aside = tmp_path / "finished-elsewhere"
    adapter.rename(aside)  # "another process" is still building it, and holds its claim
    other = artifacts.try_claim(run.claim("train:de-en"), "train:de-en")
    assert other is not None
    real_holder = executors.holder
    finished = []

    def holder_after_the_other_finishes(lock):
        if not finished:  # the other process finishes right now: artifact in place, claim released
            aside.rename(adapter)
            other.release()
            finished.append(True)
        return real_holder(lock)

    monkeypatch.setattr(executors, "holder", holder_after_the_other_finishes)
    executors.run_local(cfg, plan, [tasks["translate:de-en"]], poll=0.01)
    assert finished and run.translations("de-en").hyp.is_file()
