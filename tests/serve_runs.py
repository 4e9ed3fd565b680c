"""Tiny run directories for the serving and export tests (and the serving benchmark's smoke size).

A run is made the way `datm run` makes it (plan.json, config.json, merges, translations,
scores.json), except that its adapters are random LoRAs with large weights, so every module's
greedy output differs visibly from the others' and a routing mistake cannot hide.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from datm import artifacts, auto, models

LANGS = ["de", "cs", "ru"]
GROUPS = {"germanic": ["de"], "slavic": ["cs", "ru"]}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def build_vllm_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Llama that vLLM's CPU attention accepts: head size 32 (it supports 32..512; the
    conftest models use 8). Same tokenizer as the conftest models."""
    from conftest import corpus_texts

    from datm.tiny import build_model_dir

    sizes = {"hidden_size": 64, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
    return build_model_dir(path, corpus_texts(), seed=seed, **sizes)


def leading_line_breaks(model_dir: Path, push: float = 1500.0) -> Path:
    """Make some greedy outputs begin with a line break, as a LoRA trained on targets written as
    "\\n<text>" does (the demo run has a few per direction): the embedding of ':', every ALMA prompt's
    last token, is pushed towards the LM head's row for '\\n'. With the random LoRAs of `make_run`,
    most test requests then start with a line break and go on with text."""
    from safetensors.torch import load_file, save_file

    tok = models.load_tokenizer(str(model_dir))
    (colon,) = tok(":", add_special_tokens=False)["input_ids"]
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
    file = model_dir / "model.safetensors"
    weights = load_file(file)
    emb, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    emb[colon] += push * emb[colon].norm() * head[newline] / head[newline].norm()
    save_file(weights, file, metadata={"format": "pt"})
    return model_dir


def random_lora(model_dir: Path, out: Path, seed: int, r: int = 4, b_std: float = 1.0) -> Path:
    """A LoRA with random A and B ~ N(0, b_std): large by default (its outputs differ visibly)."""
    from peft import LoraConfig, get_peft_model

    base = models.load_model(str(model_dir))
    torch.manual_seed(seed)
    pm = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, b_std)
    pm.save_pretrained(out)
    artifacts.mark_done(out, {"kind": "adapter", "note": "random weights for a test"})
    return out


def run_config(
    root: Path,
    model_dir: Path,
    strategy: str = "datm",
    form: str = "lowrank",
    beams: int = 1,
    engine: str = "transformers",
) -> Any:
    from conftest import write_alma

    from datm import config

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        write_alma(data / f"train.{lang}-en.jsonl", lang, 12)
        write_alma(data / f"test.{lang}-en.jsonl", lang, 4)
    raw = {
        "base_model": str(model_dir),
        "languages": LANGS,
        "groups": GROUPS,
        "data": {"train": str(data / "train.{xx}-en.jsonl"), "test": str(data / "test.{xx}-en.jsonl")},
        "strategy": strategy,
        "lora": {"r": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 4, "lr": 0.002, "seed": 1, "checkpoint_every": 0},
        "merge": {"method": "ties", "density": 0.5, "form": form},
        "eval": {
            "max_examples": 4,
            "beams": beams,
            "max_new_tokens": 8,
            "batch_size": 4,
            "precision": "fp32",
            "engine": engine,
        },
        "output_dir": str(root / f"run-{strategy}-{form}-{engine}"),
    }
    return config.from_dict(raw, source="test", base_dir=root)


def make_run(
    root: Path,
    model_dir: Path,
    strategy: str = "datm",
    form: str = "lowrank",
    random_adapters: bool = True,
    beams: int = 1,
    engine: str = "transformers",
) -> Path:
    """A finished run directory; its adapters random (distinguishable) or trained for 3 steps."""
    from datm.run import runner

    cfg = run_config(root, model_dir, strategy, form, beams, engine)
    out = Path(cfg.output_dir)
    if random_adapters:
        for seed, spec in enumerate(auto.build_plan(cfg).adapters):
            random_lora(model_dir, artifacts.RunDir(out).adapter(spec.name), seed)
    runner.run(cfg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`datm serve` in a subprocess on 127.0.0.1 (a real CLI process, real signals)."""

    def __init__(self, run: Path, engine: str, log: Path, *extra: str, timeout: float = 180) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "datm.cli", "serve", str(run), "--engine", engine]
        self._launch(cmd + ["--host", "127.0.0.1", "--port", str(self.port), *extra], log, timeout)

    def _launch(self, cmd: list[str], log: Path, timeout: float) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # this python
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"datm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"datm serve was not ready within {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")[-n:]

    def terminate(self) -> None:
        """SIGTERM: uvicorn stops accepting, drains the requests in flight, then closes the engine."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log_file.close()


class ExportedVllmServer(Server):
    """An export's serve_vllm.sh in a subprocess on 127.0.0.1: vLLM's OpenAI-compatible server."""

    def __init__(self, export: Path, log: Path, timeout: float = 300) -> None:
        self.port = free_port()
        cmd = ["sh", str(export / "serve_vllm.sh"), "--host", "127.0.0.1", "--port", str(self.port)]
        self._launch(cmd, log, timeout)


def datm_translate(run: Path, lines: list[str], tmp: Path, *extra: str) -> list[str]:
    """`datm translate --run RUN` on 'SRC-TGT<TAB>text' lines, in this process."""
    from datm.cli import main

    src, out = tmp / "translate.in", tmp / "translate.out"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert main(["translate", "--run", str(run), "--input", str(src), "--output", str(out), *extra]) == 0
    return out.read_text(encoding="utf-8").splitlines()


def post(url: str, body: Any, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    import httpx

    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    r = httpx.post(url + "/v1/translate", content=content, timeout=timeout)
    return r.status_code, r.json()
