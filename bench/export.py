"""``sbon export``: the distillation log as training data, in the column layouts TRL reads.

- ``pairs``: prompt, chosen (the best-of-n candidate), rejected (the worst-of-n candidate),
  score_chosen, score_rejected: preference data for DPO and its relatives (the BoNBoN recipe).
- ``sft``: prompt, completion (the response that was returned): for SFTTrainer.
- ``scored``: prompt, completions (every candidate), rewards, weights, chosen_index: for
  reward-weighted or variational best-of-n training.

Chat prompts stay conversational (a list of {role, content}; responses become one assistant
message), text prompts stay strings, as TRL's "conversational" and "standard" formats. A
blockwise record exports whole responses: the chosen blocks before the last one, followed
by each candidate of the last block. Output is JSONL or Parquet (pyarrow, the ``data``
extra), chosen by the file's extension or ``--as``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from common.values import json_number
from engine.blocks import find_stop
from server.datalog import LogContents, read_log

Format = Literal["pairs", "sft", "scored"]
FORMATS: tuple[Format, ...] = ("pairs", "sft", "scored")
OUTPUTS = ("jsonl", "parquet")
PromptKind = Literal["chat", "text"]


@dataclass
class ExportStats:
    """What an export read, wrote and left out."""

    records: int = 0
    rows: int = 0
    torn: int = 0  # torn last lines skipped by the reader
    invalid: int = 0  # invalid lines skipped by the reader
    skipped: dict[str, int] = field(default_factory=dict)  # records left out, by reason

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.records} records -> {self.rows} rows"
                + (f"; left out: {left_out}" if left_out else "")
                + f"; lines skipped: {self.torn} torn, {self.invalid} invalid")


@dataclass(frozen=True)
class Responses:
    """The whole responses a record offers: its last block's candidates after the prefix."""

    texts: list[str]
    rewards: list[float]
    weights: list[float]
    chosen_index: int


def _float(value: Any) -> float:
    """A logged number back to a float ("inf" / "-inf" strings; null is NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        return float(value)
    return float(value)


def prompt_kind(record: dict[str, Any]) -> PromptKind:
    return "text" if isinstance(record.get("prompt"), str) else "chat"


def responses(record: dict[str, Any]) -> Responses:
    """Whole responses of a record: the chosen texts of every block but the last, then each
    candidate of the last block (cut at a stop string, as the server does)."""
    blocks = record["blocks"]
    if not blocks:
        raise ValueError("a record without blocks")
    prefix = "".join(b["candidates"][b["chosen_index"]]["text"] for b in blocks[:-1])
    last = blocks[-1]
    stops = record.get("settings", {}).get("stop") or []
    texts = []
    for candidate in last["candidates"]:
        text = prefix + candidate["text"]
        cut = find_stop(text, stops, len(prefix)) if stops and len(blocks) > 1 else None
        texts.append(text if cut is None else text[:cut])
    return Responses(texts=texts,
                     rewards=[_float(c["reward"]) for c in last["candidates"]],
                     weights=[_float(c["weight"]) for c in last["candidates"]],
                     chosen_index=int(last["chosen_index"]))


def _response(text: str, kind: PromptKind) -> str | list[dict[str, str]]:
    return text if kind == "text" else [{"role": "assistant", "content": text}]


def _pair(record: dict[str, Any], kind: PromptKind, stats: ExportStats) -> dict[str, Any] | None:
    found = responses(record)
    scored = [(r, i) for i, r in enumerate(found.rewards) if not math.isnan(r)]
    if len(scored) < 2:
        stats.skip("with fewer than two scored candidates")
        return None
    best = max(scored, key=lambda item: (item[0], -item[1]))[1]  # first of the maxima
    worst = min(scored, key=lambda item: (item[0], item[1]))[1]  # first of the minima
    if found.rewards[best] == found.rewards[worst] or found.texts[best] == found.texts[worst]:
        stats.skip("without a preference (equal rewards or texts)")
        return None
    return {"prompt": record["prompt"], "chosen": _response(found.texts[best], kind),
            "rejected": _response(found.texts[worst], kind),
            "score_chosen": found.rewards[best], "score_rejected": found.rewards[worst]}


def _sft(record: dict[str, Any], kind: PromptKind, stats: ExportStats) -> dict[str, Any] | None:
    return {"prompt": record["prompt"], "completion": _response(record["text"], kind)}


def _scored(record: dict[str, Any], kind: PromptKind,
            stats: ExportStats) -> dict[str, Any] | None:
    found = responses(record)
    return {"prompt": record["prompt"],
            "completions": [_response(t, kind) for t in found.texts],
            "rewards": found.rewards, "weights": found.weights,
            "chosen_index": found.chosen_index}


ROW_BUILDERS: dict[Format, Callable[[dict[str, Any], PromptKind, ExportStats],
                                    dict[str, Any] | None]] = {
    "pairs": _pair, "sft": _sft, "scored": _scored}


def export_rows(records: Iterable[dict[str, Any]], fmt: Format, only: PromptKind | None = None,
                stats: ExportStats | None = None) -> tuple[list[dict[str, Any]], PromptKind]:
    """Rows of ``fmt`` from log records, and the prompt kind they share.

    A log that holds both chat and text prompts is refused unless ``only`` picks one kind:
    the two make columns of different types.
    """
    stats = stats if stats is not None else ExportStats()
    build = ROW_BUILDERS[fmt]
    rows: list[dict[str, Any]] = []
    kinds: set[PromptKind] = set()
    for record in records:
        stats.records += 1
        kind = prompt_kind(record)
        if only is not None and kind != only:
            stats.skip(f"with {kind} prompts")
            continue
        try:
            row = build(record, kind, stats)
        except (KeyError, IndexError, TypeError, ValueError):
            stats.skip("malformed")
            continue
        if row is not None:
            kinds.add(kind)
            rows.append(row)
    if len(kinds) > 1:
        raise ValueError("the log holds both chat and text prompts; export one kind at a "
                         "time with --only chat or --only text")
    stats.rows = len(rows)
    if only is not None:
        return rows, only
    return rows, (kinds.pop() if kinds else "chat")


# --- writing ------------------------------------------------------------------------------

def output_kind(out: Path, given: str | None) -> str:
    """jsonl or parquet: ``--as``, else the file's extension."""
    if given:
        return given
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"cannot tell the output format from '{out.name}'; name it .jsonl or "
                     ".parquet, or pass --as jsonl|parquet")


