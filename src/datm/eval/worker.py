"""What one process keeps between tasks: the tokenizer and the base model, loaded once (on this
process's device) and shared by every task it runs — training, merge selection's dev translations,
the run's test translations — and the translation session every translating task goes through."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datm import device, models
from datm.config import Config
from datm.eval.engines import ENGINES, Choice, Decoding, Engine, VllmLLM, choose, kind_of
from datm.eval.translate import Request, TranslateError, inference_dtype
from datm.log import get_logger
from datm.plan import BASE

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
        self._vllm: VllmLLM | None = None

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

    def vllm(self, dtype: Any, max_rank: int, slots: int) -> VllmLLM:
        """vLLM's offline engine on the base model, built once per process and rebuilt only for a
        module of a higher LoRA rank, more LoRAs at once or another dtype than it was built for."""
        if self._vllm is None or not self._vllm.fits(dtype, max_rank, slots):
            if self._vllm is not None:
                self._vllm.close()
            self.forget_model()  # on a GPU, vLLM takes the memory the transformers model held
            self._vllm = VllmLLM(self.model_path, dtype, max_rank, slots)
        return self._vllm

    def close(self) -> None:
        """Stop the vLLM engine (its processes) and drop the models."""
        if self._vllm is not None:
            self._vllm.close()
            self._vllm = None
        self.forget_model()

    def forget_model(self) -> None:
        """Drop the model (e.g. after a failed task may have left adapter layers in it)."""
        self._model = None
        gc.collect()


@dataclass
class Session:
    """The config's eval decoding over some modules, each module translated by the engine `choose`
    picks for it (`eval.engine`; an engine starts when a request first needs it); requests routed to
    modules of different engines are split between them and put back in order. `last_info` says
    what was translated, and by which engine and why."""

    worker: Worker
    modules: dict[str, Path]
    chosen: dict[str, Choice]  # module (or BASE) -> its engine and why
    decoding: Decoding
    engines: dict[str, Engine] = field(default_factory=dict)
    last_info: dict[str, Any] = field(default_factory=dict)

    def engine_of(self, module: str) -> str:
        return self.chosen[module].engine

    def engine(self, name: str) -> Engine:
        if name not in self.engines:
            mods = {m: p for m, p in self.modules.items() if self.chosen[m].engine == name}
            self.engines[name] = ENGINES[name](self.worker, mods, self.decoding)
        return self.engines[name]

    def __call__(self, requests: Sequence[Request], routes: dict[str, str]) -> list[str]:
        by_engine: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            module = routes.get(str(r.direction))
            if module not in self.chosen:
                raise TranslateError(
                    f"no module serves direction {r.direction}; the plan routes {sorted(routes)}"
                )
            by_engine.setdefault(self.chosen[module].engine, []).append(i)
        out: list[str] = [""] * len(requests)
        info: dict[str, Any] = {"segments": len(requests), "leading_line_breaks": 0, "delta_modules": {}}
        for name, idxs in sorted(by_engine.items()):
            engine = self.engine(name)
            for i, hyp in zip(idxs, engine.translate([requests[i] for i in idxs], routes), strict=True):
                out[i] = hyp
            info["leading_line_breaks"] += engine.last_info.get("leading_line_breaks", 0)
            info["delta_modules"].update(engine.last_info.get("delta_modules", {}))
            continued = engine.last_info.get("continued_after_a_leading_line_break")
            if continued is not None:  # the vLLM engine's: requests it generated for a second time
                info["continued_after_a_leading_line_break"] = continued
        used = sorted({routes[str(r.direction)] for r in requests})
        info["engines"] = {m: asdict(self.chosen[m]) for m in used}
        self.last_info = info
        return out

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def made_with(cfg: Config, model_path: str, kind: str) -> dict[str, Any]:
    """The settings that make the translations of a module applied as `kind` (LORA, DELTA or BASE):
    the eval decoding and the engine that translates it. Recorded with every translation, which is
    reused (or scored) only under the same: a translation of one engine never stands for another's."""
    engine = choose(cfg.eval.engine, model_path, kind, cfg.eval.beams).engine
    return {**cfg.eval.decoding(), "eval.engine": engine}


def choices(worker: Worker, modules: dict[str, Path], cfg: Config) -> dict[str, Choice]:
    """Each module's engine (and BASE's: the bare model), per `eval.engine`, said in the log."""
    chosen = {}
    for name in [*modules, BASE]:
        chosen[name] = choose(cfg.eval.engine, worker.model_path, kind_of(name, modules), cfg.eval.beams)
        if name != BASE:
            say = log.debug if chosen[name].engine == cfg.eval.engine else log.info
            say(f"{name}: translated by the {chosen[name].engine} engine ({chosen[name].why})")
    return chosen


@contextmanager
def translation_session(worker: Worker, modules: dict[str, Path], cfg: Config) -> Iterator[Session]:
    """Translate through `modules` (name -> module directory) with the config's eval decoding, each
    module on its engine (`choices`); the worker's shared models are given back as they were."""
    ev = cfg.eval
    dtype = inference_dtype(ev.precision, device.current())
    session = Session(
        worker,
        modules,
        choices(worker, modules, cfg),
        Decoding(ev.beams, ev.max_new_tokens, ev.batch_size, dtype, cfg.prompt),
    )
    try:
        yield session
    finally:
        session.close()
