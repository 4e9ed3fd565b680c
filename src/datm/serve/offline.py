"""`datm translate`: a finished run's routes, offline — datm's Translator over every module the run's
plan routes to, read through `RunView` (the one reader of a run directory)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from datm.analysis.view import RunView
from datm.config import Config
from datm.eval.translate import Translator, inference_dtype, read_requests


def translator_for(view: RunView, prompt_style: str | None = None) -> Translator:
    """A Translator over the modules that a finished run's plan routes to, on this machine's device."""
    from datm import models

    model_path = view.base_model()
    tok = models.load_tokenizer(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = inference_dtype(view.config.eval.precision, device)
    model = models.load_model(model_path, dtype=dtype, device=str(device))
    modules = {name: m.path for name, m in view.modules.items()}
    return Translator(model, tok, modules, prompt_style or view.config.prompt)


def load_for_run(run_dir: Path, prompt_style: str | None = None) -> tuple[Translator, dict[str, str], Config]:
    """(a Translator over a run's modules, the run's routes, the run's config)."""
    view = RunView.open(run_dir)
    return translator_for(view, prompt_style), view.routed_plan().routes, view.config


def main(args: Any) -> None:
    from datm.artifacts import atomic_write_text
    from datm.data import decode_text, read_lines, split_lines, write_text  # one line discipline

    translator, routes, run_cfg = load_for_run(Path(args.run))
    ev = run_cfg.eval
    if args.input == "-":  # the bytes, so that stdin splits exactly as a file does
        lines = split_lines(decode_text(sys.stdin.buffer.read(), "stdin"))
    else:
        lines = read_lines(args.input)
    requests = read_requests(lines, args.pair)
    outs = translator.translate(
        requests,
        routes,
        beams=args.beams or ev.beams,
        max_new_tokens=args.max_new_tokens or ev.max_new_tokens,
        batch_size=args.batch_size or ev.batch_size,
    )
    text = write_text(outs)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
