"""`datm serve`'s HTTP layer under hostile input: body limits, slow clients, odd JSON, the API key.

Real server processes (the transformers engine: it starts in seconds) on 127.0.0.1, spoken to with
httpx and with raw sockets that send half a request. Time bounds are relative or generous: the
machine is shared.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest
from serve_runs import Server, build_vllm_model_dir, make_run

from datm.cli import main

if not os.environ.get("DATM_REQUIRE_SERVE"):
    for _name in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(_name)

OK = {"source": "de", "target": "en", "text": "die katze sieht einen hund 0"}
BODY_TIMEOUT = 3  # seconds, the servers' --body-timeout here
MAX_CONNECTIONS = 24
KEY = "k3y-that-must-never-be-logged"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-http")
    return make_run(root, build_vllm_model_dir(root / "model"))


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    limits = ["--max-body-bytes", str(8 << 20), "--body-timeout", str(BODY_TIMEOUT)]
    limits += ["--max-connections", str(MAX_CONNECTIONS), "--drain-seconds", "120"]
    srv = Server(run_dir, "transformers", tmp_path_factory.mktemp("log") / "serve.log", *limits)
    yield srv
    srv.stop()


def post(url: str, content: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    import httpx

    r = httpx.post(url + "/v1/translate", content=content, headers=headers, timeout=60)
    return r.status_code, r.json()  # every answer is JSON, errors included


def half_request(port: int, declared: int | None, body: bytes, path: str = "/v1/translate") -> socket.socket:
    """A POST whose headers are complete and whose body is not (declared: Content-Length, or None for
    a chunked body; `body` is what is sent of it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    length = b"Transfer-Encoding: chunked" if declared is None else b"Content-Length: %d" % declared
    s.sendall(
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n%s\r\n\r\n"
        % (path.encode(), length)
    )
    if body:
        s.sendall(body)
    return s


def answer(s: socket.socket, timeout: float = 60) -> tuple[int, bytes]:
    """The status and body of the response on a raw socket (the server may keep it open)."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h.split(b":")[1] for h in head.lower().split(b"\r\n") if h.startswith(b"content-length"))
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed in the middle of the answer: {data!r}"
        body += chunk
    return int(head.split()[1]), body


def closed_by_server(s: socket.socket, timeout: float = 30) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        s.close()


def error_type(body: bytes) -> str:
    return json.loads(body)["error"]["type"]


# --- item 8: one large request must not freeze the server ----------------------------------------


def test_a_declared_oversized_body_gets_a_413_before_it_is_sent(server):
    started = time.monotonic()
    s = half_request(server.port, 64 << 20, b'{"source": "de", "target": "en", "text": "' + b"a" * 60000)
    status, body = answer(s)
    s.close()
    assert (status, error_type(body)) == (413, "body_too_large"), body
    assert str(8 << 20).encode() in body
    assert time.monotonic() - started < 10 * BODY_TIMEOUT  # at once: neither a body timeout nor 64 MiB


def test_an_undeclared_oversized_body_is_refused_once_past_the_limit(server):
    """Chunked, with no Content-Length: read in pieces, refused once past the limit (8 MiB)."""
    import select

    s = half_request(server.port, None, b"")
    piece = b"%x\r\n%s\r\n" % (1 << 18, b"a" * (1 << 18))
    sent = 0
    while sent < 64 << 20 and not select.select([s], [], [], 0)[0]:  # until it answers
        s.sendall(piece)
        sent += 1 << 18
    status, body = answer(s)
    s.close()
    assert (status, error_type(body)) == (413, "body_too_large"), body
    assert sent < 32 << 20


def test_parsing_and_tokenizing_run_off_the_event_loop(server):
    """A 3.6 MB text takes seconds to tokenize (then 413 text_too_long); /health answers meanwhile."""
    import httpx

    big = json.dumps({"source": "de", "target": "en", "text": "katze sieht " * 300_000})
    result: dict[str, float | tuple[int, dict]] = {}

    def send() -> None:
        t0 = time.monotonic()
        result["answer"] = post(server.url, big)
        result["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=send)
    th.start()
    latencies = []
    while th.is_alive() and len(latencies) < 10_000:
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=60).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.02)
    th.join(120)
    status, body = result["answer"]
    assert (status, body["error"]["type"]) == (413, "text_too_long"), body
    assert len(latencies) >= 3, (latencies, result["seconds"])
    assert max(latencies) < result["seconds"] / 2, (max(latencies), result["seconds"])


# --- item 9: JSON errors, never a plain-text 500 ---------------------------------------------------

ODD = [
    (b'{"source": "de", "target": "en", "text": "ein \\ud800 hund"}', 422, "invalid_unicode"),
    (b'{"source": "de", "target": "en", "texts": ["gut", "\\udfff"]}', 422, "invalid_unicode"),
    (b'{"source": "\\ud800", "target": "en", "text": "hund"}', 422, "unknown_direction"),
    (b"[" * 200_000 + b"]" * 200_000, 400, "malformed_json"),
    (
        b'{"source": "de", "target": "en", "text": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001,
        400,
        "malformed_json",
    ),
]


@pytest.mark.parametrize(("body", "status", "kind"), ODD, ids=[f"{k}{i}" for i, (_, _, k) in enumerate(ODD)])
def test_odd_json_gets_a_json_4xx_and_the_server_keeps_serving(server, body, status, kind):
    got, err = post(server.url, body)
    assert (got, err["error"]["type"]) == (status, kind), err
    assert err["error"]["message"]
    ok, translated = post(server.url, json.dumps(OK))
    assert ok == 200 and translated["translation"]


def test_an_unexpected_exception_is_a_json_500(run_dir):
    """Whatever fails inside the app (here the tokenizer) answers JSON, and the app keeps serving."""
    from starlette.testclient import TestClient

    from datm.serve.app import HttpSettings, create_app
    from datm.serve.engines import ServeSettings
    from datm.serve.run import ServedRun

    class Format:
        def prompt_ids(self, src: str, tgt: str, text: str) -> list[int]:
            if text == "boom":
                raise RuntimeError("tokenizer state is broken")
            return [1, 2, 3]

    class Engine:
        name, settings, format, context = "stub", ServeSettings(), Format(), 512

        def stats(self) -> dict:
            return {}

        async def translate(self, direction, texts, prompts) -> list[str]:
            return [t.upper() for t in texts]

        async def close(self) -> None:
            pass

    app = create_app(ServedRun.load(run_dir), Engine(), HttpSettings())
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/translate", json={**OK, "text": "boom"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
        assert "RuntimeError" in r.json()["error"]["message"]
        assert client.post("/v1/translate", json={**OK, "text": "hund"}).json()["translation"] == "HUND"


# --- item 10: slow clients hold neither a worker nor the shutdown ---------------------------------


def test_half_sent_bodies_time_out_with_408(server):
    started = time.monotonic()
    slow = [half_request(server.port, 100, b'{"source": ') for _ in range(50)]
    answers = [answer(s) for s in slow]
    # those the server took in time out; those over --max-connections were refused at once
    assert {status for status, _ in answers} == {408, 503}
    assert all(error_type(body) == "body_timeout" for status, body in answers if status == 408)
    assert all(closed_by_server(s) for s in slow)
    assert time.monotonic() - started < 20 * BODY_TIMEOUT  # generous: they end, they do not stay open
    status, translated = post(server.url, json.dumps(OK))
    assert status == 200 and translated["translation"]


def test_connections_are_bounded(server):
    import httpx

    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.5)  # the server has accepted them
    try:
        assert httpx.get(server.url + "/health", timeout=60).status_code == 503  # at once, not queued
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=60).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    status, translated = post(server.url, json.dumps(OK))
    assert status == 200 and translated["translation"]


# --- issue 25: serve safely (API key, loopback by default) -----------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.7", "example.org"])
def test_non_loopback_host_without_a_key_is_refused_before_loading(tmp_path, capsys, monkeypatch, host):
    monkeypatch.delenv("DATM_API_KEY", raising=False)
    missing = tmp_path / "no-such-run"  # refused before the run (let alone a model) is read
    assert main(["serve", str(missing), "--engine", "transformers", "--host", host]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "DATM_API_KEY" in err and str(missing) not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_host_or_a_key_passes_the_exposure_check(tmp_path, capsys, monkeypatch, host):
    monkeypatch.delenv("DATM_API_KEY", raising=False)
    missing = tmp_path / "no-such-run"
    assert main(["serve", str(missing), "--engine", "transformers", "--host", host]) == 2
    assert "--api-key" not in capsys.readouterr().err  # it got as far as reading the run
    monkeypatch.setenv("DATM_API_KEY", KEY)
    assert main(["serve", str(missing), "--engine", "transformers", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" not in err and KEY not in err


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--max-body-bytes", "0"], "--max-body-bytes must be positive"),
        (["--body-timeout", "-1"], "--body-timeout must be positive"),
        (["--max-connections", "0"], "--max-connections must be positive"),
        (["--api-key", "two words"], "must be printable ASCII without spaces"),
        (["--api-key", ""], "must be printable ASCII without spaces"),
    ],
)
def test_bad_serve_flags_are_refused_before_loading(tmp_path, capsys, flags, says):
    assert main(["serve", str(tmp_path / "no-such-run"), "--engine", "transformers", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "two words" not in err


@pytest.fixture(scope="module")
def keyed_server(run_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "keyed.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATM_API_KEY", KEY)
        srv = Server(run_dir, "transformers", log, "--max-body-bytes", "65536")
    yield srv
    srv.stop()


def test_api_key_guards_every_v1_path_and_not_health(keyed_server):
    import httpx

    url = keyed_server.url
    good = {"Authorization": f"Bearer {KEY}"}
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Bearer {KEY}x"},
    ):
        status, err = post(url, json.dumps(OK), headers)
        assert (status, err["error"]["type"]) == (401, "unauthorized"), err
        assert KEY not in json.dumps(err)
        r = httpx.get(url + "/v1/directions", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/v1/nothing", headers=headers).status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/v1/directions", headers=good).status_code == 200
    status, translated = post(url, json.dumps(OK), good)
    assert status == 200 and translated["translation"]
    # over the limits, an authorised request still gets its 4xx
    status, err = post(url, json.dumps({**OK, "text": "katze " * 20_000}), good)
    assert (status, err["error"]["type"]) == (413, "body_too_large"), err
    status, err = post(url, b"[" * 1000, good)
    assert (status, err["error"]["type"]) == (400, "malformed_json"), err


def test_api_key_never_reaches_the_log(keyed_server):
    """Last for this server: it stops it, so that everything it logged is in the file."""
    post(keyed_server.url, b"{", {"Authorization": f"Bearer {KEY}"})
    post(keyed_server.url, json.dumps(OK), {"Authorization": f"Bearer {KEY[:-1]}"})
    keyed_server.stop()
    log = keyed_server.log.read_text(errors="replace")
    assert "POST /v1/translate" in log  # the access log was captured
    assert KEY not in log and KEY[:-1] not in log


def test_shutdown_does_not_wait_for_half_sent_bodies(server):
    """Last in this file: it stops the module's server (--drain-seconds 120)."""
    slow = [half_request(server.port, 1000, b'{"source": "de"') for _ in range(MAX_CONNECTIONS // 2)]
    time.sleep(0.5)
    stopped = time.monotonic()
    server.terminate()
    assert server.stop(timeout=100) in (0, -15)
    assert time.monotonic() - stopped < 60  # half of the drain time; it takes about one body timeout
    assert {answer(s)[0] for s in slow} == {408}
