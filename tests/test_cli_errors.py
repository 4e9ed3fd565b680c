"""The CLI turns expected failures (DatmError) into `datm: error: ...` with exit 2, and lets any
other exception — a bug — keep its traceback."""

from __future__ import annotations

import argparse

import pytest

from datm import cli
from datm.errors import DatmError


def _parser_raising(exc: BaseException, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise exc

    real = cli.build_parser

    def parser() -> argparse.ArgumentParser:
        p = real()
        p.set_defaults(func=fail)
        for action in p._subparsers._group_actions:  # every subcommand calls `fail`
            for sub in action.choices.values():
                sub.set_defaults(func=fail)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)


def test_expected_failure_is_one_line_and_exit_2(monkeypatch, capsys):
    _parser_raising(DatmError("config.yaml: lora.r must be an integer >= 1, got -4"), monkeypatch)
    assert cli.main(["plan", "x.yaml"]) == 2
    assert capsys.readouterr().err == "datm: error: config.yaml: lora.r must be an integer >= 1, got -4\n"


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("k"), FileNotFoundError("f")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    _parser_raising(bug, monkeypatch)
    with pytest.raises(type(bug)):
        cli.main(["plan", "x.yaml"])


def test_bad_direction_and_missing_run_are_expected_failures(tmp_path, capsys):
    assert cli.main(["translate", "--run", str(tmp_path), "--pair", "de-en", "--input", "-"]) == 2
    assert "plan.json not found" in capsys.readouterr().err
