"""The distillation log: records, the bounded queue, fsync policy, rotation, the reader."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeBackend, FakeScorer

from common.config import DatalogConfig, load_config
from common.prompts import Message
from engine.sbon import SBoNEngine
from engine.types import (
    BlockRecord,
    Diagnostics,
    SamplingSettings,
    SBoNParams,
    SBoNResult,
    ScoredCandidate,
)
from server.datalog import DataLog, build_record, log_file_name, log_files, read_log
from server.metrics import Metrics


def config(folder: Path, **values: Any) -> DatalogConfig:
    return DatalogConfig(enabled=True, dir=str(folder), **values)


def record(i: int, size: int = 0) -> dict[str, Any]:
    return {"request_id": f"r{i}", "text": "x" * size}


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def counter(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("sbon_datalog_records_total",
                                              {"outcome": outcome})
    return value or 0.0


def scored(text: str, reward: float, weight: float) -> ScoredCandidate:
    return ScoredCandidate(text=text, token_ids=(1,), reward=reward, weight=weight,
                           cumulative_logprob=None, finish_reason="length")


def hand_made_result() -> SBoNResult:
    blocks = [BlockRecord(index=0, candidates=[scored("a ", 1.0, 0.7), scored("b ", 0.5, 0.3)],
                          chosen_index=0, ess=1.7, kl_from_uniform=0.1, kl_estimate=0.1,
                          lam=0.5),
              BlockRecord(index=1, candidates=[scored("c", math.inf, 1.0),
                                               scored("d", -math.inf, 0.0)],
                          chosen_index=0, ess=1.0, kl_from_uniform=0.7, kl_estimate=0.7)]
    return SBoNResult(text="a c", token_ids=[1, 1], finish_reason="stop",
                      params=SBoNParams(n=2, lam=math.inf, block_size=1), reward_name="fake",
                      blocks=blocks, diagnostics=Diagnostics(1.3, 0.8, 0.6, 0.8, 2 / 3),
                      prompt_tokens=3, tokens_generated=4, tokens_scored=4)


# --- records ------------------------------------------------------------------------------

async def test_a_record_holds_prompt_settings_and_every_block() -> None:
    backend = FakeBackend()
    engine = SBoNEngine(backend, {"fake": FakeScorer(fn=lambda r: -len(r))}, "fake")
    prompt = (Message("system", "be brief"), Message("user", "hi"))
    sampling = SamplingSettings(max_tokens=6, seed=7, stop=("STOP",))
    result = await engine.run(prompt, SBoNParams(n=3, lam=0.5, block_size=2), sampling, "r")
    line = json.dumps(build_record(request_id="req-1", logged_at=0.0, model="m", prompt=prompt,
                                   sampling=sampling, result=result), allow_nan=False)
    data = json.loads(line)
    assert data["request_id"] == "req-1" and data["model"] == "m" and data["reward"] == "fake"
    assert data["time"] == "1970-01-01T00:00:00.000Z"
    assert data["prompt"] == [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hi"}]
    assert data["settings"] == {
        "n": 3, "lambda": 0.5, "kl_budget": None, "block_size": 2, "block_delimiter": None,
        "normalize": "raw", "seed": 7, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6,
        "stop": ["STOP"]}
    assert len(data["blocks"]) == len(result.blocks) == 3
    for logged, block in zip(data["blocks"], result.blocks, strict=True):
        assert logged["index"] == block.index
        assert logged["chosen_index"] == block.chosen_index
        assert logged["lambda"] == 0.5
        assert [c["text"] for c in logged["candidates"]] == [c.text for c in block.candidates]
        assert [c["reward"] for c in logged["candidates"]] == block.rewards
        assert [c["weight"] for c in logged["candidates"]] == block.weights
    assert data["text"] == result.text and data["finish_reason"] == result.finish_reason


def test_infinities_are_strings_and_each_block_keeps_its_own_lambda() -> None:
    data = build_record(request_id="r", logged_at=1.5, model="m", prompt="text prompt",
                        sampling=SamplingSettings(), result=hand_made_result())
    json.dumps(data, allow_nan=False)  # no bare Infinity or NaN anywhere
    assert data["prompt"] == "text prompt"
    assert data["settings"]["lambda"] == "inf"
    assert data["blocks"][0]["lambda"] == 0.5  # solved per block
    assert data["blocks"][1]["lambda"] == "inf"  # no per-block value: the request's
    assert [c["reward"] for c in data["blocks"][1]["candidates"]] == ["inf", "-inf"]


def test_the_configuration_section_has_safe_defaults() -> None:
    default = load_config(environ={}).datalog
    assert default.enabled is False and default.flush_records >= 1
    loaded = load_config(overrides=["datalog.enabled=true", "datalog.flush_records=3"],
                         environ={"SBON_DATALOG__DIR": "/data/log"}).datalog
    assert loaded.enabled and loaded.flush_records == 3 and loaded.dir == "/data/log"
    with pytest.raises(ValueError):
        load_config(overrides=["datalog.queue_size=0"], environ={})


# --- the writer ---------------------------------------------------------------------------

def test_a_full_queue_drops_records_and_counts_them(tmp_path: Path) -> None:
    metrics = Metrics()
    log = DataLog(config(tmp_path, queue_size=2), metrics)
    # The thread is not started yet: nothing leaves the queue.
    accepted = [log.submit(record(i)) for i in range(5)]
    assert accepted == [True, True, False, False, False]
    assert log.dropped == 3 and counter(metrics, "dropped") == 3
    log.start()
    log.close()
    assert log.written == 2 and counter(metrics, "written") == 2
    contents = read_log(tmp_path)
    assert [r["request_id"] for r in contents.records] == ["r0", "r1"]
    assert log.submit(record(9)) is False  # closed: nothing more is taken


def test_submit_never_blocks_while_the_writer_is_stuck(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_fsync = os.fsync

    def stuck_fsync(fd: int) -> None:
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", stuck_fsync)
    log = DataLog(config(tmp_path, queue_size=4, flush_records=1))
    log.start()
    started = time.perf_counter()
    results = [log.submit(record(i)) for i in range(50)]
    elapsed = time.perf_counter() - started
    release.set()
    log.close()
    assert elapsed < 0.5
    assert results.count(False) == log.dropped >= 40
    assert log.written == results.count(True)
    assert len(read_log(tmp_path).records) == log.written


def test_fsync_every_flush_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    metrics = Metrics()
    log = DataLog(config(tmp_path, flush_records=3, flush_seconds=3600), metrics)
    log.start()
    for i in range(7):
        log.submit(record(i))
    wait_for(lambda: log.written == 6)
    time.sleep(0.2)
    assert log.written == 6 and counter(metrics, "written") == 6  # the 7th waits
    # Every record is already in the file (one write per line), synced or not.
    assert len(read_log(tmp_path).records) == 7
    log.close()
    assert log.written == 7 and counter(metrics, "written") == 7


def test_fsync_after_flush_seconds(tmp_path: Path) -> None:
    log = DataLog(config(tmp_path, flush_records=1000, flush_seconds=0.05))
    log.start()
    log.submit(record(0))
    started = time.monotonic()
    wait_for(lambda: log.written == 1, timeout=5)
    assert time.monotonic() - started < 2.0
    log.close()


def test_files_rotate_by_size_and_read_back_in_order(tmp_path: Path) -> None:
    log = DataLog(config(tmp_path, rotate_bytes=4096, flush_records=1))
    log.start()
    for i in range(20):
        log.submit(record(i, size=900))
    log.close()
    files = log_files(tmp_path)
    assert [f.name for f in files] == [log_file_name(k) for k in range(1, len(files) + 1)]
    assert len(files) >= 5
    assert all(f.stat().st_size <= 4096 for f in files)
    contents = read_log(tmp_path)
    assert [r["request_id"] for r in contents.records] == [f"r{i}" for i in range(20)]
    assert contents.torn == contents.invalid == 0


def test_a_new_writer_never_appends_to_an_old_file(tmp_path: Path) -> None:
    old = tmp_path / log_file_name(3)
    old.write_bytes(b'{"request_id": "old"}\n{"request_id": "to')  # a crash mid-line
    (tmp_path / "notes.txt").write_text("not a log file\n")
    log = DataLog(config(tmp_path))
    log.start()
    log.submit(record(1))
    log.close()
    assert log.path == tmp_path / log_file_name(4)
    contents = read_log(tmp_path)
    assert [r["request_id"] for r in contents.records] == ["old", "r1"]
    assert contents.torn == 1 and contents.invalid == 0


def test_records_that_cannot_be_serialised_are_counted_not_fatal(tmp_path: Path) -> None:
    metrics = Metrics()
    log = DataLog(config(tmp_path, flush_records=1), metrics)
    log.start()
    log.submit({"bad": math.nan})
    log.submit(lambda: {"request_id": "built late"})
    log.close()
    assert counter(metrics, "failed") == 1 and log.written == 1
    assert read_log(tmp_path).records == [{"request_id": "built late"}]


# --- the reader ---------------------------------------------------------------------------

def test_the_reader_skips_and_counts_torn_and_invalid_lines(tmp_path: Path) -> None:
    (tmp_path / log_file_name(1)).write_bytes(
        b'{"request_id": "a"}\nnot json\n[1, 2]\n\n{"request_id": "b"}\n')
    (tmp_path / log_file_name(2)).write_bytes(
        '{"request_id": "c", "text": "\u00e9"}\n{"request_id": "d", "te'.encode())
    contents = read_log(tmp_path)
    assert [r["request_id"] for r in contents.records] == ["a", "b", "c"]
    assert contents.invalid == 2 and contents.torn == 1 and contents.skipped == 3
    single = read_log(tmp_path / log_file_name(2))
    assert len(single.records) == 1 and single.torn == 1
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "missing")
