"""Plug-and-play translation: one base model, the modules a plan routes to, any mix of directions.

LoRA modules are loaded side by side into one PeftModel and served in mixed batches (peft's
`adapter_names`), so a shuffled stream of directions needs no regrouping; generation stops at the
end of the first line that holds text (a leading line break does not stop it: as ALMA's output
cleaning does, the hypothesis is the first non-empty line, and such outputs are counted).
Delta modules (merge forms `dense`/`sparse`) are added to the base weights for the batches that
use them, and the saved original weights are put back afterwards (exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datm.data import PromptFormat
from datm.errors import DatmError
from datm.languages import Direction
from datm.log import is_main_process
from datm.merge.forms import DELTA, LORA
from datm.plan import BASE


class TranslateError(DatmError):
    """A request or run directory that cannot be translated as asked."""


@dataclass(frozen=True)
class Request:
    direction: Direction
    text: str


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Ids of every token whose text contains a line break (generation stops at any of them)."""
    ids = []
    for token, i in tokenizer.get_vocab().items():
        if "\n" in token or "Ċ" in token or token == "<0x0A>":
            if "\n" in tokenizer.decode([i]):
                ids.append(i)
    return sorted(ids)


# datm's one stop rule, in words (for /health, routes.json, model cards); LineStop applies it.
STOP_RULE = (
    "EOS or the end of the first line that holds text (a line break before any text does not stop "
    "generation; the translation is the first non-empty line, stripped)"
)


def decoding(beams: int, max_new_tokens: int) -> dict[str, Any]:
    """How translations are decoded, as every engine and export states it."""
    search = "greedy" if beams == 1 else "beam"
    return {"search": search, "beams": beams, "max_new_tokens": max_new_tokens, "stop": STOP_RULE}


def first_nonempty_line(text: str) -> str:
    """The first line of `text` that holds more than whitespace, stripped ('' if none), with a space
    for any other line-break character inside it (datm's one line discipline, `datm.data.write_text`):
    the translation a server returns is the very text a run scores and `datm translate` writes."""
    from datm.data import LINE_BREAKS

    line = next((line for line in text.split("\n") if line.strip()), "")
    return line.translate(str.maketrans(dict.fromkeys(LINE_BREAKS, " "))).strip()


