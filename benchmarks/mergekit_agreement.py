"""datm's `ties` and `dare_ties` (density 1) with the global scale λ against mergekit's own code.

mergekit runs in a virtual environment of its own (`.venv-mergekit`, made here on first use: pip
installs mergekit==MERGEKIT_VERSION from PyPI; the environment sees this one's packages through a
.pth file, so mergekit runs on the CPU torch already installed instead of pulling a CUDA build,
and pip installs only what this environment lacks, into the new one). Random PEFT LoRA adapters
(three sources of ranks 4, 8, 6 over two modules) are merged by datm (`merge_adapters`, form
dense) and, as full "models" whose weights are the sources' ΔW_i = s_i · B_i A_i over a zero base,
by mergekit's `merge_state_dicts` with its registered `ties` / `dare_ties` methods and their
`weight`, `density`, `lambda` (and `normalize`) parameters. The max abs and relative differences
of the merged ΔW per case go to benchmarks/results/mergekit_agreement.{md,json}.

mergekit's dare_ties rescales the kept entries to ΔW_i's L1 norm (its `rescale`), not by 1/density
as the DARE paper and datm do, and draws its own masks, so only density 1 (nothing dropped) is
comparable entry by entry.

    python benchmarks/mergekit_agreement.py [--venv .venv-mergekit] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
from safetensors.torch import load_file, save_file

from datm import artifacts
from datm.merge import load_delta, merge_adapters
from datm.merge.ops import delta_of

MERGEKIT_VERSION = "0.1.5"
MODULES = {"layers.0.q_proj": (64, 48), "layers.0.down_proj": (48, 96)}  # out, in
RANKS = (4, 8, 6)
ALPHA = 16
PREFIX = "base_model.model."

# (method, density, λ, weights, normalize): mergekit's defaults are ties normalize true, dare_ties false.
CASES: list[tuple[str, float, float, list[float], bool | None]] = [
    ("ties", 1.0, 1.0, [1.0, 1.0, 1.0], None),
    ("ties", 0.5, 0.5, [1.0, 1.0, 1.0], None),
    ("ties", 0.3, 1.5, [1.0, 0.7, 1.3], None),
    ("ties", 0.5, 0.4, [1.0, 0.7, 1.3], False),
    ("dare_ties", 1.0, 1.0, [1.0, 1.0, 1.0], None),
    ("dare_ties", 1.0, 0.5, [1.0, 0.7, 1.3], None),
    ("dare_ties", 1.0, 1.5, [1.0, 0.7, 1.3], True),
]

# Run inside the mergekit environment: merge the "models" (safetensors files) with mergekit's code.
DRIVER = """
import json, sys
import importlib.metadata as md
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.api import merge_state_dicts
job = json.loads(open(sys.argv[1]).read())
models = {name: load_file(path) for name, path in job["models"].items()}
for case in job["cases"]:
    params = {"weight": case["weights"], "density": case["density"], "lambda": case["scale"]}
    if case["normalize"] is not None:
        params["normalize"] = case["normalize"]
    merged = merge_state_dicts(models, case["method"], parameters=params, base="base")
    save_file({k: v.contiguous() for k, v in merged.items()}, case["out"])
