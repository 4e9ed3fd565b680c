"""Scores translations with COMET; run by the Python of a COMET environment, not imported by datm.

datm (`datm.comet`) runs this file's source with the interpreter named by `eval.comet.python`, in a
folder holding only the request (which carries the texts), and reads the answer it writes. It uses nothing of
datm and only the standard library besides COMET, because that environment has COMET's own
transformers and numpy, not datm's.

    python -c "<this file>" request.json

request.json: {"model": NAME_OR_PATH, "batch_size": N, "device": "cpu"|"cuda", "out": PATH,
               "jobs": {NAME: {"src": [TEXT, ...], "mt": [...], "ref": [...]}}}
out: {"model", "checkpoint", "encoder", "comet_version", "versions", "results": {NAME: {"system",
      "segments"}}} or {"error": {"kind", "message"}} (then the exit status is 1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fail(out: Path, kind: str, message: str) -> NoReturn:
    out.write_text(json.dumps({"error": {"kind": kind, "message": message}}), encoding="utf-8")
    sys.exit(1)


def _encoder(checkpoint: Path) -> str:
    """The Hugging Face encoder a COMET checkpoint is built on (named in its hparams.yaml)."""
    hparams = checkpoint.parent.parent / "hparams.yaml"
    for line in hparams.read_text(encoding="utf-8").splitlines() if hparams.is_file() else []:
        if line.startswith("pretrained_model:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return "its encoder (e.g. xlm-roberta-large)"


def _checkpoint(model: str, out: Path) -> Path:
    local = Path(model).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        return local / "checkpoints" / "model.ckpt"
    from comet import download_model

    try:
        return Path(download_model(model, local_files_only=_offline()))
    except Exception as e:  # hub errors come in many types; say what is missing instead
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if _offline()
            else f"the download failed ({type(e).__name__}: {e})"
        )
        _fail(
            out,
            "missing_model",
            f"COMET model {model!r} is not available: {how}. COMET needs the checkpoint and the encoder "
            "it is built on (xlm-roberta-large for Unbabel/wmt22-comet-da) in the Hugging Face cache: "
            "download both where there is network, or give a local model directory or .ckpt file",
        )


def main(request_path: str) -> None:
    request: dict[str, Any] = json.loads(Path(request_path).read_text(encoding="utf-8"))
    out = Path(request["out"])
    try:
        import comet
    except ImportError as e:
        hint = " (setuptools >= 81 has no pkg_resources: pip install 'setuptools<81')" * (
            "pkg_resources" in str(e)
        )
        _fail(out, "missing_comet", f"{sys.executable} cannot import comet: {type(e).__name__}: {e}{hint}")
    from importlib.metadata import version

    checkpoint = _checkpoint(request["model"], out)
    try:
        model = comet.load_from_checkpoint(str(checkpoint), local_files_only=_offline())
    except Exception as e:
        _fail(
            out,
            "load_failed",
            f"cannot load COMET checkpoint {checkpoint}: {type(e).__name__}: {e}. It needs the encoder "
            f"{_encoder(checkpoint)!r} (a local directory, or in the Hugging Face cache)",
        )
    gpus = 1 if request["device"] == "cuda" else 0
    results = {}
    for name, texts in request["jobs"].items():
        triples = zip(texts["src"], texts["mt"], texts["ref"], strict=True)
        samples = [{"src": s, "mt": m, "ref": r} for s, m, r in triples]
        pred = model.predict(samples, batch_size=request["batch_size"], gpus=gpus, progress_bar=False)
        results[name] = {"system": float(pred.system_score), "segments": [float(x) for x in pred.scores]}
    answer = {
        "model": request["model"],
        "checkpoint": str(checkpoint.resolve()),
        "encoder": _encoder(checkpoint),
        "comet_version": version("unbabel-comet"),
        "versions": {p: version(p) for p in ("torch", "transformers", "pytorch-lightning")},
        "results": results,
    }
    out.write_text(json.dumps(answer), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
