"""Artifacts on disk: atomic writes, completion markers, claims, the run directory's layout
(`RunDir`), fingerprints and provenance.

A stage whose output directory holds a DONE marker (written last, atomically) is complete and is
never redone; that one rule gives resume for free and guards finished adapters from being
overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from datm.errors import DatmError
from datm.log import get_logger

log = get_logger(__name__)
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
        raise DatmError(f"{path}:{e.lineno}: broken JSON ({e.msg})") from None


def is_done(directory: str | Path) -> bool:
    return (Path(directory) / DONE).is_file()


def mark_done(directory: str | Path, info: dict[str, Any]) -> None:
    atomic_write_json(Path(directory) / DONE, {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written staging directory into place (one rename; never over a finished one)."""
    if is_done(final):
        raise DatmError(f"{final} is already complete; refusing to overwrite it")
    old = final.parent / f".{final.name}.old"
    if final.exists():  # e.g. a training dir holding only its checkpoint: keep it until the swap is done
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a finished directory by hard links (plain copies across filesystems), leaving out the
    names in `skip`; `dst` may exist already (e.g. a staging directory)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=shutil.ignore_patterns(*skip), dirs_exist_ok=True)


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


# --- The run directory -------------------------------------------------------------------------------


HYP_SUFFIX = ".hyp.txt"


@dataclass(frozen=True)
class TranslationFiles:
    """One direction's test sources, references and hypotheses (hyp is written last: it marks completion)."""

    src: Path
    ref: Path
    hyp: Path

    @property
    def info(self) -> Path:
        """How the hypotheses were made (e.g. leading line breaks skipped, a delta's applied error)."""
        return self.hyp.with_name(self.hyp.name.removesuffix(HYP_SUFFIX) + ".info.json")

    def of(self, kind: str) -> Path:
        """The file of a kind: 'src', 'ref' or 'hyp'."""
        return {"src": self.src, "ref": self.ref, "hyp": self.hyp}[kind]


@dataclass(frozen=True)
class RunDir:
    """The one description of a run directory's layout; every stage asks it where things go.

    plan.json, config.json, adapters/NAME/, merged/NAME/, translations/DIR.{src,ref,hyp}.txt, DIR.info.json,
    scores.json, report.md, probe/probe.json, candidates/MERGE/ (merge: auto: CANDIDATE/module/ and
    dev/DIR.{src,ref}.txt), and .claims/ (one lock file and one record per task).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def probe(self) -> Path:
        return self.root / "probe"

    @property
    def probe_result(self) -> Path:
        """`datm probe`'s measurements (probe.png beside them)."""
        return self.probe / "probe.json"

    @property
    def translations_dir(self) -> Path:
        return self.root / "translations"

    @property
    def claims(self) -> Path:
        return self.root / ".claims"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def merged_dir(self) -> Path:
        return self.root / "merged"

    def adapter(self, name: str) -> Path:
        return self.adapters_dir / name

    def merged(self, name: str) -> Path:
        return self.merged_dir / name

    def candidates(self, merge: str) -> Path:
        """Where `merge: auto` keeps one merge's candidates, their dev translations and the selection."""
        return self.root / "candidates" / merge

    def candidate(self, merge: str, candidate: str) -> Path:
        """One candidate of a merge: its module/ and the record of its dev translations."""
        return self.candidates(merge) / candidate

    def candidate_module(self, merge: str, candidate: str) -> Path:
        return self.candidate(merge, candidate) / "module"

    def candidate_dev(self, merge: str, direction: object) -> tuple[Path, Path]:
        """The dev sources and references a merge's candidates were scored on (for people to read)."""
        d = self.candidates(merge) / "dev"
        return d / f"{direction}.src.txt", d / f"{direction}.ref.txt"

    def module(self, name: str, merges: Iterable[str] | None = None) -> Path:
        """Where a shipped module lives: merged/ for the plan's merges, adapters/ otherwise.
        `merges` (the plan's merge names) defaults to those in plan.json."""
        if merges is None:
            plan = read_json(self.plan) if self.plan.is_file() else {}
            merges = [m["name"] for m in plan.get("merges", [])]
        return self.merged(name) if name in set(merges) else self.adapter(name)

    def translations(self, direction: object) -> TranslationFiles:
        d = str(direction)
        t = self.translations_dir
        return TranslationFiles(t / f"{d}.src.txt", t / f"{d}.ref.txt", t / f"{d}{HYP_SUFFIX}")

    def translated(self) -> list[str]:
        """The directions whose hypotheses are written, sorted."""
        return sorted(p.name.removesuffix(HYP_SUFFIX) for p in self.translations_dir.glob(f"*{HYP_SUFFIX}"))

    def claim(self, task_id: str) -> Path:
        """The lock file of a task's claim (its record is the same name with .json)."""
        return self.claims / (task_id.replace(":", ".").replace("/", "_") + ".lock")


