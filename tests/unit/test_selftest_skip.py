"""Per-reward ``selftest: false``: a task-specific verifier that cannot score the fixed test
prompt does not stop the server from starting, and the failure message says how to skip."""

from __future__ import annotations

import pytest
from fakes import FakeBackend, FakeScorer

import engine.runtime as runtime_module
from common.config import load_config
from engine.selftest import SelfTestError, run_selftest


class StartableBackend(FakeBackend):
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def knows_only_its_prompts(_: str) -> float:
    raise KeyError("no reference answer for this prompt")


async def test_the_failure_message_names_the_setting_that_skips_it() -> None:
    scorers = {"verifier": FakeScorer(fn=knows_only_its_prompts, name="verifier")}
    with pytest.raises(SelfTestError) as raised:
        await run_selftest(FakeBackend(), scorers)
    assert "set 'selftest: false' on reward 'verifier'" in str(raised.value)


async def test_skipped_rewards_are_not_scored_and_others_still_are() -> None:
    verifier = FakeScorer(fn=knows_only_its_prompts, name="verifier")
    judge = FakeScorer(name="judge")
    report = await run_selftest(FakeBackend(), {"verifier": verifier, "judge": judge},
                                skip=["verifier"])
    assert set(report.scoring_s) == {"judge"} and judge.seen and not verifier.seen
    with pytest.raises(SelfTestError, match="reward 'judge'"):
        await run_selftest(FakeBackend(), {"judge": FakeScorer(fn=knows_only_its_prompts)},
                           skip=["verifier"])


async def test_start_runtime_skips_what_the_configuration_says(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_module, "on_cpu", lambda: False)
    monkeypatch.setattr(runtime_module, "VLLMBackend", lambda config: StartableBackend())
    verifier = FakeScorer(fn=knows_only_its_prompts, name="judge")
    monkeypatch.setattr(runtime_module, "build_scorers", lambda *a, **k: {"judge": verifier})
    with pytest.raises(SelfTestError, match="reward 'judge'"):
        await runtime_module.start_runtime(load_config(None, [], environ={}))
    verifier.seen.clear()
    started = await runtime_module.start_runtime(
        load_config(None, ["rewards.0.selftest=false"], environ={}))
    assert not verifier.seen
    await started.close()


def test_selftest_is_a_boolean() -> None:
    with pytest.raises(ValueError, match="selftest"):
        load_config(None, ["rewards.0.selftest=sometimes"], environ={})
