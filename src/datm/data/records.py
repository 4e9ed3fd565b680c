"""Parallel data: readers into `Pair` records, and prompts / token ids with target-only labels.

Knows nothing about strategies: callers ask for the pairs of some directions.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datm import languages as L
from datm.errors import DatmError
from datm.languages import Direction

IGNORE_INDEX = -100


class DataError(DatmError):
    pass


@dataclass(frozen=True)
class Pair:
    src_lang: str
    tgt_lang: str
    src: str
    tgt: str
    origin: str  # "file:line" (or "dataset[split]:row") it came from

    @property
    def direction(self) -> Direction:
        return Direction(self.src_lang, self.tgt_lang)


@dataclass
class ReadReport:
    """What reading skipped, so nothing is dropped silently."""

    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    # direction -> the reverse direction's file it was read from (training only; see read_direction)
    reversed_files: dict[str, str] = field(default_factory=dict)

    def add(self, msg: str) -> None:
        self.skipped.append(msg)


# ----------------------------------------------------------------------------------- readers


def _bad(origin: str, why: str, on_bad: str, report: ReadReport | None) -> None:
    msg = f"{origin}: {why}"
    if on_bad == "skip":
        if report is not None:
            report.add(msg)
        return
    raise DataError(msg + " (set data.on_bad_record: skip to skip such records)")


def _record_pair(rec: Any, a: str, b: str, origin: str) -> tuple[str, str] | str:
    """The (a, b) texts of one ALMA record, or why it is bad."""
    if not isinstance(rec, dict):
        return f'expected an object {{"translation": {{"{a}": ..., "{b}": ...}}}}, got {type(rec).__name__}'
    tr = rec.get("translation", rec)
    if not isinstance(tr, dict):
        return "'translation' is not an object"
    for k in (a, b):
        if k not in tr:
            return f"missing key {k!r} in translation (has {sorted(tr)})"
        if not isinstance(tr[k], str) or not tr[k].strip():
            return f"empty or non-text {k!r} side"
    return tr[a], tr[b]


def _keep_good(
    records: Iterable[tuple[str, Any]], a: str, b: str, on_bad: str, report: ReadReport | None
) -> list[tuple[str, str, str]]:
    """(a, b, origin) of every good (origin, record); bad ones stop the read or are counted."""
    out = []
    for origin, rec in records:
        got = _record_pair(rec, a, b, origin)
        if isinstance(got, str):
            _bad(origin, got, on_bad, report)
        else:
            out.append((got[0], got[1], origin))
    return out


def _read_alma(
    path: Path, a: str, b: str, on_bad: str, report: ReadReport | None
) -> list[tuple[str, str, str]]:
    text = read_text(path)
    if text.lstrip().startswith("["):  # a JSON list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: broken JSON ({e.msg}); expected a JSON list of ALMA records"
            ) from None
        return _keep_good(((f"{path}[{i}]", rec) for i, rec in enumerate(records)), a, b, on_bad, report)

    def jsonl() -> Iterator[tuple[str, Any]]:
        for lineno, line in enumerate(split_lines(text), 1):
            if not line.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as e:
                _bad(origin, f"broken JSON ({e.msg}); expected one ALMA record per line", on_bad, report)

    return _keep_good(jsonl(), a, b, on_bad, report)


def _read_tsv(path: Path, on_bad: str, report: ReadReport | None) -> list[tuple[str, str, str]]:
    out = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        origin = f"{path}:{lineno}"
        cols = line.split("\t")
        if len(cols) != 2:
            _bad(
                origin,
                f"expected 2 tab-separated columns (source<TAB>target), got {len(cols)}",
                on_bad,
                report,
            )
        elif not cols[0].strip() or not cols[1].strip():
            _bad(origin, "empty source or target column", on_bad, report)
        else:
            out.append((cols[0], cols[1], origin))
    return out


def _read_datasets(spec: str, a: str, b: str, split: str, on_bad: str, report: ReadReport | None):
    import datasets

    # "hub-id-or-dir:config", e.g. "haoranxu/WMT23-Test:en-de" (X-ALMA's test sets)
    name, _, subset = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    p = Path(name)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(name, subset or None)
    except Exception as e:  # datasets raises many types; report the spec, not a deep traceback
        raise DataError(f"cannot load dataset {spec!r}: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"dataset {spec!r} has no split {split!r} (has {list(ds)})")
        ds = ds[split]
    return _keep_good(((f"{spec}[{split}]:{i}", rec) for i, rec in enumerate(ds)), a, b, on_bad, report)


def _flores_file(root: Path, code: str, split: str) -> Path | None:
    """FLORES-200 (`devtest/deu_Latn.devtest`) and FLORES+ text layouts (`devtest/devtest.deu_Latn`...)."""
    for name in (f"{code}.{split}", f"{split}.{code}", code, f"{code}.txt"):
        if (root / split / name).is_file():
            return root / split / name
    return None


def read_flores(root: str | Path, direction: Direction, split: str = "devtest") -> list[Pair]:
    """Line-aligned FLORES files of a local FLORES-200 / FLORES+ directory, by FLORES code."""
    root = Path(root)
    if split not in ("dev", "devtest"):
        raise DataError(f"FLORES split must be 'dev' or 'devtest', got {split!r}")
    sides = []
    for lang in (direction.src, direction.tgt):
        code = L.get(lang).flores
        f = _flores_file(root, code, split)
        if f is None:
            raise DataError(
                f"FLORES directory {root}: no {split} file for {lang} ({code}), "
                f"expected e.g. {root}/{split}/{code}.{split}"
            )
        sides.append((f, read_lines(f)))
    (fs, src), (ft, tgt) = sides
    if len(src) != len(tgt):
        raise DataError(f"FLORES files are not aligned: {fs} has {len(src)} lines, {ft} has {len(tgt)}")
    for i, (a, b) in enumerate(zip(src, tgt, strict=True), 1):
        if not a.strip() or not b.strip():
            raise DataError(f"{fs if not a.strip() else ft}:{i}: empty line in a FLORES file")
    return [
        Pair(direction.src, direction.tgt, a, b, f"{fs}:{i}")
        for i, (a, b) in enumerate(zip(src, tgt, strict=True), 1)
    ]


def dev_split(fmt: str) -> str | None:
    """The name of the dev split in formats that hold splits (FLORES, datasets); None for files."""
    return {"flores": "dev", "datasets": "validation"}.get(fmt)


def detect_format(path: str) -> str:
    if path.startswith("flores:"):
        return "flores"
    if path.endswith((".json", ".jsonl")):
        return "alma"
    if path.endswith((".tsv", ".txt")):
        return "tsv"
    if Path(path).is_dir():
        return "datasets"
    raise DataError(f"{path}: cannot tell the format from the name; set data.format (alma, tsv or datasets)")


def pattern_path(pattern: str, direction: Direction) -> str:
    return pattern.format(xx=direction.foreign, src=direction.src, tgt=direction.tgt)


def direction_file(pattern: str, direction: Direction, allow_reverse: bool = True) -> tuple[Path, bool]:
    """The file holding a direction's pairs, and whether it is the reverse direction's file.

    A `{xx}` pattern names one file per language pair, for both directions. With a `{src}-{tgt}`
    pattern, a missing file may be replaced by the reverse direction's file only where
    `allow_reverse` (training data: the same pairs read backwards); a test set is direction-specific
    (WMT's de-en and en-de sets hold different documents), so it never is.
    """
    path = Path(pattern_path(pattern, direction))
    if path.exists():
        return path, False
    backwards = Direction(direction.tgt, direction.src)
    reverse = Path(pattern_path(pattern, backwards))
    if "{xx}" not in pattern and reverse.exists() and allow_reverse:
        return reverse, True
    hint = (
        f"; {reverse} (the reverse direction's set) exists but a test set is not read backwards: "
        f"datm never scores {direction} on the {backwards} set"
        if "{xx}" not in pattern and reverse.exists()
        else ""
    )
    raise DataError(f"no data for {direction}: file {path} does not exist (pattern {pattern!r}){hint}")


def check_readable(
    pattern: str, direction: Direction, fmt: str = "auto", allow_reverse: bool = True, split: str = "train"
) -> Path | None:
    """Fail now, naming the file, if a direction's data file is missing or unreadable: before a model
    is loaded. Returns the file (None for hub datasets, which only loading can check)."""
    path = pattern_path(pattern, direction)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "flores":
        root = Path(path.removeprefix("flores:"))
        for lang in (direction.src, direction.tgt):
            code = L.get(lang).flores
            if _flores_file(root, code, split) is None:
                raise DataError(
                    f"FLORES directory {root}: no {split} file for {lang} ({code}), "
                    f"expected e.g. {root}/{split}/{code}.{split}"
                )
        return root
    if fmt == "datasets":
        return None  # a hub id or a saved dataset: loading it is the check
    file, _ = direction_file(pattern, direction, allow_reverse)
    if file.is_dir():
        raise DataError(f"data for {direction}: {file} is a directory; expected a {fmt} file")
    try:
        with file.open("rb") as f:
            f.read(1)
    except OSError as e:
        raise DataError(f"data for {direction}: cannot read {file}: {e.strerror or e}") from None
    return file


def read_direction(
    pattern: str,
    direction: Direction,
    fmt: str = "auto",
    on_bad: str = "error",
    report: ReadReport | None = None,
    split: str = "train",
    allow_reverse: bool = True,
) -> list[Pair]:
    """Pairs of one direction. A `{xx}` file feeds both directions of its language pair; so does a
    `{src}-{tgt}` file for the missing reverse direction where `allow_reverse` (never for test sets),
    recorded in `report.reversed_files`."""
    src, tgt = direction.src, direction.tgt
    path = pattern_path(pattern, direction)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "flores":
        return read_flores(path.removeprefix("flores:"), direction, split)
    if fmt == "datasets":
        rows = _read_datasets(path, src, tgt, split, on_bad, report)
        return [Pair(src, tgt, s, t, o) for s, t, o in rows]
    p, reverse = direction_file(pattern, direction, allow_reverse)
    if not p.exists():
        raise DataError(f"no data for {direction}: file {p} does not exist (pattern {pattern!r})")
    if reverse and report is not None:
        report.reversed_files[str(direction)] = str(p)
    if fmt == "alma":
        rows = _read_alma(p, src, tgt, on_bad, report)
    elif fmt == "tsv":
        rows = _read_tsv(p, on_bad, report)
        # TSV columns: a {xx} file is xx<TAB>en; a {src}-{tgt} file is src<TAB>tgt.
        flip = (direction.src == L.ENGLISH) if "{xx}" in pattern else reverse
        if flip:
            rows = [(t, s, o) for s, t, o in rows]
    else:
        raise DataError(f"unknown data format {fmt!r}")
    return [Pair(src, tgt, s, t, o) for s, t, o in rows]


def select(pairs: list[Pair], limit: int | None, seed: int) -> list[Pair]:
    """A seeded sample of at most `limit` pairs. The order depends only on the seed and the data, so
    both directions of a language pair, and every strategy, see the same examples."""
    if limit is None or limit >= len(pairs):
        return list(pairs)
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    return [pairs[i] for i in sorted(idx[:limit])]


# ----------------------------------------------------------------------------------- segment text
#
# datm's one line discipline for segment text (sources, references, hypotheses, dev translations,
# `datm translate`'s input and output): one segment per line, and a line ends at '\n' (a '\r' right
# before it, as in CRLF files, is dropped). The writer puts a space for every character that any
# reader might take for a line break (those of str.splitlines() and universal newlines), so what datm
# writes has one line per segment for every reader (sacrebleu's command line included); the reader
# splits at '\n' only, so a file reads the same from a path and from stdin, and a lone '\r', form
# feed or U+2028 stays inside its segment.

LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_SPACES = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))


def write_text(lines: Iterable[str]) -> str:
    """Segments as text, one per line: each line-break character inside a segment becomes a space."""
    return "".join(line.translate(_SPACES) + "\n" for line in lines)


def split_lines(text: str) -> list[str]:
    """The lines of `text`: ended by '\n' or '\r\n' only; empty lines stay as ''; a final line
    break ends the last line (it starts no empty one)."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def decode_text(raw: bytes, where: str | Path) -> str:
    """UTF-8 bytes as text, newlines untouched; bad bytes are an error naming `where`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 file's text, newlines untouched (no universal-newline translation)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return decode_text(raw, path)


def read_lines(path: str | Path) -> list[str]:
    """A text file's segments, one per line (see `split_lines`)."""
    return split_lines(read_text(path))


# ----------------------------------------------------------------------------------- prompts


def alma_prompt(src_lang: str, tgt_lang: str, src: str) -> str:
    s, t = L.name(src_lang), L.name(tgt_lang)
    return f"Translate this from {s} to {t}:\n{s}: {src}\n{t}:"


@dataclass
class PromptFormat:
    """Turns a pair into the text the model sees; `style` is 'alma' or 'chat' (X-ALMA)."""

    tokenizer: Any
    style: str = "alma"

    def __post_init__(self) -> None:
        if self.style == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise DataError("prompt: chat needs a tokenizer with a chat template; this one has none")

    def prompt(self, src_lang: str, tgt_lang: str, src: str) -> str:
        text = alma_prompt(src_lang, tgt_lang, src)
        if self.style == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def target_prefix(self) -> str:
        # ALMA puts one space between "English:" and the translation.
        return " " if self.style == "alma" else ""

    def prompt_ids(self, src_lang: str, tgt_lang: str, src: str) -> list[int]:
        text = self.prompt(src_lang, tgt_lang, src)
        # The chat template already carries BOS.
        return self.tokenizer(text, add_special_tokens=self.style == "alma")["input_ids"]


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # labels are IGNORE_INDEX for the first n_prompt tokens
    direction: str

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.n_prompt + self.input_ids[self.n_prompt :]


@dataclass
class TokenizeReport:
    total: int = 0
    truncated: int = 0  # target cut to fit max_length
    dropped: int = 0  # prompt alone longer than max_length


def tokenize_pairs(
    pairs: Sequence[Pair], fmt: PromptFormat, max_length: int
) -> tuple[list[Example], TokenizeReport]:
    tok = fmt.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; datm appends EOS after every target")
    rep = TokenizeReport()
    out: list[Example] = []
    for p in pairs:
        rep.total += 1
        prompt_ids = fmt.prompt_ids(p.src_lang, p.tgt_lang, p.src)
        full_text = fmt.prompt(p.src_lang, p.tgt_lang, p.src) + fmt.target_prefix() + p.tgt
        full = tok(full_text, add_special_tokens=fmt.style == "alma")["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids:  # tokenizer merged across the boundary
            full = prompt_ids + tok(fmt.target_prefix() + p.tgt, add_special_tokens=False)["input_ids"]
        full = full + [eos]
        if len(prompt_ids) >= max_length:
            rep.dropped += 1
            continue
        if len(full) > max_length:
            rep.truncated += 1
            full = full[:max_length]
        out.append(Example(full, len(prompt_ids), str(p.direction)))
    return out, rep


def length_batches(examples: Sequence[Example], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar length (so padding is not paid for), in a seeded random order."""
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    # Sort within windows of 64 batches: near-equal lengths per batch, still a random mix overall.
    window = batch_size * 64
    batches: list[list[int]] = []
    for start in range(0, len(idx), window):
        chunk = sorted(idx[start : start + window], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
