"""Tiny random causal LMs for tests and quick benchmark runs: a byte-level BPE tokenizer trained on
given texts and a small Llama or Gemma 3 with random (seeded) weights, saved as a model directory
that `datm.models` loads like any other."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# A minimal chat template, for `prompt: chat`.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Sizes of the default tiny model (any of them, and any other config key, can be overridden).
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,  # a wide LM head, so a LoRA can move the loss within a few steps
}
# Gemma 3's own defaults are sized for real models.
GEMMA3_CONFIG: dict[str, Any] = {"head_dim": 8, "sliding_window": 64}
ARCHS = ("llama", "gemma3")


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 400,
    prepend_bos: bool = True,
    chat_template: str | None = CHAT_TEMPLATE,
) -> Any:
    """A byte-level BPE tokenizer (transformers' fast tokenizer) trained on `texts`, with <pad>,
    <bos>, <eos> and <unk>; `prepend_bos` puts <bos> before every text as Llama/Gemma tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if prepend_bos:
        fast.add_bos_token = True
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))]
        )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_model_dir(
    path: str | Path,
    texts: Iterable[str] | None = None,
    tokenizer: Any = None,
    arch: str = "llama",
    seed: int = 0,
    **config: Any,
) -> Path:
    """A random `arch` causal LM (TINY_CONFIG sizes, overridden by `config`) and its tokenizer
    (`tokenizer`, or one trained on `texts` by build_tokenizer), saved in `path`. Weights are drawn
    after torch.manual_seed(seed)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if tokenizer is None:
        if texts is None:
            raise ValueError("give the texts to train a tokenizer on, or a tokenizer")
        tokenizer = build_tokenizer(texts)
    settings = {
        **TINY_CONFIG,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "gemma3":
        settings = {**GEMMA3_CONFIG, **settings}
    model_config = (Gemma3TextConfig if arch == "gemma3" else LlamaConfig)(**{**settings, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
