"""`datm translate`: a finished run's routes, offline, through the translation session of the run's
own test translations (`datm.eval.worker.translation_session`: each module on its engine, per
`eval.engine`) over every module the run's plan routes to, read through `RunView` (the one reader of
a run directory). `translator_for` is the transformers Translator alone (the serving engine's)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from datm.analysis.view import RunView
from datm.config import Config
from datm.eval.translate import Request, Translator, inference_dtype, read_requests
from datm.eval.worker import Worker, translation_session


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


def open_run(run: Path) -> RunView:
    """A finished run whose every routed module is there (checked before any input is read)."""
    view = RunView.open(run)
    _ = view.modules  # every routed module finished and recognised
    return view


def translate_run(view: RunView, requests: list[Request], args: Any) -> list[str]:
    """`requests` through a finished run's routes, each module on its engine (the run's eval.engine
    unless `args` asks for another): the same translation session as the run's own test translations."""
    cfg = asked_config(view.config, args)
    modules = {name: m.path for name, m in view.modules.items()}
    worker = Worker(cfg)
    try:
        with translation_session(worker, modules, cfg) as translate:
            return translate(requests, view.routed_plan().routes)
    finally:
        worker.close()


def asked_config(run_cfg: Config, args: Any) -> Config:
    """The run's config with the eval settings `datm translate` was asked for (else the run's)."""
    ev = run_cfg.eval
    asked = {
        "beams": args.beams or ev.beams,
        "max_new_tokens": args.max_new_tokens or ev.max_new_tokens,
        "batch_size": args.batch_size or ev.batch_size,
        "engine": args.engine or ev.engine,
    }
    return replace(run_cfg, eval=replace(ev, **asked))


def main(args: Any) -> None:
    from datm.artifacts import atomic_write_text
    from datm.data import decode_text, read_lines, split_lines, write_text  # one line discipline

    view = open_run(Path(args.run))
    if args.input == "-":  # the bytes, so that stdin splits exactly as a file does
        lines = split_lines(decode_text(sys.stdin.buffer.read(), "stdin"))
    else:
        lines = read_lines(args.input)
    outs = translate_run(view, read_requests(lines, args.pair), args)
    text = write_text(outs)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
