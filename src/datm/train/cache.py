"""A store of trained adapters shared across runs, keyed by what trains them.

Two runs that would train the same adapter (same base model, same training pairs, same LoRA and
training settings, same prompt, same kind of device) train it once: the second takes the first's
by hard links. The key is a fingerprint of those inputs, not of the adapter's name, so the
`separate` system's zh→En adapter and the `group` system's one-language group {zh} are one entry.

Config: `adapter_cache: DIR` (top level; off when absent). Entries are ordinary adapter directories
(`DIR/<key>/`), published atomically and never overwritten; building an entry is claimed like any
task, so concurrent runs never train the same adapter twice.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datm import artifacts
from datm.config import LoraConfig, TrainConfig
from datm.log import get_logger

log = get_logger(__name__)

REUSED = "reused_from.json"
# Training settings that change where the work is saved or how often, never the adapter's numbers.
_NOT_IN_KEY = ("checkpoint_every",)
# Libraries whose versions are part of the key (their kernels and defaults move the numbers).
_VERSIONS_IN_KEY = ("torch", "transformers", "peft", "accelerate")


def adapter_key(
    *,
    model_fingerprint: str,
    data_fingerprint: str,
    directions: list[str],
    lora: LoraConfig,
    train: TrainConfig,
    prompt: str,
    device_type: str,
    world_size: int,
    precision: str,
    versions: dict[str, str],
) -> str:
    """The fingerprint of everything that decides a trained adapter's weights: `precision` is what
    `train.precision` resolved to where it trains ('bf16' or 'no': `auto` differs by machine), and
    `versions` the libraries whose kernels and defaults the numbers depend on."""
    settings = {k: v for k, v in asdict(train).items() if k not in _NOT_IN_KEY}
    settings["precision"] = precision
    return artifacts.fingerprint_obj(
        {
            "model": model_fingerprint,
            "data": data_fingerprint,
            "directions": sorted(directions),
            "lora": asdict(lora),
            "train": settings,
            "prompt": prompt,
            "device_type": device_type,
            "world_size": world_size,
            "versions": {k: versions[k] for k in sorted(versions) if k in _VERSIONS_IN_KEY},
        }
    )


class AdapterCache:
    """`DIR/<key>/` holds a finished adapter; `DIR/.claims/<key>.lock` guards building it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str) -> Path:
        return self.root / ".claims" / f"{key}.lock"

    def claim(self, key: str, task: str, state: Any = None, poll: float = 1.0) -> artifacts.Claim | None:
        """Claim building entry `key`, waiting while another run builds it. Under data parallelism
        (`state`: accelerate's, several processes) the main process claims and returns the claim, the
        others None; every process waits in steps of `poll` seconds, each ending in a collective, so that
        no rank sits in one barrier for as long as another run trains (the process group's timeout)."""
        what = f"{task} (adapter cache {key})"
        if state is None or state.num_processes == 1:
            return artifacts.claim(self.lock(key), what)
        from accelerate.utils import broadcast_object_list

        told = False
        while True:
            held = artifacts.try_claim(self.lock(key), what) if state.is_main_process else None
            (got,) = broadcast_object_list([held is not None], from_process=0)
            if got:
                return held
            if state.is_main_process and not told:
                holder = artifacts.describe_holder(artifacts.holder(self.lock(key)))
                log.info(f"{what}: claimed by {holder}; waiting for it")
                told = True
            time.sleep(poll)

    def has(self, key: str) -> bool:
        return artifacts.is_done(self.entry(key))

    def fetch(self, key: str, dest: Path, provenance: dict[str, Any]) -> None:
        """Publish the cached adapter (see `has`) at `dest`, by hard links."""
        stage = artifacts.staging_dir(dest.parent / f"{dest.name}.cached")
        artifacts.link_tree(self.entry(key), stage)
        artifacts.atomic_write_json(stage / REUSED, {"cache": str(self.entry(key)), "key": key, **provenance})
        artifacts.publish_dir(stage, dest)

    def store(self, key: str, adapter: Path) -> None:
        """Add a finished adapter (hard links); an entry that exists is kept as it is."""
        if self.has(key):
            return
        stage = artifacts.staging_dir(self.entry(key))
        artifacts.link_tree(adapter, stage, skip=(REUSED,))
        artifacts.publish_dir(stage, self.entry(key))
