"""COMET, run in an environment of its own.

unbabel-comet 2.2 needs transformers < 5, huggingface-hub < 1 and numpy < 2, which datm's own
environment need not have, so datm never imports it: it writes the texts to a request file and
runs `comet_worker.py` with the Python of a COMET environment (`eval.comet.python`, default this
interpreter), which loads the model once (`load_from_checkpoint`), scores every direction with
`predict` and answers in JSON. `datm comet-env DIR` creates such an environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from datm.config import CometConfig
from datm.errors import DatmError

WORKER = Path(__file__).with_name("comet_worker.py")
PACKAGES = ("unbabel-comet", "setuptools<81")  # COMET's torchmetrics 0.10 imports pkg_resources
CREATE = "create one with `datm comet-env DIR` and point eval.comet.python (or --comet-python) to its Python"


class CometError(DatmError):
    pass


@dataclass(frozen=True)
class Texts:
    srcs: Sequence[str]
    hyps: Sequence[str]
    refs: Sequence[str]


@dataclass(frozen=True)
class CometScores:
    """One COMET call: scores per job, and what produced them."""

    model: str
    checkpoint: str
    encoder: str
    version: str  # unbabel-comet's
    python: str
    versions: dict[str, str]
    system: dict[str, float]
    segments: dict[str, list[float]]

    @property
    def signature(self) -> str:
        return f"model:{self.model}|comet:{self.version}"

    def provenance(self) -> dict[str, Any]:
        keep = ("model", "checkpoint", "encoder", "version", "python", "versions")
        return {k: getattr(self, k) for k in keep}


def interpreter(spec: CometConfig) -> str:
    """The COMET environment's Python, checked to exist."""
    python = spec.python or sys.executable
    found = shutil.which(python) if "/" not in python else python
    if found is None or not Path(found).is_file() or not os.access(found, os.X_OK):
        raise CometError(f"COMET Python {python} does not exist or is not executable; {CREATE}")
    return found


def check(spec: CometConfig) -> None:
    """Fail fast (before any training): a local model exists, the interpreter runs and has comet.
    Hub names are looked up when scoring."""
    model = spec.model
    local = Path(model).expanduser()
    if local.is_dir() and not (local / "checkpoints" / "model.ckpt").is_file():
        raise CometError(f"COMET model directory {local} has no checkpoints/model.ckpt")
    looks_local = model.endswith(".ckpt") or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not local.exists():
        raise CometError(f"COMET model {model} does not exist (expected a .ckpt file or a model directory)")
    python = interpreter(spec)
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('comet') is None)"
    try:
        found = subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except OSError as e:
        raise CometError(f"COMET Python {python} does not run ({e}); {CREATE}") from None
    if not found:
        raise CometError(
            f"COMET Python {python} has no comet (the unbabel-comet package); {CREATE}, or "
            f"`{python} -m pip install unbabel-comet 'setuptools<81'` if its transformers may be < 5"
        )


def score(jobs: Mapping[str, Texts], spec: CometConfig) -> CometScores:
    """COMET scores of every job, from one run of the worker (the model is loaded once)."""
    for name, t in jobs.items():
        if not len(t.srcs) == len(t.hyps) == len(t.refs):
            raise CometError(
                f"{name}: {len(t.srcs)} sources, {len(t.hyps)} hypotheses, {len(t.refs)} references; "
                "COMET needs them to pair up line by line"
            )
    check(spec)
    python = interpreter(spec)
    with tempfile.TemporaryDirectory(prefix="datm-comet-") as tmp:
        request, answer = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        texts = {n: {"src": list(t.srcs), "mt": list(t.hyps), "ref": list(t.refs)} for n, t in jobs.items()}
        request.write_text(
            json.dumps(
                {
                    "model": spec.model,
                    "batch_size": spec.batch_size,
                    "device": spec.device,
                    "out": str(answer),
                    "jobs": texts,
                },
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )
        # The source via -c, from a folder of our own: nothing of datm's lands on that sys.path.
        cmd = [python, "-c", WORKER.read_text(encoding="utf-8"), str(request)]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        got = json.loads(answer.read_text(encoding="utf-8")) if answer.is_file() else None
    if got is None or "error" in got:
        why = got["error"]["message"] if got else f"exit status {proc.returncode}:\n{proc.stderr[-2000:]}"
        raise CometError(f"COMET scoring with {python} failed: {why}")
    results = got["results"]
    return CometScores(
        model=spec.model,
        checkpoint=got["checkpoint"],
        encoder=got["encoder"],
        version=got["comet_version"],
        python=python,
        versions=got["versions"],
        system={n: r["system"] for n, r in results.items()},
        segments={n: r["segments"] for n, r in results.items()},
    )


def default_torch() -> str:
    """The torch datm runs on, as a requirement (a local tag such as +cpu dropped)."""
    try:
        return "torch==" + metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        return "torch"


def env_python(directory: Path) -> Path:
    return directory / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def create_env(directory: Path, torch: str, packages: Sequence[str] = PACKAGES) -> tuple[Path, str]:
    """A virtual environment at `directory` with COMET in it; (its Python, COMET's version).
    An environment that already imports comet is kept as it is."""
    python = env_python(directory)
    version = "import importlib.metadata as m, comet; print(m.version('unbabel-comet'))"
    if python.is_file():
        done = subprocess.run([str(python), "-c", version], capture_output=True, text=True)
        if done.returncode == 0:
            return python, done.stdout.strip()
    elif directory.exists() and any(directory.iterdir()):
        raise CometError(f"{directory} exists and is not a Python environment; give a new folder")
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True)
    install = [str(python), "-m", "pip", "install", "--upgrade", torch, *packages]
    if subprocess.run(install).returncode != 0:
        raise CometError(f"installing COMET into {directory} failed: {' '.join(install)}")
    done = subprocess.run([str(python), "-c", version], capture_output=True, text=True)
    if done.returncode != 0:
        raise CometError(f"COMET was installed in {directory} but does not import:\n{done.stderr[-2000:]}")
    return python, done.stdout.strip()


def main_env(args: Any) -> int:
    """`datm comet-env DIR [--torch SPEC]`."""
    python, version = create_env(Path(args.dir).absolute(), args.torch or default_torch())
    print(f"COMET {version} in {python}")
    print(f"use it with:  eval: {{comet: {{model: MODEL, python: {python}}}}}   or   --comet-python {python}")
    return 0