def _json_value(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else json_number(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def private_output(out: Path) -> Iterator[BinaryIO]:
    """A file to write ``out`` through: readable by its owner only (0600, as the log it
    comes from), fsynced, then renamed over ``out`` and the rename made durable."""
    partial = out.with_name(out.name + ".partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # an older partial file keeps its mode through O_TRUNC
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    folder = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_jsonl(rows: list[dict[str, Any]], out: Path) -> None:
    with private_output(out) as handle:
        for row in rows:
            line = json.dumps(_json_value(row), ensure_ascii=False, allow_nan=False)
            handle.write(line.encode("utf-8") + b"\n")


def arrow_schema(fmt: Format, kind: PromptKind) -> Any:
    """The Parquet columns of ``fmt`` for prompts of ``kind``."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    prompt = pa.string() if kind == "text" else pa.list_(message)
    response = pa.string() if kind == "text" else pa.list_(message)
    columns: dict[Format, list[tuple[str, Any]]] = {
        "pairs": [("prompt", prompt), ("chosen", response), ("rejected", response),
                  ("score_chosen", pa.float64()), ("score_rejected", pa.float64())],
        "sft": [("prompt", prompt), ("completion", response)],
        "scored": [("prompt", prompt), ("completions", pa.list_(response)),
                   ("rewards", pa.list_(pa.float64())), ("weights", pa.list_(pa.float64())),
                   ("chosen_index", pa.int64())],
    }
    return pa.schema(columns[fmt])


def write_parquet(rows: list[dict[str, Any]], out: Path, fmt: Format, kind: PromptKind) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet output needs pyarrow: pip install 'softbon-serve[data]', "
                         "or export to .jsonl") from None
    table = pa.Table.from_pylist(rows, schema=arrow_schema(fmt, kind))
    with private_output(out) as handle:
        pq.write_table(table, handle)


def export(log: str | os.PathLike[str], fmt: Format, out: str | os.PathLike[str],
           as_: str | None = None, only: PromptKind | None = None) -> ExportStats:
    """Read a log folder (or file), write ``fmt`` rows to ``out``; the counts of the run."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; one of {', '.join(FORMATS)}")
    target = Path(out)
    kind_of_file = output_kind(target, as_)
    contents: LogContents = read_log(log)
    stats = ExportStats(torn=contents.torn, invalid=contents.invalid)
    rows, kind = export_rows(contents.records, fmt, only, stats)
    if target.parent and not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    if kind_of_file == "parquet":
        write_parquet(rows, target, fmt, kind)
    else:
        write_jsonl(rows, target)
    return stats
