"""The HTTP API of `datm serve` (FastAPI), and running it under uvicorn.

    POST /v1/translate   {"source": "de", "target": "en", "text": "..."}   -> {"translation": "...", ...}
                         {"source": "de", "target": "en", "texts": [...]}  -> {"translations": [...], ...}
    GET  /v1/directions  every direction, the module serving it and the module's kind
    GET  /health         {"status": "ok", "engine": ..., "in_flight": n, ...}

Every bad request gets a 4xx JSON body {"error": {"type": ..., "message": ...}} naming the problem
(anything unexpected a JSON 500), and the server keeps serving. What one client may take is bounded
(`HttpSettings`): the body's size (checked on Content-Length before reading, and while reading) and
the time it takes to arrive; the JSON parse and the tokenizing run in a thread, off the event loop.
With an API key, every /v1/* request needs `Authorization: Bearer KEY`. On SIGTERM/SIGINT uvicorn
stops accepting connections, waits for the requests in flight (up to `drain_seconds`), and only then
is the engine closed.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request)
# at definition time, and fastapi is imported inside create_app (an optional dependency).
import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from datm.languages import Direction
from datm.log import get_logger
from datm.serve.engines import INSTALL_HINT, Engine, make_engine
from datm.serve.run import ServedRun, ServeError

log = get_logger(__name__)


API_KEY_ENV = "DATM_API_KEY"


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "message": self.message}}

    def response(self) -> Any:
        """The JSON answer; ASCII-escaped, so that a lone surrogate quoted from a request still encodes."""
        from starlette.responses import Response

        text = json.dumps(self.body(), ensure_ascii=True)
        return Response(text, self.status, self.headers, media_type="application/json")


@dataclass(frozen=True)
class HttpSettings:
    """What one client may take of the server, and who may ask (`datm serve`'s flags)."""

    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 10.0  # for the whole body to arrive
    max_connections: int = 256  # uvicorn's limit_concurrency: beyond it, new requests get a 503
    api_key: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "body_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise ServeError(f"{flag} must be positive, got {getattr(self, name)}")
        key = self.api_key
        if key is not None and not (key and key.isascii() and key.isprintable() and " " not in key):
            # (never quote the key in a message)
            raise ServeError(
                f"the API key (--api-key or {API_KEY_ENV}) must be printable ASCII without spaces"
            )


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    if api_key or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:  # a host name: it may resolve to any address
        pass
    raise ServeError(
        f"--host {host} accepts connections from other machines: give an API key (--api-key KEY, or "
        f"the {API_KEY_ENV} environment variable, which other users cannot read in the process list), "
        "or serve on 127.0.0.1"
    )


class KeyGuard:
    """ASGI middleware: every /v1/* request without `Authorization: Bearer KEY` gets a 401."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, _digest(f"Bearer {key}".encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(_digest(given), self.expected):  # constant time, any length
                e = ApiError(
                    401,
                    "unauthorized",
                    "this server needs 'Authorization: Bearer KEY' with its API key",
                    {"www-authenticate": "Bearer"},
                )
                await e.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


async def read_body(request: Any, http: HttpSettings) -> bytes:
    """The request body, refused (413) past `max_body_bytes` before or while reading it, and (408)
    when it has not all arrived within `body_timeout_s`."""
    from starlette.requests import ClientDisconnect

    limit = http.max_body_bytes
    too_large = ApiError(413, "body_too_large", f"the request body is over the limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), http.body_timeout_s)
    except asyncio.TimeoutError:
        message = f"the request body did not arrive within {http.body_timeout_s:g} s"
        raise ApiError(408, "body_timeout", message, {"connection": "close"}) from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away before sending its body") from None


@dataclass(frozen=True)
class TranslateCall:
    direction: Direction
    texts: list[str]
    prompts: list[list[int]]
    single: bool  # the request had "text" (answer "translation") rather than "texts"


def parse_translate(raw: bytes, run: ServedRun, engine: Engine) -> TranslateCall:
    """Validate a POST /v1/translate body; ApiError names the first problem found."""
    body = _json_object(raw)
    direction = _direction(body, run)
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
    prompts = [
        _prompt(t, "'text'" if single else f"texts[{i}]", direction, engine) for i, t in enumerate(texts)
    ]
    return TranslateCall(direction, texts, prompts, single)


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object with only the keys the endpoint knows."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "the request body nests too deeply to parse") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"source", "target", "text", "texts"})
    if unknown:
        raise ApiError(
            422, "invalid_request", f"unknown key(s) {unknown}; expected source, target and text or texts"
        )
    return body


def _direction(body: dict[str, Any], run: ServedRun) -> Direction:
    """The request's direction, which the run must serve."""
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
    return direction


def _prompt(t: Any, where: str, direction: Direction, engine: Engine) -> list[int]:
    """The prompt token ids of one text, which must be one non-empty segment that fits the context."""
    if not isinstance(t, str):
        raise ApiError(422, "not_a_string", f"{where} must be a string, got {type(t).__name__}")
    if not t.strip():
        raise ApiError(422, "empty_text", f"{where} is empty")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, sent as an escape such as \ud800
        raise ApiError(
            422, "invalid_unicode", f"{where} is not valid Unicode ({e.reason} at character {e.start})"
        ) from None
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
    return ids


def create_app(run: ServedRun, engine: Engine, http: HttpSettings) -> Any:
    """The FastAPI app over a started engine; the engine is closed when the app shuts down."""
    from fastapi import FastAPI

    state = {"in_flight": 0, "answered": 0}
    # One thread parses and tokenizes (a fast tokenizer is not safe to share between threads).
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datm-parse")

    @asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        yield
        # uvicorn has stopped accepting connections and waited for those in flight
        parser.shutdown(wait=False)
        await engine.close()

    app = FastAPI(title="datm", description="Translation with a datm run's modules", lifespan=lifespan)
    if http.api_key:
        app.add_middleware(KeyGuard, key=http.api_key)
    _add_error_handlers(app)
    _add_routes(app, run, engine, http, state, parser)
    return app


def _add_error_handlers(app: Any) -> None:
    """Every error is a JSON body {"error": {"type", "message"}}: ours, Starlette's, and the unexpected."""
    from fastapi import Request
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> Any:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, e: HTTPException) -> Any:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return ApiError(e.status_code, kind, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> Any:
        # Starlette logs the traceback after this answer
        message = f"internal error ({type(e).__name__}); the server's log has the details"
        return ApiError(500, "internal_error", message).response()


def _add_routes(
    app: Any, run: ServedRun, engine: Engine, http: HttpSettings, state: dict[str, int], parser: Any
) -> None:
    """/health, /v1/directions and /v1/translate (parsed and tokenized in `parser`, a thread)."""
    from fastapi import Request

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
        raw = await read_body(request, http)
        call = await asyncio.get_running_loop().run_in_executor(parser, parse_translate, raw, run, engine)
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


def main(args: Any) -> None:
    """`datm serve RUN ...`: settings default to the run's eval settings, as `datm translate`'s do."""
    from datm.serve.engines import ServeSettings

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    http = HttpSettings(args.max_body_bytes, args.body_timeout, args.max_connections, api_key)
    check_exposure(args.host, http.api_key)  # before reading the run, let alone loading a model
    run = ServedRun.load(args.run)
    ev, scored = run.eval, run.scored_decoding()
    settings = ServeSettings(
        max_new_tokens=args.max_new_tokens or scored["max_new_tokens"],
        beams=args.beams or scored["beams"],
        max_texts=args.max_texts,
        batch_size=args.batch_size or ev.batch_size,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        kv_cache_gib=args.kv_cache_gib,
    )
    engine = make_engine(args.engine, run, settings)  # refuses what it cannot serve, before loading
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ServeError(f"datm serve needs FastAPI and uvicorn ({e}): {INSTALL_HINT}") from None
    asyncio.run(_serve(run, engine, http, args.host, args.port, args.drain_seconds, args.log_level))


async def _serve(
    run: ServedRun,
    engine: Engine,
    http: HttpSettings,
    host: str,
    port: int,
    drain_seconds: float,
    log_level: str,
) -> None:
    import uvicorn

    await engine.start()
    app = create_app(run, engine, http)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_seconds,
        limit_concurrency=http.max_connections,
        lifespan="on",
    )
    decoding = engine.decoding()
    log.info(
        f"datm serve: {run.run_dir} on http://{host}:{port} ({engine.name} engine, "
        f"{len(run.routes)} directions, {len(run.modules)} modules, {decoding['search']} decoding"
        f"{', API key required' if http.api_key else ''})"
    )
    if not decoding["as_scored"]:
        log.warning(f"serving {decoding}, not the decoding the run's translations were scored with")
    try:
        await uvicorn.Server(config).serve()
    finally:  # e.g. the port was taken; after a drain the app's shutdown has closed it already
        await engine.close()
