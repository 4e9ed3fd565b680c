"""benchmarks/common.py: data found relative to the repository; a busy machine is refused or noted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402


def test_benchmark_data_resolves_relative_to_the_repository(tmp_path):
    # A checkout somewhere else finds the data beside itself, not at this machine's path.
    bench = tmp_path / "elsewhere" / "repo" / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "common.py").write_text((REPO / "benchmarks" / "common.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "DATM_BENCH_DATA"}
    got = subprocess.run(
        [sys.executable, "-c", "import common; print(common.DATA_DIR)"],
        cwd=bench,
        env=env,
        capture_output=True,
        text=True,
    )
    assert got.returncode == 0, got.stderr
    assert Path(got.stdout.strip()) == tmp_path / "elsewhere" / "shared" / "data" / "alma-human-parallel"


def test_no_tracked_file_names_an_absolute_path_of_this_machine():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    # the folder holding the repository and ../shared (e.g. /work), unless it is a system temp
    # folder that results legitimately name (a clone in /tmp must not fail on "/tmp/bench-…")
    roots = [str(REPO)]
    if str(REPO.parent) not in ("/", "/tmp", "/var/tmp"):
        roots.append(str(REPO.parent))
    if str(Path.home()) != "/":  # e.g. datm's model cache, ~/.cache/datm
        roots.append(str(Path.home()))
    offenders = []
    for name in listed.stdout.splitlines():
        path = REPO / name
        if path.suffix in {".png", ".gguf", ".safetensors"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(f"{q}{root}/" in text for root in roots for q in ('"', " ", "(")):
            offenders.append(name)
    assert not offenders, offenders


def test_busy_machine_is_refused_without_allow_load(monkeypatch):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    with pytest.raises(common.BenchError, match="--allow-load"):
        common.check_load(allow_load=False)
    with pytest.raises(common.BenchError):
        common.new_record("b", "x", quick=False, settings={})


def test_busy_machine_with_allow_load_says_so_in_the_results(monkeypatch, tmp_path):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    record = common.new_record(
        "b", "x", quick=False, settings={"data": str(common.DATA_DIR)}, allow_load=True
    )
    assert record["load_check"] == {
        "load_average_1min": 1.7,
        "quiet": False,
        "threshold": common.QUIET_LOAD,
        "allowed_load": True,
    }
    assert not Path(record["settings"]["data"]).is_absolute()
    record["x"] = 1.0
    _, md = common.write_results(tmp_path, record, "body")
    assert "busy machine" in md.read_text() and "1.70" in md.read_text()


def test_quiet_machine_runs_and_results_do_not_warn(monkeypatch, tmp_path):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (0.1, 0.2, 0.3))
    record = common.new_record("b", "x", quick=False, settings={})
    assert record["load_check"]["quiet"] is True
    record["x"] = 1.0
    _, md = common.write_results(tmp_path, record, "body")
    assert "busy" not in md.read_text()


@pytest.mark.parametrize(
    "script",
    [
        "asymmetry_cpu",
        "bench_fanout",
        "bench_merge",
        "bench_serve",
        "bench_train",
        "bench_translate",
        "merge_forms",
        "merge_methods",
    ],
)
def test_every_benchmark_script_uses_the_load_check(script):
    text = (REPO / "benchmarks" / f"{script}.py").read_text()
    assert "common.check_load(" in text or "args.allow_load)" in text


def test_results_name_paths_relative_to_the_repository_or_the_home_folder():
    cache = str(Path.home() / ".cache" / "datm" / "models" / "m")
    data = str(common.REPO_ROOT.parent / "shared" / "data")
    got = common.repo_relative({"model": cache, "cmd": f"python x.py --data {data}", "n": [data, 3]})
    assert got == {
        "model": "~/.cache/datm/models/m",
        "cmd": "python x.py --data ../shared/data",
        "n": ["../shared/data", 3],
    }
