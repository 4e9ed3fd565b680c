"""The Ray executor: a local Ray cluster runs the same tasks and writes the same bytes."""

from __future__ import annotations

import json
import os

import pytest
from test_tasks import artifacts_of, write_config

from datm.cli import main

ray = pytest.importorskip("ray")


def test_ray_executor_equals_local_executor_bit_for_bit(tmp_path, tiny_model_dir, alma_dir, capsys):
    local = write_config(tmp_path, tiny_model_dir, alma_dir, "local")
    assert main(["run", str(local)]) == 0
    resources = {"train": {"num_cpus": 1, "max_retries": 2}, "merge": {"num_cpus": 1}}
    on_ray = write_config(tmp_path, tiny_model_dir, alma_dir, "ray", extra={"resources": resources})
    capsys.readouterr()
    assert main(["run", str(on_ray), "--executor", "ray"]) == 0
    log = capsys.readouterr().out
    assert "ray: 14 tasks submitted" in log and "[14/14] report: built" in log
    assert f":{os.getpid()}" not in log.split("ray: 14 tasks submitted")[1]  # run by Ray workers

    a, b = artifacts_of(tmp_path / "local"), artifacts_of(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 5 + 1 + 18
    assert [k for k in a if a[k] != b[k]] == []
    sa, sb = (json.loads((tmp_path / o / "scores.json").read_text()) for o in ("local", "ray"))
    assert sa["directions"] == sb["directions"]
    assert sa["provenance"]["modules"] == sb["provenance"]["modules"]

    # a second ray run finds everything done and submits only the cheap score and report
    assert main(["run", str(on_ray), "--executor", "ray"]) == 0
    log = capsys.readouterr().out
    assert "ray: 2 tasks submitted" in log and "train:de-en: done, reused" in log


def test_ray_retries_a_task_whose_worker_was_killed_and_resumes_it(tmp_path, tiny_model_dir, alma_dir):
    """SIGKILL the Ray worker training an adapter once it has checkpointed: Ray runs the task again
    on a new worker, which takes over the dead worker's claim and resumes from the checkpoint."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cfg = write_config(tmp_path, tiny_model_dir, alma_dir, "r", steps=60, checkpoint_every=5)
    cfg.write_text(cfg.read_text().replace("strategy: datm", "strategy: multilingual"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "datm.cli", "run", str(cfg), "--executor", "ray"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out = tmp_path / "r"
    record = out / ".claims" / "train.multilingual.json"
    checkpoint = out / "adapters" / "multilingual" / ".checkpoint" / "state.pt"
    deadline = time.monotonic() + 240
    while not (checkpoint.is_file() and record.is_file()):
        assert driver.poll() is None and time.monotonic() < deadline, "no checkpoint before the deadline"
        time.sleep(0.02)
    victim = json.loads(record.read_text())["pid"]
    assert victim != driver.pid
    os.kill(victim, signal.SIGKILL)
    log = driver.communicate(timeout=600)[0]
    assert driver.returncode == 0, log[-3000:]
    assert "taking over from" in log and f":{victim} (since" in log
    info = json.loads((out / "adapters" / "multilingual" / "train_info.json").read_text())
    assert info["result"]["resumed_from"] >= 5 and info["result"]["steps"] == 60
