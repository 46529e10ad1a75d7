"""Property-based requests from the server's own OpenAPI document (schemathesis + hypothesis).

Every operation is fuzzed with requests that fit its schema and requests that do not, three
bodies in four as a client would send them (the served model, no unsupported fields, so that
generation runs, not only the 404 and 400 answers), against the real app on a real uvicorn
server over the fake engine. The properties: never a 5xx; every error in OpenAI's envelope;
every body and every stream frame strict JSON, a stream ending with [DONE]; 200 bodies
conform to the documented schema. Beside the schema's own cases: edge values of every
bounded field (integers at and past int32 and int64, stop strings equal to the block
delimiter, content parts past their limit, roles a strict template refuses, rewards that
cannot read a long response), and a stateful run that interleaves such requests with
streams whose clients leave, checking after every step that nothing is left in flight.
``SBON_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 60) and the
stateful steps scale with it; ``SBON_FUZZ_RANDOM=1`` draws new examples each run instead of
the fixed, reproducible ones.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from server.protocol import UNSUPPORTED_FIELDS

EXAMPLES = int(os.environ.get("SBON_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("SBON_FUZZ_RANDOM") == "1"
TALLY: Counter[str] = Counter()  # read by the closing report of a run


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def check(case: Any, response: httpx.Response) -> None:
    """The properties every response must have, whatever the request."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        frames = [ln[len("data: "):] for ln in response.text.splitlines() if ln]
        assert frames and frames[-1] == "[DONE]"
        for frame in frames[:-1]:
            assert "error" not in strict_json(frame), frame
        return
    if case.path == "/metrics":
        return
    body = strict_json(response.text)
    if response.status_code >= 400:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def as_client_would(case: Any, realistic: bool) -> Any:
    """Most bodies as a client would send them: the served model, and no unsupported
    OpenAI fields (every one of which is a 400 by design), so that generation runs."""
    if realistic and isinstance(case.body, dict):
        case.body["model"] = "fake-model"
        for name in UNSUPPORTED_FIELDS:
            case.body.pop(name, None)
    return case


@pytest.fixture(scope="module")
def fuzz_server(request: pytest.FixtureRequest) -> Any:
    from api_harness import make_config, serve
    from fakes import FakeScorer
    from test_hardening import LengthLimitedScorer

    config = make_config(limits={"max_tokens": 64, "max_blocks": 16, "max_prompts": 4,
                                 "max_prompt_chars": 2000, "max_body_bytes": 65536,
                                 "max_content_parts": 64, "request_timeout_s": 20},
                         rewards=[*make_config().model_dump(by_alias=True)["rewards"],
                                  {"name": "short", "type": "python",
                                   "function": "reward.rules:brevity"}])
    # "short" reads responses of at most 16 tokens whole (a model reward's length).
    scorers = {"fake": FakeScorer(fn=lambda r: -len(r)), "other": FakeScorer(fn=len),
               "short": LengthLimitedScorer(room=16, name="short")}
    generator = serve(config, scorers=scorers)
    served = next(generator)
    yield served
    for _ in generator:
        pass


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_fail_the_server(fuzz_server: Any, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions",
                                              "/v1/models", "/health"}
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        for operation in operations:
            _fuzz(client, operation, mode)
    assert fuzz_server.backend.num_unfinished_requests() == 0
    assert fuzz_server.state.admission.in_flight == 0
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    report_tally()


