"""Serving what a run produced: `datm serve` (HTTP API over vLLM or datm's Translator) and
`datm export` (PEFT modules with model cards, routes.json, a vLLM server command line, folded models).

- `run`: a run directory as served: its routes and what each routed module is (`ServedRun`);
- `engines`: the registered engines (`vllm`: one vLLM engine, every LoRA module registered once,
  continuous batching across directions; `transformers`: the Translator behind a micro-batching queue);
- `app`: the FastAPI application (request validation, JSON errors, in-flight accounting);
- `export`: `datm export RUN --to DIR [--fold]`.

FastAPI, uvicorn and vLLM are the optional extra `datm[serve]`; nothing here imports them at module level.
"""
