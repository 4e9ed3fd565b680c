"""Reports from run directories written here: tables, bold best values, averages, plots, HTML, marks."""

from __future__ import annotations

import base64
import json
import random
import re
from pathlib import Path

import matplotlib.image
import pytest

from datm import cli
from datm.analysis import report
from datm.artifacts import atomic_write_json
from datm.eval import evaluate as E

DIRECTIONS = ["de-en", "cs-en", "en-de", "en-cs"]
WORDS = {
    "en": "the cat sat on a mat while dog ran to house in garden near old tree".split(),
    "de": "die Katze sass auf einer Matte waehrend Hund lief zum Haus im Garten alten Baum".split(),
    "cs": "kocka sedela na rohozce zatimco pes bezel k domu v zahrade u stareho stromu".split(),
}


def _references(direction: str, n: int = 40) -> list[str]:
    rng = random.Random(direction)
    words = WORDS[direction.split("-")[1]]
    return [" ".join(rng.choice(words) for _ in range(9)) for _ in range(n)]


def _system(refs: list[str], exact: float, seed: int) -> list[str]:
    """A system that reproduces a share `exact` of the references and garbles the rest."""
    rng = random.Random(seed)
    out = []
    for ref in refs:
        words = ref.split()
        out.append(ref if rng.random() < exact else " ".join(rng.sample(words, len(words))[:5]))
    return out


