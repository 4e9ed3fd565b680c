"""Data parallel training with two real processes (gloo on CPU), launched as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from processes import kill_tree
from safetensors.torch import load_file

from datm import config as C
from datm.run import runner

# The README's launch command (`accelerate launch --multi_gpu --num_processes 2 -m datm.cli ...`),
# through this interpreter's accelerate.
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "datm.cli",
]


def _config(path: Path, model: Path, data: Path, out: str, **train: object) -> Path:
    settings = {"steps": 3, "batch_size": 4, "precision": "fp32", "schedule": "constant", "seed": 3}
    settings.update(train)
    dropout = settings.pop("dropout", 0.0)
    raw = tiny_config(
        model,
        data,
        out,
        languages=["de", "cs"],
        groups={"g": ["de", "cs"]},
        strategy="multilingual",
        lora={"r": 4, "alpha": 8, "dropout": dropout},
        train=settings,
        merge=None,
        eval={"max_examples": 2, "max_new_tokens": 4, "precision": "fp32"},
    )
    path.write_text(json.dumps(raw))
    return path


def _launch(cfg: Path, cwd: Path, command: str = "train") -> subprocess.Popen:
    """`datm COMMAND CFG` in two processes, printing to CFG.log (a file: a pipe nobody reads fills up)."""
    with cfg.with_suffix(".log").open("a") as log:
        return subprocess.Popen([*LAUNCH, command, str(cfg)], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _log(proc: subprocess.Popen) -> str:
    return Path(proc.args[-1]).with_suffix(".log").read_text()


def _finish(proc: subprocess.Popen) -> str:
    proc.wait(timeout=300)
    assert proc.returncode == 0, _log(proc)[-3000:]
    return _log(proc)


def _kill_after_checkpoint(proc: subprocess.Popen, state: Path) -> None:
    """Wait for the first checkpoint, then SIGKILL the launcher and both ranks."""
    deadline = time.monotonic() + 240
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(proc)
    assert state.is_file() and not (state.parent.parent / "DONE.json").exists(), _log(proc)[-3000:]


def _adapter(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    d = out / "adapters" / "multilingual"
    return load_file(str(d / "adapter_model.safetensors")), json.loads((d / "train_info.json").read_text())


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, tiny_model_dir, alma_dir):
    """Each step, rank r trains on micro batch r of the global batch; DDP averages the gradients.
    One process accumulating the same two micro batches (grad_accum 2) takes the same steps."""
    two = _config(tmp_path / "two.json", tiny_model_dir, alma_dir, "two")
    log = _finish(_launch(two, tmp_path, "run"))  # the README's command: train, then the rest on rank 0
    assert "File exists" not in log and log.count("translated de-en") == 1
    w2, info2 = _adapter(tmp_path / "two")
    assert info2["world_size"] == 2  # seen inside the run, by accelerate
    assert info2["result"]["examples"] == 48

    one = _config(tmp_path / "one.json", tiny_model_dir, alma_dir, "one", grad_accum=2)
    runner.train_only(C.load(one))
    w1, info1 = _adapter(tmp_path / "one")
    assert info1["world_size"] == 1

    assert w1.keys() == w2.keys()
    moved = 0
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
        moved += int("lora_B" in k and w2[k].abs().max() > 0)
    assert moved > 0  # the steps changed the adapter (LoRA B starts at zero)
    assert info1["losses"] == pytest.approx(info2["losses"], rel=1e-5)  # the global batches' losses
    # one writer: no staging or checkpoint left behind, one adapter directory; rank 0 went on
    assert sorted(p.name for p in (tmp_path / "two" / "adapters").iterdir()) == ["multilingual"]
    assert len(json.loads((tmp_path / "two" / "scores.json").read_text())["directions"]) == 4


def test_two_process_training_resumes_after_a_kill(tmp_path, tiny_model_dir, alma_dir):
    """Killed after a checkpoint, relaunched: the same adapter as an uninterrupted two-process run.
    With dropout, each rank's random state must come back (their dropout draws differ)."""
    from datm.train import TrainError

    settings = {"steps": 60, "checkpoint_every": 5, "dropout": 0.1, "lr": 0.01}
    killed = _config(tmp_path / "k.json", tiny_model_dir, alma_dir, "killed", **settings)
    state = tmp_path / "killed" / "adapters" / "multilingual" / ".checkpoint" / "state.pt"
    _kill_after_checkpoint(_launch(killed, tmp_path), state)

    # one process would train other global batches than the checkpoint's two
    with pytest.raises(TrainError, match=r"written by 2 process\(es\), resumed by 1"):
        runner.train_only(C.load(killed))
    _finish(_launch(killed, tmp_path))
    w_resumed, info = _adapter(tmp_path / "killed")
    assert info["result"]["resumed_from"] >= 5 and info["world_size"] == 2

    straight = _config(tmp_path / "s.json", tiny_model_dir, alma_dir, "straight", **settings)
    _finish(_launch(straight, tmp_path))
    w_straight, info_straight = _adapter(tmp_path / "straight")
    assert info_straight["result"]["resumed_from"] == 0
    for k in w_straight:
        assert torch.equal(w_resumed[k], w_straight[k]), k
    assert info["losses"] == info_straight["losses"]


def test_ranks_wait_together_while_another_run_holds_the_adapter_cache_claim(
    tmp_path, tiny_model_dir, alma_dir
):
    """Rank 0 waits for a cache entry another run is building; rank 1 must not sit in one barrier
    for that long (it would hit the process group's timeout, here DATM_DIST_TIMEOUT = 5 s)."""
    import os
    import shutil

    from datm import artifacts

    cache = tmp_path / "cache"
    first = _config(tmp_path / "a.json", tiny_model_dir, alma_dir, "a")
    raw = json.loads(first.read_text())
    first.write_text(json.dumps({**raw, "adapter_cache": str(cache)}))
    _finish(_launch(first, tmp_path))
    (key,) = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    # Another run is building that entry right now: it holds the claim and the entry is not there.
    shutil.move(str(cache / key), str(tmp_path / "entry"))
    other = artifacts.try_claim(cache / ".claims" / f"{key}.lock", "another run")
    assert other is not None
    second = _config(tmp_path / "b.json", tiny_model_dir, alma_dir, "b")
    second.write_text(json.dumps({**raw, "output_dir": "b", "adapter_cache": str(cache)}))
    env = {**os.environ, "DATM_DIST_TIMEOUT": "5"}
    with second.with_suffix(".log").open("a") as log:
        proc = subprocess.Popen(
            [*LAUNCH, "train", str(second)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        time.sleep(15)  # three timeouts' worth of waiting
        assert proc.poll() is None, _log(proc)[-3000:]
        shutil.move(str(tmp_path / "entry"), str(cache / key))  # the other run finishes its entry
        other.release()
        log_text = _finish(proc)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert "in the cache" in log_text
    reused = tmp_path / "b" / "adapters" / "multilingual" / "reused_from.json"
    assert json.loads(reused.read_text())["key"] == key