def _fuzz(client: httpx.Client, operation: Any, mode: GenerationMode) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    realistic = st.sampled_from([True, True, True, False])  # three in four as a client would
    cases = st.tuples(strategy, realistic).map(lambda pair: as_client_would(*pair))

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
        response = client.request(kwargs["method"], kwargs["url"],
                                  headers=kwargs.get("headers"), params=kwargs.get("params"),
                                  json=kwargs.get("json"), content=kwargs.get("data"))
        TALLY[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1
        try:
            check(case, response)
            if response.status_code == 200 and "json" in response.headers.get(
                    "content-type", ""):
                case.validate_response(response, checks=[response_schema_conformance])
        except Exception:
            TALLY["failures"] += 1
            raise

    try:
        run()
    except Unsatisfiable:  # no invalid form exists (an operation without any input)
        assert mode is GenerationMode.NEGATIVE


def report_tally() -> None:
    """With ``SBON_FUZZ_REPORT=path``, write the requests sent by operation and status."""
    target = os.environ.get("SBON_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(TALLY.items())), indent=2) + "\n")


INT_EDGES = [-(2**63) - 1, -(2**63), -2, -1, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64,
             10**30]
FLOAT_EDGES = [-3.0, -2.0, 0.0, 1e-300, 0.5, 2.0, 2.0000001, 1e300]


EDGES: dict[str, list[Any]] = {
    "top_k": [*INT_EDGES, 5, 40], "seed": [*INT_EDGES, 7], "n": [*INT_EDGES, 2],
    "max_tokens": [*INT_EDGES, 16, 17, 64], "max_completion_tokens": [*INT_EDGES, 16],
    "temperature": FLOAT_EDGES, "top_p": FLOAT_EDGES, "presence_penalty": FLOAT_EDGES,
    "frequency_penalty": FLOAT_EDGES,
    "stop": ["\n\n", ["x", "\n\n"], "\n", [], "", "w1"], "stream": [True, False],
}
SBON_EDGES: dict[str, list[Any]] = {
    "n": [*INT_EDGES, 2, 3], "block_size": [None, *INT_EDGES, 4, 8],
    "reward": ["fake", "other", "short", "absent"],
    "block_delimiter": ["\n\n", "\n", "x" * 65, "w1"],
    "lambda": [0, 1, "inf", -1, "nan"], "kl_budget": [0, 0.5, 1e300, -1],
    "return_candidates": [True, False],
}


def _some(table: dict[str, list[Any]], most: int) -> st.SearchStrategy[dict[str, Any]]:
    """Up to ``most`` fields of ``table``, each with one of its values."""
    names = st.lists(st.sampled_from(sorted(table)), max_size=most, unique=True)
    return names.flatmap(lambda keys: st.fixed_dictionaries(
        {key: st.sampled_from(table[key]) for key in keys}))


def edge_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """Chat bodies with a few fields at or past their bounds, most of them still valid."""
    parts = st.integers(0, 70).map(lambda k: [{"type": "text", "text": "a"}] * k)
    roles = st.lists(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                     max_size=4)

    def build(extra: dict[str, Any], options: dict[str, Any], content: list[Any],
              sequence: list[str]) -> dict[str, Any]:
        messages = [{"role": r, "content": content or "hi"} for r in sequence or ["user"]]
        body = {"model": "fake-model", "messages": messages, "max_tokens": 8, **extra}
        if options:
            body["sbon"] = options
        return body

    return st.builds(build, _some(EDGES, 2), _some(SBON_EDGES, 3), parts, roles)


def test_edge_values_never_fail_the_server(fuzz_server: Any) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:

        @settings(max_examples=EXAMPLES * 2, deadline=None, derandomize=not RANDOM,
                  database=None, suppress_health_check=list(HealthCheck))
        @given(body=edge_bodies())
        def run(body: dict[str, Any]) -> None:
            response = client.post("/v1/chat/completions", json=body)
            TALLY[f"EDGE /v1/chat/completions {response.status_code}"] += 1
            check_body(response)

        run()
    assert fuzz_server.state.admission.in_flight == 0
    report_tally()


def check_body(response: httpx.Response) -> None:
    """``check`` for a request built here rather than by schemathesis."""
    class Case:
        path = "/v1/chat/completions"

    check(Case(), response)


class ServerStates(RuleBasedStateMachine):
    """Requests of every kind, in any order, against one server: after every step nothing
    is left in flight and the server is healthy."""

    served: Any = None
    client: httpx.Client | None = None

    @rule(body=edge_bodies())
    def edge_request(self, body: dict[str, Any]) -> None:
        assert self.client is not None
        response = self.client.post("/v1/chat/completions", json=body)
        TALLY[f"STATEFUL edge {response.status_code}"] += 1
        check_body(response)

    @rule(body=edge_bodies(), after=st.integers(0, 3))
    def stream_left_early(self, body: dict[str, Any], after: int) -> None:
        assert self.client is not None
        stream_body = {**body, "stream": True}
        with self.client.stream("POST", "/v1/chat/completions", json=stream_body) as response:
            TALLY[f"STATEFUL stream {response.status_code}"] += 1
            assert response.status_code < 500
            for index, _ in enumerate(response.iter_lines()):
                if index >= after:
                    break  # the client leaves; its work must be stopped

    @rule(raw=st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": 1e999}',
                               b'{"messages": "\\ud800"}', b"\xff\xfe"]))
    def malformed_body(self, raw: bytes) -> None:
        assert self.client is not None
        response = self.client.post("/v1/chat/completions", content=raw,
                                    headers={"content-type": "application/json"})
        TALLY[f"STATEFUL malformed {response.status_code}"] += 1
        assert response.status_code == 400, response.text
        check_body(response)

    @invariant()
    def nothing_left_in_flight(self) -> None:
        if self.served is None:
            return
        deadline = time.monotonic() + 10  # a left stream is stopped within its poll
        while self.served.state.admission.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.served.state.admission.in_flight == 0
        assert self.served.state.admission.candidates == 0


def test_stateful_sequences_never_fail_the_server(fuzz_server: Any) -> None:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        ServerStates.served, ServerStates.client = fuzz_server, client
        try:
            run_state_machine_as_test(ServerStates, settings=settings(
                max_examples=max(2, EXAMPLES // 10), stateful_step_count=20, deadline=None,
                derandomize=not RANDOM, database=None,
                suppress_health_check=list(HealthCheck)))
        finally:
            ServerStates.served, ServerStates.client = None, None
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    report_tally()
