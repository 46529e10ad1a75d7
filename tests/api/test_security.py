"""Access control: the key guards everything but /health, is checked before the body is
read, and an exposed listener without a key is warned about at start."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import openai
import pytest
from api_harness import make_config
from lifecycle_harness import CHAT, start_app
from test_limits import error_of

KEY = "sk-local-42"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
])
def test_the_key_guards_every_route_but_health(server_factory, method: str, path: str) -> None:
    served = server_factory(server={"api_key": KEY})
    body = CHAT if path.startswith("/v1/chat") else {"model": "fake-model", "prompt": "hi",
                                                       "max_tokens": 2}
    kwargs = {"json": body} if method == "POST" else {}
    denied = httpx.request(method, f"{served.url}{path}", timeout=10, **kwargs)
    error = error_of(denied, 401)
    assert error["code"] == "invalid_api_key" and denied.headers["www-authenticate"] == "Bearer"
    wrong = httpx.request(method, f"{served.url}{path}", timeout=10,
                          headers={"Authorization": f"Bearer {KEY}x"}, **kwargs)
    assert wrong.status_code == 401
    allowed = httpx.request(method, f"{served.url}{path}", timeout=10,
                            headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
    assert allowed.status_code == 200, allowed.text
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no key


def test_the_key_is_checked_before_the_body_is_read(server_factory) -> None:
    served = server_factory(server={"api_key": KEY})
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{")
        started = time.monotonic()
        reply = sock.recv(65536).decode()  # the body never comes: only a pre-body check answers
    assert reply.startswith("HTTP/1.1 401") and time.monotonic() - started < 2
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                          max_tokens=2).choices[0].message.content


@pytest.mark.parametrize(("host", "key", "warned"), [
    ("0.0.0.0", None, True), ("0.0.0.0", KEY, False), ("127.0.0.1", None, False),
    ("::1", None, False),
])
def test_an_exposed_listener_without_a_key_is_warned_about(caplog, host: str,
                                                            key: str | None,
                                                            warned: bool) -> None:
    with caplog.at_level(logging.WARNING, logger="sbon.server"):
        live = start_app(make_config(server={"host": host, "api_key": key}))
        live.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "sbon.server"]
    assert any("without an API key" in m for m in messages) == warned
    assert all(KEY not in str(vars(r)) for r in caplog.records)
