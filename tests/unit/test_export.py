"""``sbon export``: log records to pairs, sft and scored rows, as JSONL and Parquet."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fakes import FakeBackend, FakeScorer

from bench.export import ExportStats, export, export_rows, output_kind, responses
from cli.main import main
from common.config import DatalogConfig
from common.prompts import Message, Prompt
from engine.sbon import SBoNEngine
from engine.types import SamplingSettings, SBoNParams
from server.datalog import DataLog, build_record, read_log

CHAT = [{"role": "user", "content": "hi"}]


def block(index: int, texts: list[str], rewards: list[Any], chosen: int) -> dict[str, Any]:
    return {"index": index, "lambda": 1.0, "chosen_index": chosen,
            "candidates": [{"text": t, "reward": r, "weight": 1 / len(texts)}
                           for t, r in zip(texts, rewards, strict=True)]}


def per_response(prompt: Any = "p", rewards: list[Any] | None = None) -> dict[str, Any]:
    rewards = rewards if rewards is not None else [0.5, 2.0, -1.0]
    return {"request_id": "r", "prompt": prompt, "settings": {"stop": []},
            "blocks": [block(0, ["mid", "best", "worst"], rewards, 0)],
            "text": "mid", "finish_reason": "stop"}


def blockwise() -> dict[str, Any]:
    return {"request_id": "b", "prompt": CHAT, "settings": {"stop": ["END"]},
            "blocks": [block(0, ["A1 ", "A2 "], [1.0, 0.0], 1),
                       block(1, ["B1 ", "B2 "], [0.0, 3.0], 0),
                       block(2, ["C1", "C2 EN", "C3 END tail"], [5.0, -2.0, 7.0], 2)],
            "text": "A2 B1 C3 ", "finish_reason": "stop"}


def test_pairs_take_the_best_and_the_worst_candidate() -> None:
    rows, kind = export_rows([per_response()], "pairs")
    assert kind == "text"
    assert rows == [{"prompt": "p", "chosen": "best", "rejected": "worst",
                     "score_chosen": 2.0, "score_rejected": -1.0}]


def test_chat_prompts_give_conversational_rows() -> None:
    (pair,), kind = export_rows([per_response(CHAT)], "pairs")
    assert kind == "chat" and pair["prompt"] == CHAT
    assert pair["chosen"] == [{"role": "assistant", "content": "best"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "worst"}]
    (sft,), _ = export_rows([per_response(CHAT)], "sft")
    assert sft == {"prompt": CHAT, "completion": [{"role": "assistant", "content": "mid"}]}


def test_blockwise_records_export_the_prefix_with_the_last_blocks_candidates() -> None:
    found = responses(blockwise())
    # The chosen blocks before the last, then each candidate, cut at a stop string.
    assert found.texts == ["A2 B1 C1", "A2 B1 C2 EN", "A2 B1 C3 "]
    assert found.rewards == [5.0, -2.0, 7.0] and found.chosen_index == 2
    (pair,), _ = export_rows([blockwise()], "pairs")
    assert pair["chosen"][0]["content"] == "A2 B1 C3 " and pair["score_chosen"] == 7.0
    assert pair["rejected"][0]["content"] == "A2 B1 C2 EN" and pair["score_rejected"] == -2.0
    (scored,), _ = export_rows([blockwise()], "scored")
    assert [c[0]["content"] for c in scored["completions"]] == found.texts
    assert scored["rewards"] == [5.0, -2.0, 7.0] and scored["chosen_index"] == 2
    (sft,), _ = export_rows([blockwise()], "sft")
    assert sft["completion"][0]["content"] == "A2 B1 C3 "


def test_infinite_rewards_and_ties() -> None:
    stats = ExportStats()
    rows, _ = export_rows([per_response(rewards=["-inf", "inf", 0.0]),
                           per_response(rewards=[1.0, 1.0, 1.0]),
                           per_response(rewards=[None, None, 1.0])], "pairs", stats=stats)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("best", "mid")]
    assert rows[0]["score_chosen"] == math.inf and rows[0]["score_rejected"] == -math.inf
    assert stats.records == 3 and stats.rows == 1 and sum(stats.skipped.values()) == 2


def test_a_log_mixing_chat_and_text_prompts_needs_only() -> None:
    records = [per_response("text"), per_response(CHAT)]
    with pytest.raises(ValueError, match="--only"):
        export_rows(records, "sft")
    rows, kind = export_rows(records, "sft", only="chat")
    assert kind == "chat" and len(rows) == 1


def test_the_output_format_comes_from_the_extension_or_as(tmp_path: Path) -> None:
    assert output_kind(tmp_path / "a.jsonl", None) == "jsonl"
    assert output_kind(tmp_path / "a.parquet", None) == "parquet"
    assert output_kind(tmp_path / "a.data", "parquet") == "parquet"
    with pytest.raises(ValueError, match="--as"):
        output_kind(tmp_path / "a.data", None)


async def logged(folder: Path) -> list[dict[str, Any]]:
    """A log written by the real writer from real soft best-of-n results (fixed seeds)."""
    engine = SBoNEngine(FakeBackend(), {"fake": FakeScorer(fn=lambda r: len(set(r)))}, "fake")
    log = DataLog(DatalogConfig(enabled=True, dir=str(folder), flush_records=4))
    log.start()
    prompts: list[Prompt] = [(Message("user", f"question {i}"),) for i in range(6)]
    for i, prompt in enumerate(prompts):
        params = SBoNParams(n=4, lam=0.3, block_size=3 if i % 2 else None)
        sampling = SamplingSettings(max_tokens=8, seed=100 + i)
        result = await engine.run(prompt, params, sampling, f"r{i}")
        log.submit(build_record(request_id=f"r{i}", logged_at=0.0, model="m", prompt=prompt,
                                sampling=sampling, result=result))
    log.close()
    return read_log(folder).records


def read_back(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return list(pq.read_table(path).to_pylist())
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
async def test_round_trip_log_export_read_back(tmp_path: Path, suffix: str) -> None:
    records = await logged(tmp_path / "log")
    assert len(records) == 6 and any(len(r["blocks"]) > 1 for r in records)
    last_rewards = [[c["reward"] for c in r["blocks"][-1]["candidates"]] for r in records]

    stats = export(tmp_path / "log", "pairs", tmp_path / f"pairs{suffix}")
    pairs = read_back(tmp_path / f"pairs{suffix}")
    assert stats.rows == len(pairs) and stats.torn == stats.invalid == 0
    kept = [(r, rw) for r, rw in zip(records, last_rewards, strict=True) if max(rw) > min(rw)]
    assert len(pairs) == len(kept) >= 3
    for pair, (record, rewards) in zip(pairs, kept, strict=True):
        assert pair["prompt"] == record["prompt"]
        assert pair["score_chosen"] == max(rewards) and pair["score_rejected"] == min(rewards)
        texts = responses(record).texts
        assert pair["chosen"] == [{"role": "assistant",
                                   "content": texts[rewards.index(max(rewards))]}]
        assert pair["rejected"] == [{"role": "assistant",
                                     "content": texts[rewards.index(min(rewards))]}]

    export(tmp_path / "log", "sft", tmp_path / f"sft{suffix}")
    sft = read_back(tmp_path / f"sft{suffix}")
    assert [row["completion"][0]["content"] for row in sft] == [r["text"] for r in records]
    assert [row["prompt"] for row in sft] == [r["prompt"] for r in records]

    export(tmp_path / "log", "scored", tmp_path / f"scored{suffix}")
    scored = read_back(tmp_path / f"scored{suffix}")
    assert [row["rewards"] for row in scored] == last_rewards
    for row, record in zip(scored, records, strict=True):
        assert len(row["completions"]) == 4
        chosen = row["completions"][row["chosen_index"]][0]["content"]
        assert chosen == record["text"]  # the selected response is one of the candidates
        assert math.isclose(sum(row["weights"]), 1.0)


async def test_the_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await logged(tmp_path / "log")
    with (tmp_path / "log" / "sbon-000001.jsonl").open("ab") as handle:
        handle.write(b'{"request_id": "torn')
    out = tmp_path / "out" / "pairs.parquet"
    assert main(["export", str(tmp_path / "log"), "--format", "pairs", "--out", str(out)]) == 0
    assert pq.read_table(out).column_names == ["prompt", "chosen", "rejected", "score_chosen",
                                               "score_rejected"]
    assert "1 torn" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "log"), "--format", "sft", "--out",
                 str(tmp_path / "sft.data"), "--as", "jsonl"]) == 0
    assert len(read_back(tmp_path / "sft.data")) == 6
    assert main(["export", str(tmp_path / "log"), "--format", "sft", "--out",
                 str(tmp_path / "sft.data")]) == 2  # no extension, no --as: a clear error
