"""Result files: written atomically, and an interrupted eval resumes from its checkpoint
with the same results as an uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes import FakeBackend, FakeScorer, fake_runtime

from bench.evaluate import EvalSettings, run_eval
from bench.files import EvalCheckpoint, atomic_path, run_key, write_atomic
from bench.promptset import load_prompts

SETTINGS = EvalSettings(n_grid=(1, 2), lam_grid=(0.5, math.inf), soft_n=2, block_sizes=(4,),
                        pool=8, draws=20, prompts=3, max_tokens=8)


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path: Path) -> None:
    target = tmp_path / "eval.json"
    write_atomic(target, '{"old": true}')
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        partial.write_text('{"new": tr')  # interrupted halfway
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary left


class Interrupt(Exception):
    pass


async def test_an_interrupted_eval_resumes_and_draws_the_same_results(tmp_path: Path) -> None:
    prompts = load_prompts(None, SETTINGS.prompts)
    key = run_key(SETTINGS, prompts)
    path = tmp_path / "eval.checkpoint.jsonl"

    def runtime(fail_after: int | None = None):  # type: ignore[no-untyped-def]
        backend = FakeBackend()
        if fail_after is not None:
            original = backend.generate

            async def generate(*args, **kwargs):  # type: ignore[no-untyped-def]
                if len(backend.calls) >= fail_after:
                    raise Interrupt()
                return await original(*args, **kwargs)

            backend.generate = generate  # type: ignore[method-assign]
        return fake_runtime(backend, {"fake": FakeScorer(fn=lambda r: r.count("1"))})

    reference = await run_eval(runtime(), prompts, SETTINGS)
    with pytest.raises(Interrupt):  # the pools of the first two prompts, then a crash
        await run_eval(runtime(fail_after=2), prompts, SETTINGS, None,
                       EvalCheckpoint(path, key))
    checkpoint = EvalCheckpoint(path, key)
    assert checkpoint.resumed == 2
    with path.open("a") as handle:
        handle.write('{"kind": "pool", "ind')  # a line cut short by the crash is ignored
    resumed_runtime = runtime()
    resumed = await run_eval(resumed_runtime, prompts, SETTINGS, None, EvalCheckpoint(path, key))
    pool_calls = [c for c in resumed_runtime.backend.calls if "pool" in c.request_id]
    assert len(pool_calls) == 1  # only the missing prompt's pool was generated again
    assert resumed.rows() == reference.rows()
    other = EvalCheckpoint(path, run_key(SETTINGS, prompts[:2]))  # another run's settings
    assert other.resumed == 0