def _make_run(root: Path, name: str, strategy: str, exact: float, directions: list[str] = DIRECTIONS) -> Path:
    run = root / name
    scored = {}
    for i, d in enumerate(directions):
        refs = _references(d)
        hyps = _system(refs, exact, seed=i)
        (run / "translations").mkdir(parents=True, exist_ok=True)
        (run / "translations" / f"{d}.hyp.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (run / "translations" / f"{d}.ref.txt").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
        scored[d] = E.score_direction(hyps, refs, d.split("-")[1])
    plan = {
        "strategy": strategy,
        "languages": ["de", "cs"],
        "groups": {"g1": ["de", "cs"]},
        "adapters": [],
        "merges": [],
        "routes": dict.fromkeys(directions, "m"),
    }
    atomic_write_json(run / "plan.json", plan)
    atomic_write_json(
        run / "scores.json",
        {
            "directions": {d: s.to_dict() for d, s in scored.items()},
            "averages": E.averages(scored),
            "signatures": next(iter(scored.values())).signatures,
            "provenance": {},
        },
    )
    return run


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """Run label -> cells of the Markdown table under `## heading` (header row under key 'Run')."""
    section = markdown.split(f"## {heading}\n", 1)[1].strip().split("\n\n", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(cells[0]) <= {"-", ":"}:
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    return float(re.sub(r"[*†‡]", "", cell))


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "weak": _make_run(root, "weak", "multilingual", exact=0.15),
        "mid": _make_run(root, "mid", "separate", exact=0.5),
        "strong": _make_run(root, "strong", "datm", exact=0.9),
    }


@pytest.fixture(scope="module")
def written(three_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    runs = [three_runs["mid"], three_runs["strong"], three_runs["weak"]]
    return report.write_report(runs, out, baseline=three_runs["mid"])


def test_markdown_tables_hold_the_scores_best_in_bold_and_correct_averages(
    three_runs: dict[str, Path], written: Path
) -> None:
    md = written.read_text(encoding="utf-8")
    for metric, heading in (("bleu", "BLEU"), ("chrf", "chrF++")):
        rows = _table_rows(md, heading)
        assert rows["Run"] == ["de-en", "cs-en", "XX→En Avg", "en-de", "en-cs", "En→XX Avg"]
        for name, strategy in (("weak", "multilingual"), ("mid", "separate"), ("strong", "datm")):
            label = f"{name} ({strategy})" + (" (baseline)" if name == "mid" else "")
            scores = json.loads((three_runs[name] / "scores.json").read_text())["directions"]
            cells = dict(zip(rows["Run"], rows[label], strict=True))
            for d in DIRECTIONS:
                assert _number(cells[d]) == round(scores[d][metric], 2)
            for family, dirs in (("XX→En", ["de-en", "cs-en"]), ("En→XX", ["en-de", "en-cs"])):
                mean = sum(scores[d][metric] for d in dirs) / 2
                assert _number(cells[f"{family} Avg"]) == round(mean, 2)
            # The strong system is best in every column, and only its cells are bold.
            assert all(c.startswith("**") for c in cells.values()) == (name == "strong")
            assert not any(c.startswith("**") for c in cells.values()) == (name != "strong")


def test_significance_marks_against_the_baseline(written: Path) -> None:
    md = written.read_text(encoding="utf-8")
    for heading in ("BLEU", "chrF++"):
        rows = _table_rows(md, heading)
        directions = [i for i, c in enumerate(rows["Run"]) if "Avg" not in c]
        assert all(rows["strong (datm)"][i].endswith("†") for i in directions)
        assert all(rows["weak (multilingual)"][i].endswith("‡") for i in directions)
        assert not any(c.endswith(("†", "‡")) for c in rows["mid (separate) (baseline)"])
    assert "† / ‡ = significantly better / worse than the baseline mid (separate)" in md

    data = json.loads((written.parent / "report.json").read_text(encoding="utf-8"))
    for metric in ("bleu", "chrf"):
        for d in DIRECTIONS:
            assert data["significance"]["strong (datm)"][metric][d]["p_value"] < 0.05
            assert data["significance"]["strong (datm)"][metric][d]["delta"] > 0
            assert data["significance"]["weak (multilingual)"][metric][d]["delta"] < 0
    assert [r["baseline"] for r in data["runs"]] == [True, False, False]


def test_plots_are_pngs_with_one_bar_per_run_and_direction(written: Path) -> None:
    data = json.loads((written.parent / "report.json").read_text(encoding="utf-8"))
    for metric in ("bleu", "chrf"):
        fig = report.plot_metric(data, metric)
        bars = fig.axes[0].patches
        assert len(bars) == 3 * len(DIRECTIONS)
        rows = data["tables"][metric]["rows"]
        expected = sorted(row["cells"][d]["value"] for row in rows for d in DIRECTIONS)
        assert sorted(b.get_height() for b in bars) == pytest.approx(expected)
        width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
        image = matplotlib.image.imread(written.parent / f"{metric}_by_direction.png")
        assert image.shape == (height, width, 4)
        assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_html_is_self_contained(written: Path) -> None:
    page = (written.parent / "report.html").read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == 2
    assert base64.b64decode(embedded[0]) == (written.parent / "bleu_by_direction.png").read_bytes()
    assert "<style>" in page and "<link" not in page
    assert re.search(r"<b>\d+\.\d\d</b>†", page)
    assert "strong (datm)" in page and "‡" in page


def test_missing_directions_show_a_dash_and_averages_use_common_ones(tmp_path: Path) -> None:
    full = _make_run(tmp_path, "full", "datm", exact=0.8)
    partial = _make_run(tmp_path, "partial", "separate", exact=0.5, directions=["de-en", "cs-en", "en-de"])
    md = report.write_report([full, partial], tmp_path / "out", baseline=partial).read_text(encoding="utf-8")
    rows = _table_rows(md, "BLEU")
    cells = dict(zip(rows["Run"], rows["partial (separate) (baseline)"], strict=True))
    assert cells["en-cs"] == "–"
    full_cells = dict(zip(rows["Run"], rows["full (datm)"], strict=True))
    scores = json.loads((full / "scores.json").read_text())["directions"]
    assert _number(full_cells["en-cs"]) == round(scores["en-cs"]["bleu"], 2)
    assert not full_cells["en-cs"].endswith("†")  # not in every run: not tested
    assert _number(full_cells["En→XX Avg"]) == round(scores["en-de"]["bleu"], 2)  # en-cs left out
    assert "that every run has" in md


def test_run_report_single_run(tmp_path: Path) -> None:
    run = _make_run(tmp_path, "only", "datm", exact=0.6)
    path = report.run_report(run)
    assert path == run / "report.md"
    md = path.read_text(encoding="utf-8")
    cells = _table_rows(md, "BLEU")["only (datm)"]
    scores = json.loads((run / "scores.json").read_text())
    assert _number(cells[2]) == round(scores["averages"]["xx-en"]["bleu"], 2)
    assert "**" not in md.split("## chrF++")[0]  # one run: nothing to be best against
    assert "](bleu_by_direction.png)" in md
    assert matplotlib.image.imread(run / "bleu_by_direction.png").shape[2] == 4


def test_run_without_scores_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "unscored").mkdir()
    expected = r"unscored: no scores.json \(expected .*unscored/scores.json\)"
    with pytest.raises(report.ReportError, match=expected):
        report.write_report([tmp_path / "unscored"], tmp_path / "out")
    run = _make_run(tmp_path, "bad", "datm", exact=0.5, directions=["de-en"])
    scores = json.loads((run / "scores.json").read_text())
    scores["directions"]["de-en"]["bleu"] = "high"
    (run / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(report.ReportError, match=r"scores.json: directions.de-en.bleu must be a number"):
        report.run_report(run)


def test_cli_report(three_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(three_runs["weak"]), str(three_runs["strong"])]
    assert cli.main(["report", *runs, "--out", str(tmp_path / "r")]) == 0
    assert "report written" in capsys.readouterr().out
    rows = _table_rows((tmp_path / "r" / "report.md").read_text(encoding="utf-8"), "BLEU")
    assert set(rows) == {"Run", "weak (multilingual)", "strong (datm)"}
    assert not any("†" in c or "‡" in c for c in rows["strong (datm)"])  # no baseline, no marks

    # A baseline that is not among the runs gets the first row.
    args = ["report", str(three_runs["strong"]), "--out", str(tmp_path / "b")]
    args += ["--baseline", str(three_runs["mid"])]
    assert cli.main(args) == 0
    rows = _table_rows((tmp_path / "b" / "report.md").read_text(encoding="utf-8"), "BLEU")
    assert list(rows) == ["Run", "mid (separate) (baseline)", "strong (datm)"]
    assert rows["strong (datm)"][0].endswith("†")


def test_runs_scored_on_different_references_are_not_compared(tmp_path: Path) -> None:
    base = _make_run(tmp_path, "base", "separate", exact=0.5, directions=["de-en"])
    other = _make_run(tmp_path, "other", "datm", exact=0.9, directions=["de-en"])
    ref = other / "translations" / "de-en.ref.txt"
    ref.write_text("changed\n" + ref.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(report.ReportError, match=r"other/translations/de-en.ref.txt differs from the base"):
        report.write_report([base, other], tmp_path / "out", baseline=base)
