"""datm's messages go through the "datm" logger: `--quiet` / `--verbose`, the main process only, JSON
stays JSON, and results are printed whatever the level."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from datm import log
from datm.cli import main

SRC = str(Path(__file__).parents[1] / "src")


def write_config(
    tmp_path: Path, model_dir: Path, data_dir: Path, name: str = "run", strategy: str = "zero_shot"
) -> Path:
    """A one-language config (zero_shot: no training, two translate tasks) writing to `out/`."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"""
base_model: {model_dir}
languages: [de]
groups: {{germanic: [de]}}
data:
  train: {data_dir}/train.{{xx}}-en.jsonl
  test: {data_dir}/test.{{src}}-{{tgt}}.jsonl
strategy: {strategy}
lora: {{r: 4, alpha: 8}}
train: {{steps: 2, batch_size: 4, max_examples_per_pair: 8, seed: 1, checkpoint_every: 0}}
eval: {{max_examples: 2, beams: 1, max_new_tokens: 4}}
output_dir: out
"""
    )
    return cfg


@pytest.fixture(autouse=True)
def restore_datm_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test's `main` configures the "datm" logger; leave it as the test found it, and run
    as the main process unless a test says otherwise."""
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    logger = logging.getLogger(log.ROOT)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for h in logger.handlers:
        if h not in handlers:
            logger.removeHandler(h)
    for h in handlers:
        if isinstance(h, log.ConsoleHandler):
            h.to_stderr = False
    logger.setLevel(level)
    logger.propagate = propagate


def test_quiet_hides_progress_but_keeps_results_warnings_and_errors(
    tmp_path, tiny_model_dir, alma_dir, capsys
):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    assert main(["--quiet", "run", str(cfg)]) == 0
    out = capsys.readouterr().out
    # the progress of a real run is gone...
    assert "translated de-en" not in out and "built in" not in out and "modules shipped" not in out
    # ...its result is not: the score table and where the results are
    table = out.strip().splitlines()
    assert table[0].split() == ["direction", "BLEU", "chrF++"]
    assert table[1].startswith("de-en") and table[2].startswith("en-de")
    assert table[-1].startswith("results: ") and "scores.json" in table[-1]
    logging.getLogger("datm.tests").warning("a warning passes --quiet")
    assert capsys.readouterr().out == "a warning passes --quiet\n"

    # without --quiet the same (finished) run says what it reused
    assert main(["run", str(cfg)]) == 0
    assert "translate:de-en: done, reused" in capsys.readouterr().out

    # errors are shown as before
    other = write_config(tmp_path, tiny_model_dir, alma_dir, "other", strategy="multilingual")
    assert main(["--quiet", "run", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("datm: error: ") and "was written by a different plan" in err


def test_verbose_shows_debug_messages(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    assert main(["--verbose", "run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"config {cfg}: strategy zero_shot, output_dir {tmp_path.resolve() / 'out'}" in out
    assert "translate:de-en: starting (needs nothing)" in out
    assert "loading the base model" in out
    assert "translated de-en: 2 segments (module __base__)" in out  # and the info messages
    assert "results: " in out

    # the default level: info, no debug
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "translate:de-en: done, reused" in out and "config " not in out


def test_only_the_main_process_logs_info(tmp_path, tiny_model_dir, alma_dir, capsys, monkeypatch):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    assert main(["run", str(cfg)]) == 0
    assert "translated de-en" in capsys.readouterr().out

    # as rank 1 of `accelerate launch` / torchrun: no info, warnings with the rank
    monkeypatch.setenv("RANK", "1")
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "done, reused" not in out and "adapters trained" not in out
    logging.getLogger("datm.tests").info("said by rank 1")
    logging.getLogger("datm.tests").warning("a warning of rank 1")
    assert capsys.readouterr().out == "[rank 1] a warning of rank 1\n"

    # RANK decides before LOCAL_RANK (rank 0 of the second node is not the main process)...
    monkeypatch.setenv("LOCAL_RANK", "0")
    logging.getLogger("datm.tests").info("said by node 2's first process")
    assert capsys.readouterr().out == ""
    # ...and LOCAL_RANK decides when RANK is absent
    monkeypatch.delenv("RANK")
    logging.getLogger("datm.tests").info("said by the main process")
    assert capsys.readouterr().out == "said by the main process\n"
    monkeypatch.setenv("LOCAL_RANK", "2")
    logging.getLogger("datm.tests").info("said by local rank 2")
    assert capsys.readouterr().out == ""


def test_json_output_stays_json_with_verbose(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    assert main(["--verbose", "plan", str(cfg), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["strategy"] == "zero_shot"
    assert f"config {cfg}: strategy zero_shot" in err  # the messages go to stderr instead
    assert main(["--verbose", "tasks", str(cfg), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [t["id"] for t in json.loads(out)["tasks"]][:2] == ["translate:de-en", "translate:en-de"]
    assert f"config {cfg}" in err
    assert main(["--verbose", "demo", "--dry-run", "--json", "--languages", "de"]) == 0
    assert json.loads(capsys.readouterr().out)

    # a table command's messages stay on stdout, before its table
    assert main(["--verbose", "plan", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"config {cfg}") and "config" not in err


def test_main_twice_does_not_duplicate_lines(tmp_path, tiny_model_dir, alma_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    for _ in range(3):
        assert main(["--verbose", "run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"config {cfg}: strategy") == 3  # once per call
    assert out.count("translate:de-en: done, reused") == 2  # the second and third call
    handlers = logging.getLogger(log.ROOT).handlers
    assert sum(isinstance(h, log.ConsoleHandler) for h in handlers) == 1


def test_a_library_user_sees_nothing_unless_logging_is_configured(tmp_path, tiny_model_dir, alma_dir):
    """Without `datm.log.setup` (the CLI's), datm's info and warnings stay silent; once the user
    configures logging, they reach the user's handlers."""
    cfg = write_config(tmp_path, tiny_model_dir, alma_dir)
    script = f"""
import logging, sys
from datm import config
from datm.run import runner
from datm.log import get_logger
cfg = config.load({str(cfg)!r})
get_logger("datm.user").warning("silent warning")
runner.run(cfg)
print("--- configured")
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
get_logger("datm.user").warning("loud warning")
runner.run(cfg)
"""
    got = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK")}, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    before, after = got.stdout.split("--- configured\n")
    assert "translated" not in before and "silent warning" not in got.stdout + got.stderr
    assert "direction" in before  # results are printed either way
    assert "datm.user: loud warning" in after and "datm.run.bodies: translate:de-en: done, reused" in after
