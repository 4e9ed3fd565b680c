"""What one process keeps between tasks: the tokenizer and the base model, loaded once (on this
process's device) and shared by every task it runs — training, merge selection's dev translations,
the run's test translations — and the translation session every translating task goes through."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datm import device, models
from datm.config import Config
from datm.eval.translate import Request, Translator, inference_dtype
from datm.log import get_logger

log = get_logger(__name__)


class Worker:
    """The base model and tokenizer of one process, shared by the tasks it runs."""

    def __init__(self, cfg: Config, progress: bool = True) -> None:
        self.base_model = cfg.base_model
        self.attn_implementation = cfg.train.attn_implementation
        self.progress = progress
        self._path: str | None = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._fingerprint: str | None = None

    def serves(self, cfg: Config) -> bool:
        return (cfg.base_model, cfg.train.attn_implementation) == (self.base_model, self.attn_implementation)

    @property
    def model_path(self) -> str:
        if self._path is None:
            self._path = models.resolve(self.base_model)
        return self._path

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = models.fingerprint(self.model_path)
        return self._fingerprint

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.model_path)
        return self._tokenizer

    def model(self, dtype: Any) -> Any:
        """The base model in `dtype`. A model trained in fp32 is converted in place for bf16
        inference (as a single run always did); going back to fp32 reloads it."""
        import torch

        if self._model is not None and self._model.dtype != dtype:
            if self._model.dtype == torch.float32:
                self._model.to(dtype)
            else:
                self.forget_model()
        if self._model is None:
            models.check_attn_implementation(self.attn_implementation)
            log.debug(f"loading the base model {self.model_path} ({dtype}) on {device.current()}")
            self._model = models.load_model(
                self.model_path,
                dtype=dtype,
                device=str(device.current()),
                attn_implementation=self.attn_implementation,
            )
        return self._model

    def forget_model(self) -> None:
        """Drop the model (e.g. after a failed task may have left adapter layers in it)."""
        self._model = None
        gc.collect()


@dataclass
class Session:
    """A Translator over the worker's base model, decoding with the config's eval settings."""

    translator: Translator
    cfg: Config
    progress: bool

    def __call__(self, requests: Sequence[Request], routes: dict[str, str]) -> list[str]:
        ev = self.cfg.eval
        return self.translator.translate(
            requests,
            routes,
            beams=ev.beams,
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            progress=self.progress,
        )

    @property
    def last_info(self) -> dict[str, Any]:
        return self.translator.last_info


@contextmanager
def translation_session(worker: Worker, modules: dict[str, Path], cfg: Config) -> Iterator[Session]:
    """Translate through `modules` (name -> module directory) on the worker's shared base model, in
    the config's inference dtype and decoding; the base model is given back without adapters."""
    from peft import PeftModel

    model = worker.model(inference_dtype(cfg.eval.precision, device.current()))
    translator = Translator(model, worker.tokenizer, modules, cfg.prompt)
    try:
        yield Session(translator, cfg, worker.progress)
    finally:
        if isinstance(translator.model, PeftModel):
            translator.model.unload()  # give the shared base model back without adapters
