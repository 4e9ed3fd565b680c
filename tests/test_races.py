"""Races between processes that share a run, suspected in review and settled by tests."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import write_valid

from datm import artifacts
from datm import config as C


def _pilot_runs(tmp_path: Path, model: Path, data: Path) -> tuple[C.Config, dict[str, C.Config]]:
    from test_auto import config_text

    from datm.auto.pilot import ROLES, pilot_config

    for lang in ("de", "cs", "ru"):
        write_valid(data / f"valid.{lang}-en.jsonl", lang)
    path = tmp_path / "c.yaml"
    path.write_text(config_text(model, data, "{pilot: {fraction: 0.5}}").replace("output_dir: out", ""))
    cfg = C.load(path)
    cfg = C.from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "out")}, source=str(path))
    return cfg, {role: pilot_config(cfg, role) for role in ROLES}


def test_two_pilots_sharing_an_adapter_link_it_once_and_neither_fails(
    tmp_path, tiny_model_dir, alma_dir, monkeypatch
):
    """Two `auto` runs on one output_dir both hand the separate pilot's de-en adapter to the joint
    pilot. The second starts while the first is linking: it must wait for it, not collide."""
    from datm.artifacts import RunDir
    from datm.auto import pilot
    from datm.run import runner

    cfg, configs = _pilot_runs(tmp_path, tiny_model_dir, alma_dir)
    runner.run(configs["separate"], only="train:de-en")
    separate, joint = RunDir(configs["separate"].output_dir), RunDir(configs["joint"].output_dir)
    real_link = artifacts.link_tree
    second: dict[str, object] = {}

    def share() -> None:
        try:
            pilot.share_adapter(separate, joint, "de-en")
        except Exception as e:  # reported below
            second["error"] = e

    def link_while_another_pilot_starts(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
        if not second:
            second["thread"] = t = threading.Thread(target=share)
            t.start()
            t.join(timeout=3)  # the other pilot runs as far as it can while this one links
        real_link(src, dst, skip)

    monkeypatch.setattr(artifacts, "link_tree", link_while_another_pilot_starts)
    pilot.share_adapter(separate, joint, "de-en")
    second["thread"].join(timeout=30)  # type: ignore[attr-defined]
    assert "error" not in second, second.get("error")
    dst = joint.adapter("de-en")
    assert artifacts.is_done(dst)
    src_file = separate.adapter("de-en") / "adapter_model.safetensors"
    assert (dst / "adapter_model.safetensors").stat().st_ino == src_file.stat().st_ino
    assert not list(dst.parent.glob(".*"))  # no staging or half-linked folder left
