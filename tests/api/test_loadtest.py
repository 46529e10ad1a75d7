"""The load test script (scripts/loadtest.py) against the real app over the fake engine:
4x the concurrency cap, mixed valid, oversized and disconnecting clients, a fixed count."""

from __future__ import annotations

import json
import subprocess
import sys

from fakes import FakeBackend
from helpers import REPO_ROOT


def test_the_server_survives_a_mixed_load_on_a_small_setting(server_factory, tmp_path) -> None:
    backend = FakeBackend(model_name="fake-model", delay_s=0.05)
    served = server_factory(backend=backend, limits={
        "max_concurrent_requests": 4, "max_prompts": 4, "max_body_bytes": 16384,
        "max_prompt_chars": 2000})
    summary_path = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "loadtest.py"), "--url", served.url,
         "--requests", "120", "--cap", "4", "--max-prompts", "4", "--max-body-bytes", "16384",
         "--max-prompt-chars", "2000", "--settle-s", "10", "--json", str(summary_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    statuses = set(summary["by_status"])
    assert statuses <= {"200", "400", "413", "429", "disconnected"}
    assert {"200", "400", "413"} <= statuses
    assert summary["health_worst_s"] < 1.0 and summary["health_failures"] == 0
    assert summary["engine_unfinished_at_end"] == 0
    assert served.state.admission.in_flight == 0 and served.state.admission.candidates == 0
    assert served.post("/v1/chat/completions", {
        "model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4}).status_code == 200


def test_the_load_test_refuses_targets_off_this_machine() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "loadtest.py"), "--url",
         "http://192.0.2.1:8000", "--requests", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a loopback address" in done.stderr
