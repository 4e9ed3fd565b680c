"""The HTTP API of `datm serve` (FastAPI), and running it under uvicorn.

    POST /v1/translate   {"source": "de", "target": "en", "text": "..."}   -> {"translation": "...", ...}
                         {"source": "de", "target": "en", "texts": [...]}  -> {"translations": [...], ...}
    GET  /v1/directions  every direction, the module serving it and the module's kind
    GET  /health         {"status": "ok", "engine": ..., "in_flight": n, ...}

Every bad request gets a 4xx JSON body {"error": {"type": ..., "message": ...}} naming the problem,
and the server keeps serving. On SIGTERM/SIGINT uvicorn stops accepting connections, waits for the
requests in flight (up to `drain_seconds`), and only then is the engine closed.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request)
# at definition time, and fastapi is imported inside create_app (an optional dependency).
import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from datm.languages import Direction
from datm.log import get_logger
from datm.serve.engines import INSTALL_HINT, Engine, make_engine
from datm.serve.run import ServedRun, ServeError

log = get_logger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": self.message}}


@dataclass(frozen=True)
class TranslateCall:
    direction: Direction
    texts: list[str]
    prompts: list[list[int]]
    single: bool  # the request had "text" (answer "translation") rather than "texts"


def parse_translate(raw: bytes, run: ServedRun, engine: Engine) -> TranslateCall:
    """Validate a POST /v1/translate body; ApiError names the first problem found."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"source", "target", "text", "texts"})
    if unknown:
        raise ApiError(
            422, "invalid_request", f"unknown key(s) {unknown}; expected source, target and text or texts"
        )
    for key in ("source", "target"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise ApiError(422, "invalid_request", f"'{key}' must be a language code such as 'de' or 'en'")
    name = f"{body['source']}-{body['target']}"
    try:
        direction = Direction.parse(name)
    except ValueError as e:
        raise ApiError(422, "unknown_direction", str(e)) from None
    if name not in run.routes:
        raise ApiError(
            422,
            "unserved_direction",
            f"no module serves {name} here; directions served: {sorted(run.routes)}",
        )
    if ("text" in body) == ("texts" in body):
        raise ApiError(422, "invalid_request", "give exactly one of 'text' (a string) or 'texts' (a list)")
    single = "text" in body
    texts = [body["text"]] if single else body["texts"]
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_request", f"'texts' must be a list, got {type(texts).__name__}")
    limit = engine.settings.max_texts
    if len(texts) > limit:
        raise ApiError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {limit}")
    if not texts:
        raise ApiError(422, "empty_text", "'texts' is empty")
    prompts = []
    for i, t in enumerate(texts):
        where = "'text'" if single else f"texts[{i}]"
        if not isinstance(t, str):
            raise ApiError(422, "not_a_string", f"{where} must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ApiError(422, "empty_text", f"{where} is empty")
        if "\n" in t or "\r" in t:
            raise ApiError(
                422, "line_break", f"{where} holds a line break; send one segment per text (split lines)"
            )
        ids = engine.format.prompt_ids(direction.src, direction.tgt, t)
        room = engine.context - engine.settings.max_new_tokens
        if len(ids) > room:
            raise ApiError(
                413,
                "text_too_long",
                f"{where} is {len(ids)} tokens as a prompt; with up to {engine.settings.max_new_tokens} new "
                f"tokens the model's context of {engine.context} tokens leaves room for {room}",
            )
        prompts.append(ids)
    return TranslateCall(direction, texts, prompts, single)


def create_app(run: ServedRun, engine: Engine) -> Any:
    """The FastAPI app over a started engine; the engine is closed when the app shuts down."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    state = {"in_flight": 0, "answered": 0}

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        # uvicorn has stopped accepting connections and waited for those in flight
        await engine.close()

    app = FastAPI(title="datm", description="Translation with a datm run's modules", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(ApiError(e.status_code, kind, str(e.detail)).body(), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        decoding = engine.decoding()
        return {"status": "ok", "engine": engine.name, **state, **engine.stats(), "decoding": decoding}

    @app.get("/v1/directions")
    async def directions() -> dict[str, Any]:
        return {
            "engine": engine.name,
            "prompt": run.prompt_style,
            "decoding": engine.decoding(),
            "directions": run.directions(),
        }

    @app.post("/v1/translate")
    async def translate(request: Request) -> Any:
        call = parse_translate(await request.body(), run, engine)
        module = run.module_for(call.direction)
        state["in_flight"] += 1
        try:
            outs = await engine.translate(call.direction, call.texts, call.prompts)
        except Exception as e:
            raise ApiError(500, "engine_error", f"{engine.name} failed on this request: {e}") from e
        finally:
            state["in_flight"] -= 1
        state["answered"] += 1
        served = {
            "direction": str(call.direction),
            "module": module.name if module else None,
            "kind": module.kind if module else "base",
        }
        if call.single:
            return {"translation": outs[0], **served}
        return {"translations": outs, **served}

    return app


def main(args: Any) -> None:
    """`datm serve RUN ...`: settings default to the run's eval settings, as `datm translate`'s do."""
    from datm.serve.engines import ServeSettings

    run = ServedRun.load(args.run)
    ev, scored = run.eval, run.scored_decoding()
    settings = ServeSettings(
        max_new_tokens=args.max_new_tokens or scored["max_new_tokens"],
        beams=args.beams or scored["beams"],
        max_texts=args.max_texts,
        batch_size=args.batch_size or ev.get("batch_size", 8),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        kv_cache_gib=args.kv_cache_gib,
    )
    engine = make_engine(args.engine, run, settings)  # refuses what it cannot serve, before loading
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeError(f"datm serve needs FastAPI and uvicorn ({e}): {INSTALL_HINT}") from None
    asyncio.run(_serve(run, engine, args.host, args.port, args.drain_seconds, args.log_level))


async def _serve(
    run: ServedRun, engine: Engine, host: str, port: int, drain_seconds: float, log_level: str
) -> None:
    import uvicorn

    await engine.start()
    app = create_app(run, engine)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_seconds,
        lifespan="on",
    )
    decoding = engine.decoding()
    log.info(
        f"datm serve: {run.run_dir} on http://{host}:{port} ({engine.name} engine, "
        f"{len(run.routes)} directions, {len(run.modules)} modules, {decoding['search']} decoding)"
    )
    if not decoding["as_scored"]:
        log.warning(f"serving {decoding}, not the decoding the run's translations were scored with")
    try:
        await uvicorn.Server(config).serve()
    finally:  # e.g. the port was taken; after a drain the app's shutdown has closed it already
        await engine.close()
