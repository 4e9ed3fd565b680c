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
    resources = "resources: {train: {num_cpus: 1, max_retries: 2}, merge: {num_cpus: 1}}"
    on_ray = write_config(tmp_path, tiny_model_dir, alma_dir, "ray", extra=resources)
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
