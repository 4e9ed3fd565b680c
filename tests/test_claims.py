"""Claims: a lock per task that dies with its holder, and the run directory's layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from datm import artifacts
from datm.artifacts import RunDir

HOLD = """
import sys, time
from datm import artifacts
held = artifacts.try_claim(sys.argv[1], "train:de-en")
print("held" if held else "busy", flush=True)
time.sleep(60)
"""


def _holder_process(lock: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.plan == tmp_path / "plan.json" and run.config == tmp_path / "config.json"
    assert run.adapter("de-en") == tmp_path / "adapters" / "de-en"
    assert run.merged("xx-en.g") == tmp_path / "merged" / "xx-en.g"
    assert run.scores == tmp_path / "scores.json" and run.report == tmp_path / "report.md"
    files = run.translations("de-en")
    assert (files.src.name, files.ref.name, files.hyp.name) == (
        "de-en.src.txt",
        "de-en.ref.txt",
        "de-en.hyp.txt",
    )
    assert run.module("xx-en.g", ["xx-en.g"]) == run.merged("xx-en.g")
    assert run.module("de-en") == run.adapter("de-en")  # no plan.json: not a merge
    artifacts.atomic_write_json(run.plan, {"merges": [{"name": "xx-en.g", "sources": []}]})
    assert run.module("xx-en.g") == run.merged("xx-en.g")
    assert run.claim("train:de-en").parent == run.claims


def test_claim_is_exclusive_and_dies_with_its_holder(tmp_path):
    lock = RunDir(tmp_path).claim("train:de-en")
    proc = _holder_process(lock)
    try:
        assert artifacts.try_claim(lock, "train:de-en") is None  # held by a live process
        record = artifacts.holder(lock)
        assert record["pid"] == proc.pid and record["task"] == "train:de-en" and record["host"]
        assert artifacts.try_claim(lock, "train:de-en") is None  # probing did not take it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert artifacts.holder(lock) is None  # the kernel dropped the lock with its holder
    held = artifacts.try_claim(lock, "train:de-en")
    assert held is not None
    assert held.took_over["pid"] == proc.pid  # it never released: a stale claim, taken over
    assert artifacts.try_claim(lock, "train:de-en") is None  # not twice in one process either
    assert artifacts.holder(lock)["pid"] == os.getpid()
    held.release()
    assert json.loads(lock.with_suffix(".json").read_text())["released_at"]
    again = artifacts.try_claim(lock, "train:de-en")
    assert again is not None and again.took_over is None  # a clean release is no takeover
    again.release()


def test_claim_waits_for_the_holder_with_a_message(tmp_path):
    lock = RunDir(tmp_path).claim("merge:g")
    proc = _holder_process(lock)
    said: list[str] = []
    try:
        t0 = time.monotonic()
        try:
            artifacts.claim(lock, "merge:g", poll=0.05, timeout=0.3, say=said.append)
        except TimeoutError as e:
            assert f":{proc.pid}" in str(e)
        else:
            raise AssertionError("a held claim was granted")
        assert time.monotonic() - t0 >= 0.3
        assert len(said) == 1 and "waiting" in said[0] and str(proc.pid) in said[0]
    finally:
        proc.kill()
        proc.wait()
    with artifacts.claim(lock, "merge:g", poll=0.05, timeout=5, say=said.append) as held:
        assert held.took_over["pid"] == proc.pid
