"""Artifacts on disk: atomic writes, completion markers, fingerprints and provenance.

A stage whose output directory holds a DONE marker (written last, atomically) is complete and is
never redone; that one rule gives resume for free and guards finished adapters from being
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

DONE = "DONE.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: broken JSON ({e.msg})") from None


def is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE).is_file()


def mark_done(directory: str | Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / DONE, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging directory into place (one rename; never over a finished one)."""
    if is_done(final):
        raise FileExistsError(f"{final} is already complete; refusing to overwrite it")
    old = final.parent / f".{final.name}.old"
    if final.exists():  # e.g. a training dir holding only its checkpoint: keep it until the swap is done
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def staging_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.staging"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the contents of files (order-independent), first 16 hex digits."""
    digests = []
    for p in sorted(str(x) for x in paths):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests.append(h.hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def fingerprint_texts(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprint_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("datm", "torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
