"""`rlxf serve` under load and hostile clients, on loopback only: the listen backlog, many concurrent clients, the
body-size limit (413), a bad Content-Length (400), the cap on prompts per request (400) and the read time-out (a
stalled client is dropped and blocks nobody). Raw sockets where a client must misbehave."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from rlxf.backends.serve import OpenAIHandler, OpenAIServer, ServeConfig, ServeEngine, start_server

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return ServeEngine.load(tiny_model_dir, name="tiny", device="cpu")


@pytest.fixture
def serve(engine):
    """start(**limits) -> (server, port) of a server over the shared engine; all stopped at the end."""
    servers = []

    def start(**limits):
        srv, _, _ = start_server(engine=engine, host=HOST, limits=limits)
        servers.append(srv)
        return srv, srv.server_address[1]

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def call(port: int, path: str, body: dict | None = None, timeout: float = 15.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{HOST}:{port}/v1/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def read_reply(sock: socket.socket) -> tuple[int, dict | None]:
    """(status, JSON body) of the reply on `sock`, read until the server closes; status 0 when it sent nothing."""
    buf = b""
    while chunk := sock.recv(65536):
        buf += chunk
    if not buf:
        return 0, None
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else None


def raw_post(port: int, headers: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict | None]:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n{headers}\r\n".encode()
            + body
        )
        return read_reply(sock)


def assert_openai_error(status: int, out: dict | None, want: int, text: str) -> None:
    assert status == want, (status, out)
    assert out["error"]["code"] == want and text in out["error"]["message"], out
    assert {"message", "type", "param", "code"} <= set(out["error"])


COMPLETION = {"model": "tiny", "prompt": "red cat", "max_tokens": 1, "temperature": 0}


def test_defaults():
    cfg = ServeConfig()
    assert (cfg.max_body_bytes, cfg.read_timeout, cfg.max_prompts, cfg.backlog) == (8 << 20, 30.0, 64, 128)


# --- load ------------------------------------------------------------------------------------------------------------


def test_64_clients_connecting_at_once_are_queued_not_dropped(engine):
    """The kernel queues `backlog` connections while the server is busy; with a backlog of 5 the 7th SYN is dropped
    (the client waits a second per retry, or gives up)."""
    srv = OpenAIServer((HOST, 0), OpenAIHandler, engine)  # listening, not accepting yet
    socks: list[socket.socket] = []
    serving = threading.Thread(target=srv.serve_forever, daemon=True)
    try:
        for _ in range(64):
            socks.append(socket.create_connection(srv.server_address, timeout=0.5))  # raises if the SYN is dropped
        serving.start()
        for sock in socks:
            sock.settimeout(15)
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert all(read_reply(sock)[0] == 200 for sock in socks)
    finally:
        for sock in socks:
            sock.close()
        if serving.is_alive():
            srv.shutdown()
        srv.server_close()


def test_32_concurrent_clients_are_all_answered(serve):
    _, port = serve()
    n, start = 32, threading.Barrier(32)
    results: list[tuple[int, str]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        start.wait()
        for path, body in (("models", None), ("completions", COMPLETION)):
            try:
                status, _ = call(port, path, body)
                with lock:
                    results.append((status, path))
            except OSError as e:  # a reset or a time-out
                with lock:
                    errors.append(f"{path}: {e!r}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads) and time.monotonic() - t0 < 20
    assert errors == [] and sorted(results) == sorted([(200, "models"), (200, "completions")] * n)


# --- body size and Content-Length ------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_with_413_unread(serve):
    _, port = serve(max_body_bytes=1024)
    # only the headers are sent: the server answers without waiting for (or allocating) the body
    status, out = raw_post(port, "Content-Length: 2048\r\n")
    assert_openai_error(status, out, 413, "larger than this server's limit of 1024 bytes")
    status, out = raw_post(port, "Content-Length: 1000000000000\r\n")
    assert_openai_error(status, out, 413, "1000000000000 bytes")
    # within the limit: served
    body = json.dumps(COMPLETION).encode()
    status, out = raw_post(port, f"Content-Length: {len(body)}\r\n", body)
    assert status == 200 and out["object"] == "text_completion"


@pytest.mark.parametrize("value", ["1e12", "abc", "-1", "12 34", ""])
def test_a_bad_content_length_is_a_400(serve, value):
    _, port = serve()
    status, out = raw_post(port, f"Content-Length: {value}\r\n", b"{}")
    assert_openai_error(status, out, 400, "Content-Length must be a non-negative integer")


# --- prompts per request ---------------------------------------------------------------------------------------------


def test_too_many_prompts_in_one_request_is_a_400(serve):
    _, port = serve(max_prompts=4)
    status, out = call(port, "completions", {**COMPLETION, "prompt": ["red"] * 5})
    assert_openai_error(status, out, 400, "at most 4 prompts per request, got 5")
    assert out["error"]["param"] == "prompt"
    status, out = call(port, "completions", {**COMPLETION, "prompt": ["red"] * 4})
    assert status == 200 and len(out["choices"]) == 4


# --- stalled clients -------------------------------------------------------------------------------------------------


def test_a_stalled_client_is_dropped_and_blocks_nobody(serve):
    _, port = serve(read_timeout=1.0)
    half_headers = socket.create_connection((HOST, port), timeout=10)
    half_body = socket.create_connection((HOST, port), timeout=10)
    try:
        half_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 99 short
        t0 = time.monotonic()
        for _ in range(3):  # others are served meanwhile
            assert call(port, "completions", COMPLETION)[0] == 200
        assert call(port, "models")[0] == 200
        # after the read time-out: the stalled body gets a 408, the stalled headers a closed connection
        status, out = read_reply(half_body)
        assert_openai_error(status, out, 408, "no data for 1s")
        assert read_reply(half_headers) == (0, None)
        assert time.monotonic() - t0 < 8
    finally:
        half_headers.close()
        half_body.close()


def test_cli_refuses_bad_limits_in_one_line(capsys):
    from rlxf.cli import main

    assert main(["serve", "--model", "unused", "--max_prompts", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rlxf: error: serve needs") and "--max_prompts >= 1" in err[-1]