# --- Claims ------------------------------------------------------------------------------------------
#
# A task claims its artifact before building it, so that concurrent `datm run`s, Ray workers and
# SLURM array jobs never build the same thing twice. The claim is a POSIX record lock
# (fcntl.lockf) on a lock file, held on an open descriptor for as long as the task runs: the kernel
# drops it when its holder exits or is killed, so a dead holder never blocks anyone. POSIX locks
# rather than flock(2): NFS implements POSIX locks across hosts (NLM on v3, natively on v4; Linux
# emulates flock on NFS with them anyway), as do Lustre (mounted with `-o flock`), GPFS, BeeGFS and
# CephFS. On a mount without coherent locks (NFS `nolock`, Lustre `localflock`) claims only
# coordinate processes of one host. A record next to the lock (host, pid, started_at) says who
# holds it; a record that was never marked released belonged to a holder that died, and the next
# holder takes over (the task then resumes from its checkpoint).
#
# POSIX locks belong to a process, and closing *any* descriptor of the file drops them, so each
# lock file is opened once per process (held claims are tracked below) and never elsewhere.

_HELD: dict[str, Claim] = {}
_HELD_LOCK = threading.Lock()


@dataclass
class Claim:
    """A held claim. `took_over` is the record of a holder that died before finishing."""

    path: Path
    record: dict[str, Any]
    took_over: dict[str, Any] | None
    _fd: int

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            atomic_write_json(_record_path(self.path), {**self.record, "released_at": _now()})
        finally:
            with _HELD_LOCK:
                _HELD.pop(str(self.path.resolve()), None)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _record_path(lock: Path) -> Path:
    return lock.with_suffix(".json")


def _read_record(lock: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(lock).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lock(fd: int) -> bool:
    """Take the POSIX lock of an open file now; False when another process holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def describe_holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process"
    return f"{record.get('host', '?')}:{record.get('pid', '?')} (since {record.get('started_at', '?')})"


def try_claim(lock: str | Path, task: str) -> Claim | None:
    """Claim now, or None when a live holder (another process, or this one) has it."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = str(lock.resolve())
    with _HELD_LOCK:
        if key in _HELD:
            return None
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        if not _lock(fd):
            os.close(fd)
            return None
        try:
            previous = _read_record(lock)
            took_over = previous if previous and not previous.get("released_at") else None
            record = {
                "task": task,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": _now(),
                "released_at": None,
            }
            if took_over:
                record["took_over_from"] = {k: took_over.get(k) for k in ("host", "pid", "started_at")}
            atomic_write_json(_record_path(lock), record)
        except BaseException:
            os.close(fd)
            raise
        held = Claim(lock, record, took_over, fd)
        _HELD[key] = held
        return held


def claim(
    lock: str | Path,
    task: str,
    poll: float = 1.0,
    timeout: float | None = None,
    say: Callable[[str], None] = log.info,
) -> Claim:
    """Claim, waiting (with one message) while a live holder has it."""
    start = time.monotonic()
    announced = None
    while True:
        held = try_claim(lock, task)
        if held is not None:
            return held
        holder = describe_holder(_read_record(Path(lock)))
        if holder != announced:
            say(f"{task}: claimed by {holder}; waiting for it")
            announced = holder
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{task}: still claimed by {holder} after {timeout:.0f} s")
        time.sleep(poll)


def holder(lock: str | Path) -> dict[str, Any] | None:
    """The record of the live holder of a claim, or None when nobody holds it."""
    lock = Path(lock)
    if not lock.is_file():
        return None
    with _HELD_LOCK:
        mine = _HELD.get(str(lock.resolve()))
        if mine is not None:
            return mine.record
        fd = os.open(lock, os.O_RDWR)
        try:
            free = _lock(fd)
        finally:
            os.close(fd)  # also drops the probing lock, if it was taken
        return None if free else (_read_record(lock) or {})
