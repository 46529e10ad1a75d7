"""Property-based requests from the server's own OpenAPI document (schemathesis + hypothesis).

Every operation is fuzzed with requests that fit its schema and requests that do not, three
bodies in four as a client would send them (the served model, no unsupported fields, so that
generation runs, not only the 404 and 400 answers), against the real app on a real uvicorn
server over the fake engine. The properties: never a 5xx; every error in OpenAI's envelope;
every body and every stream frame strict JSON, a stream ending with [DONE]; 200 bodies
conform to the documented schema. ``SBON_FUZZ_EXAMPLES``
sets the examples per operation and mode (default 60); ``SBON_FUZZ_RANDOM=1`` draws new
examples each run instead of the fixed, reproducible ones.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
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

    config = make_config(limits={"max_tokens": 64, "max_blocks": 16, "max_prompts": 4,
                                 "max_prompt_chars": 2000, "max_body_bytes": 65536,
                                 "request_timeout_s": 20})
    generator = serve(config)
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