class LineStop:
    """The stop rule of every engine (STOP_RULE) on generated token ids: generation ends with the first
    token that holds a line break after text; the hypothesis is then the first non-empty line."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.newline_ids = frozenset(newline_token_ids(tokenizer))

    def text(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def ends(self, ids: Sequence[int]) -> bool:
        """Whether the newest of `ids` ends generation: it holds a line break and text came before it."""
        return bool(ids) and ids[-1] in self.newline_ids and "\n" in self.text(ids).lstrip()

    def cut(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """`ids` up to where the rule ends generation, and whether it does (else all of them, False)."""
        for n in range(1, len(ids) + 1):
            if self.ends(ids[:n]):
                return list(ids[:n]), True
        return list(ids), False

    def hypothesis(self, ids: Sequence[int]) -> str:
        return first_nonempty_line(self.text(ids))


class StopAtLineEnd:
    """transformers' per-row stopping criterion for LineStop; works for greedy and beam search
    (transformers asks it per beam)."""

    def __init__(self, stop: LineStop, prompt_width: int) -> None:
        self.stop = stop
        self.prompt_width = prompt_width
        self.newline_ids = torch.tensor(sorted(stop.newline_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.isin(input_ids[:, -1], self.newline_ids.to(input_ids.device))
        for row in done.nonzero().flatten().tolist():
            done[row] = self.stop.ends(input_ids[row, self.prompt_width :].tolist())
        return done


def _contiguous_lm_head_input(model: Any) -> None:
    """generate() feeds the LM head a strided slice (the last position); torch's linear then
    takes a slow path that expands the 262k-row weight per sequence (measured 0.9 s instead of
    0.16 s per batch in fp32, 34 s instead of 0.06 s in bf16). A contiguous copy avoids it."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_datm_contiguous", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        head._datm_contiguous = True


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware runs it fast (a decode step: 180 ms vs 320 ms in fp32 here)."""
    from datm.device import pick_precision

    return torch.bfloat16 if pick_precision(precision, device) == "bf16" else torch.float32


def module_kind(path: Path) -> str:
    """How the module at `path` is applied: 'lora' (through peft) or 'delta' (see datm.merge.forms)."""
    from datm.merge.forms import applied_as

    return applied_as(path)


class Translator:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        modules: dict[str, Path],
        prompt_style: str = "alma",
    ) -> None:
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.format = PromptFormat(tokenizer, prompt_style)
        self.kinds = {name: module_kind(Path(p)) for name, p in modules.items()}
        self.deltas = {n: Path(p) for n, p in modules.items() if self.kinds[n] == DELTA}
        loras = [(n, Path(p)) for n, p in modules.items() if self.kinds[n] == LORA]
        # torch module names can't contain '.', which plan names (e.g. 'en-xx.germanic') may
        self.peft_name = {n: n.replace(".", "__") for n, _ in loras}
        self.peft_name[BASE] = BASE
        _contiguous_lm_head_input(model)
        self.model = model
        if loras:
            first, path = loras[0]
            self.model = PeftModel.from_pretrained(model, str(path), adapter_name=self.peft_name[first])
            for name, p in loras[1:]:
                self.model.load_adapter(str(p), adapter_name=self.peft_name[name])
        self.model.eval()
        self.stop = LineStop(tokenizer)
        self.leading_line_breaks = 0  # outputs so far whose first line was empty (all calls)
        self.last_info: dict[str, Any] = {}

    def translate(
        self,
        requests: Sequence[Request],
        routes: dict[str, str],
        beams: int = 1,
        max_new_tokens: int = 128,
        batch_size: int = 8,
        progress: bool = True,
    ) -> list[str]:
        """Translations in input order. `routes` maps 'src-tgt' to a module name (or BASE).

        What happened is left in `last_info`: per delta module served, the relative error of its ΔW
        as applied in the serving dtype (see `datm.merge.AppliedDelta`), and how many outputs began
        with a line break (their hypothesis is their first non-empty line).
        """
        from tqdm.auto import tqdm

        from datm.merge import apply_delta

        for r in requests:
            if str(r.direction) not in routes:
                raise TranslateError(
                    f"no module serves direction {r.direction}; the plan routes {sorted(routes)}"
                )
        prompts = [self.format.prompt_ids(r.direction.src, r.direction.tgt, r.text) for r in requests]
        module = [routes[str(r.direction)] for r in requests]
        # Delta modules change the weights themselves, so their requests are served one module at a
        # time; LoRA and base requests share mixed batches. Within a pass, similar lengths batch together.
        passes: dict[str | None, list[int]] = {}
        for i, m in enumerate(module):
            passes.setdefault(m if m in self.deltas else None, []).append(i)
        out: list[str] = [""] * len(requests)
        info: dict[str, Any] = {"segments": len(requests), "leading_line_breaks": 0, "delta_modules": {}}
        show = progress and is_main_process()  # one bar, not one per process of a launcher
        bar = tqdm(total=len(requests), desc="translate", unit="seg", disable=not show)
        for delta, idxs in passes.items():
            applied = apply_delta(self.model, self.deltas[delta]) if delta is not None else None
            try:
                idxs = sorted(idxs, key=lambda i: len(prompts[i]))
                for start in range(0, len(idxs), batch_size):
                    chunk = idxs[start : start + batch_size]
                    names = [BASE if delta else self.peft_name[module[i]] for i in chunk]
                    texts = self._generate([prompts[i] for i in chunk], names, beams, max_new_tokens)
                    for i, t in zip(chunk, texts, strict=True):
                        if not t.split("\n", 1)[0].strip():
                            info["leading_line_breaks"] += 1
                        out[i] = first_nonempty_line(t)
                    bar.update(len(chunk))
            finally:
                if applied is not None:
                    applied.restore()
            if applied is not None:
                info["delta_modules"][delta] = {
                    "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
                    "applied_rel_error": applied.rel_error,
                }
        bar.close()
        self.leading_line_breaks += info["leading_line_breaks"]
        self.last_info = info
        return out

    @torch.no_grad()
    def _generate(
        self, prompts: list[list[int]], adapter_names: list[str], beams: int, max_new_tokens: int
    ) -> list[str]:
        """The raw generated text of each prompt (up to and including the line break that stopped it)."""
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=beams,
            eos_token_id=tok.eos_token_id,
            stopping_criteria=StoppingCriteriaList([StopAtLineEnd(self.stop, width)]),
            pad_token_id=pad,
        )
        if isinstance(self.model, PeftModel):
            # Always name the adapter of every row: without adapter_names peft applies its *active*
            # adapter to all rows, so base rows (and delta passes, all base) would get a LoRA on top.
            kwargs["adapter_names"] = adapter_names
        gen = self.model.generate(**kwargs)
        return tok.batch_decode(gen[:, width:], skip_special_tokens=True)


def read_requests(lines: Sequence[str], pair: str | None) -> list[Request]:
    out = []
    fixed = Direction.parse(pair) if pair else None
    for n, line in enumerate(lines, 1):
        if fixed is not None:
            out.append(Request(fixed, line))
            continue
        head, sep, text = line.partition("\t")
        if not sep:
            raise TranslateError(f"input line {n}: expected 'SRC-TGT<TAB>text' (or pass --pair SRC-TGT)")
        try:
            out.append(Request(Direction.parse(head), text))
        except ValueError as e:
            raise TranslateError(f"input line {n}: {e}") from None
    return out