print(md.version("mergekit"))
"""


def ensure_venv(venv: Path) -> Path:
    """The mergekit environment's Python, made (and mergekit installed) if it is not there."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import mergekit.merge_methods.api"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this environment's packages (its CPU torch) after the venv's own, so mergekit's pins win
    (Path(site) / "datm_shared_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), "-m", "pip", "install", f"mergekit=={MERGEKIT_VERSION}"]
    if subprocess.run(install).returncode != 0:
        raise common.BenchError(f"could not install mergekit: {' '.join(install)}")
    return python


def make_sources(root: Path) -> tuple[list[Path], dict[str, Path]]:
    """Three PEFT LoRA directories and, per source, a "model" file of its ΔW_i (plus a zero base)."""
    g = torch.Generator().manual_seed(24)
    adapters, models = [], {}
    base = {f"{m}.weight": torch.zeros(o, i) for m, (o, i) in MODULES.items()}
    models["base"] = root / "base.safetensors"
    save_file(base, models["base"])
    for n, r in enumerate(RANKS):
        d = root / f"source{n}"
        d.mkdir(parents=True, exist_ok=True)
        tensors, dense = {}, {}
        for m, (o, i) in MODULES.items():
            a, b = torch.randn(r, i, generator=g) / i**0.5, torch.randn(o, r, generator=g) * 0.05
            tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"] = a, b
            dense[f"{m}.weight"] = delta_of(a, b, ALPHA / r)  # exactly the ΔW_i datm merges
        save_file(tensors, d / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "r": r, "lora_alpha": ALPHA, "target_modules": ["q_proj", "down_proj"]}
        (d / "adapter_config.json").write_text(json.dumps(config))
        adapters.append(d)
        models[f"source{n}"] = root / f"source{n}.model.safetensors"
        save_file(dense, models[f"source{n}"])
    return adapters, models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=str(common.REPO_ROOT / ".venv-mergekit"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--results", default=str(common.RESULTS_DIR))
    args = ap.parse_args()
    started = time.perf_counter()
    python = ensure_venv(Path(args.venv))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        adapters, models = make_sources(work)
        job = {"models": {k: str(v) for k, v in models.items()}, "cases": []}
        for k, (method, density, scale, weights, normalize) in enumerate(CASES):
            job["cases"].append(
                {
                    "method": method,
                    "density": density,
                    "scale": scale,
                    "weights": dict(zip([f"source{n}" for n in range(len(RANKS))], weights, strict=True)),
                    "normalize": normalize,
                    "out": str(work / f"mergekit{k}.safetensors"),
                }
            )
        (work / "job.json").write_text(json.dumps(job))
        ran = subprocess.run(
            [str(python), "-c", DRIVER, str(work / "job.json")], capture_output=True, text=True
        )
        if ran.returncode != 0:
            raise common.BenchError(f"mergekit failed:\n{ran.stderr[-3000:]}")
        version = ran.stdout.strip().splitlines()[-1]
        rows = []
        for k, ((method, density, scale, weights, normalize), case) in enumerate(
            zip(CASES, job["cases"], strict=True)
        ):
            theirs = load_file(case["out"])
            ours = load_delta(
                merge_adapters(
                    adapters,
                    work / f"datm{k}",
                    method=method,
                    density=density,
                    form="dense",
                    weights=weights,
                    scale=scale,
                    normalize=normalize,
                    progress=False,
                ).out
            )
            diff = max(float((ours[w] - theirs[w]).abs().max()) for w in theirs)
            peak = max(float(theirs[w].abs().max()) for w in theirs)
            identical = sum(int(torch.equal(ours[w], theirs[w])) for w in theirs)
            rows.append(
                {
                    "method": method,
                    "density": density,
                    "scale": scale,
                    "weights": weights,
                    "normalize": normalize,
                    "max_abs_diff": diff,
                    "max_rel_diff": diff / peak,
                    "max_abs_value": peak,
                    "bit_identical_modules": f"{identical}/{len(theirs)}",
                }
            )
    payload = {
        "benchmark": "mergekit_agreement",
        "command": " ".join(["python", *sys.argv]),
        "mergekit": version,
        "mergekit_api": "mergekit.merge_methods.api.merge_state_dicts (its ties / dare_ties), base = 0",
        "setting": {
            "modules": {m: list(s) for m, s in MODULES.items()},
            "ranks": list(RANKS),
            "alpha": ALPHA,
        },
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"versions": artifacts.library_versions()},
    }
    write(Path(args.results), payload)
    return 0


def write(results: Path, payload: dict[str, Any]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_json(results / "mergekit_agreement.json", common.repo_relative(payload))
    header = [
        "method",
        "density",
        "λ",
        "weights",
        "normalize",
        "max abs diff (datm − mergekit)",
        "relative",
        "identical",
    ]
    table = common.markdown_table(
        header,
        [
            [
                r["method"],
                r["density"],
                r["scale"],
                ", ".join(f"{w:g}" for w in r["weights"]),
                "default" if r["normalize"] is None else str(r["normalize"]).lower(),
                f"{r['max_abs_diff']:.3g}",
                f"{r['max_rel_diff']:.3g}",
                r["bit_identical_modules"],
            ]
            for r in payload["rows"]
        ],
    )
    p, setting = payload, payload["setting"]
    text = "\n".join(
        [
            "# datm vs mergekit: ties and dare_ties (density 1) with the global scale λ",
            "",
            f"Command: `{p['command']}` ({p['seconds']} s). mergekit {p['mergekit']} in its own virtual "
            f"environment, through `{p['mergekit_api']}`; datm's `merge_adapters(..., form=dense)`.",
            f"Three random LoRA sources (ranks {setting['ranks']}, alpha {setting['alpha']}) over two "
            f"modules {setting['modules']}; mergekit merges their float32 ΔW_i over a zero base.",
            "",
            table,
            "",
            "Relative = max abs difference / max |mergekit's merged ΔW|. `normalize` default: ties",
            "averages the agreeing entries, dare_ties sums them (mergekit's defaults and the papers').",
            "",
        ]
    )
    artifacts.atomic_write_text(results / "mergekit_agreement.md", text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
