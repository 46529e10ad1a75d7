"""The distillation log: every soft best-of-n selection as one JSON line in a dataset folder.

Opt-in (``datalog.enabled``); a request opts out with ``"sbon": {"log": false}``. The
request path only builds a small entry and puts it on a bounded queue (``put_nowait``): when
the queue is full the record is dropped and counted, so logging never slows a request. One
writer thread owns the files: it serialises records, appends each as one whole line with a
single ``write`` (a killed server loses no line it has written), calls ``fsync`` every
``flush_records`` records or ``flush_seconds`` seconds, and rotates to a new file past
``rotate_bytes``. Files are ``sbon-000001.jsonl``, ``sbon-000002.jsonl``, ...; a process
never appends to a file an earlier process wrote, so a torn last line (a power loss between
fsyncs) stays at the end of that file, where :func:`read_log` skips and counts it.

The records hold prompts and responses in clear text (docs/datalog.md has the schema).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import DatalogConfig
from common.prompts import Prompt
from common.values import json_number
from engine.types import BlockRecord, SamplingSettings, SBoNParams, SBoNResult
from server.metrics import Metrics

logger = logging.getLogger("sbon.datalog")

SCHEMA_VERSION = 1
FILE_PREFIX = "sbon-"
FILE_SUFFIX = ".jsonl"
FILE_PATTERN = re.compile(r"^sbon-(\d{6,})\.jsonl$")

# What the writer thread turns into a record: built lazily, off the request path.
RecordSource = Callable[[], Mapping[str, Any]]


def log_file_name(sequence: int) -> str:
    return f"{FILE_PREFIX}{sequence:06d}{FILE_SUFFIX}"


def log_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The log files of ``folder`` in the order they were written (by sequence number)."""
    path = Path(folder)
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if p.is_file() and (m := FILE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def last_sequence(folder: str | os.PathLike[str]) -> int:
    """The highest sequence number of the files in ``folder`` (0 for none)."""
    numbers = [int(m.group(1)) for p in Path(folder).iterdir()
               if (m := FILE_PATTERN.match(p.name))]
    return max(numbers, default=0)


# --- records ------------------------------------------------------------------------------

def prompt_record(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt as stored: the text, or the chat messages as {role, content}."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


def _number(value: float) -> float | str | None:
    """A float for JSON: infinities as "inf" / "-inf", NaN as null."""
    if math.isnan(value):
        return None
    return json_number(value)


def _block_lambda(block: BlockRecord, params: SBoNParams) -> float | str | None:
    # The block's own lambda once a KL budget solves it per block; NaN: the request's.
    return _number(params.lam if math.isnan(block.lam) else block.lam)


def build_record(*, request_id: str, logged_at: float, model: str, prompt: Prompt,
                 sampling: SamplingSettings, result: SBoNResult) -> dict[str, Any]:
    """The JSON object of one returned choice (schema in docs/datalog.md)."""
    params = result.params
    kl_budget = params.kl_budget
    # A candidate stopped early by pruning has no final reward: null (its text is partial).
    pruned = result.pruning.pruned_at if result.pruning is not None else None
    return {
        "schema": SCHEMA_VERSION,
        "request_id": request_id,
        "time": datetime.fromtimestamp(logged_at, UTC).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "model": model,
        "reward": result.reward_name,
        "prompt": prompt_record(prompt),
        "settings": {
            "n": params.n,
            "lambda": _number(params.lam),
            "kl_budget": None if kl_budget is None else _number(float(kl_budget)),
            "block_size": params.block_size,
            "block_delimiter": params.block_delimiter,
            "normalize": str(params.normalize),
            "seed": sampling.seed,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "stop": list(sampling.stop),
        },
        "blocks": [
            {
                "index": block.index,
                "lambda": _block_lambda(block, params),
                "chosen_index": block.chosen_index,
                "candidates": [{"text": c.text, "reward": None if pruned and pruned[i] is not None
                                else _number(c.reward), "weight": _number(c.weight)}
                               for i, c in enumerate(block.candidates)],
            }
            for block in result.blocks
        ],
        "text": result.text,
        "finish_reason": result.finish_reason,
    }


# --- the writer ---------------------------------------------------------------------------

_STOP = object()


class DataLog:
    """The background writer: a bounded queue, one thread, fsync policy, size rotation."""

    def __init__(self, config: DatalogConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.folder = Path(config.dir).expanduser()
        self._metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._sequence = 0
        self._unsynced = 0  # records written since the last fsync
        self._failing = False
        # Counts for tests and the start-up log; /metrics has the same numbers.
        self.written = 0
        self.dropped = 0
        self.failed = 0
        if metrics is not None:
            metrics.datalog_queue.set_function(self._queue.qsize)

    @property
    def path(self) -> Path | None:
        """The file being written now."""
        return self._path

    def start(self) -> None:
        """Create the folder (an error here is a configuration error) and start the thread."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK):
            raise PermissionError(f"datalog.dir {self.folder} is not writable")
        self._sequence = last_sequence(self.folder)
        self._thread = threading.Thread(target=self._run, name="sbon-datalog", daemon=True)
        self._thread.start()
        logger.info("distillation log enabled; prompts and responses are stored",
                    extra={"dir": str(self.folder)})

    def submit(self, source: RecordSource | Mapping[str, Any]) -> bool:
        """Queue one record (or a function that builds it); never blocks. False: dropped."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(source)
        except queue.Full:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.datalog_records.labels("dropped").inc()
            return False
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, fsync, close the file and stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(_STOP)  # blocks only while the queue is full, i.e. being drained
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the distillation log did not finish writing in time",
                           extra={"queued": self._queue.qsize()})

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        deadline: float | None = None  # when the oldest unsynced record must be synced
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._sync()
                deadline = None
                continue
            if item is _STOP:
                break
            self._write(item)
            if self._unsynced >= self.config.flush_records:
                self._sync()
                deadline = None
            elif self._unsynced and deadline is None:
                deadline = time.monotonic() + self.config.flush_seconds
        self._sync()
        self._close_file()

    def _write(self, item: RecordSource | Mapping[str, Any]) -> None:
        try:
            record = item() if callable(item) else item
            line = json.dumps(record, ensure_ascii=False, allow_nan=False,
                              separators=(",", ":")).encode() + b"\n"
        except Exception:  # a record that cannot be built is a bug: counted, never fatal
            logger.exception("a distillation record could not be serialised")
            self._count("failed")
            return
        try:
            if self._fd is None or (self._size and self._size + len(line)
                                    > self.config.rotate_bytes):
                self._rotate()
            assert self._fd is not None
            view = memoryview(line)
            while view:  # one write for a whole line; a short write (disk full) continues
                view = view[os.write(self._fd, view):]
            self._size += len(line)
            self._unsynced += 1
            self._failing = False
        except OSError:
            self._fail("writing")
            self._count("failed")

    def _sync(self) -> None:
        if not self._unsynced or self._fd is None:
            return
        count, self._unsynced = self._unsynced, 0
        try:
            os.fsync(self._fd)
        except OSError:
            self._fail("syncing")
            self._count("failed", count)
            return
        self._count("written", count)

    def _rotate(self) -> None:
        self._sync()
        self._close_file()
        while True:  # O_EXCL: never append to a file another process (or run) wrote
            self._sequence += 1
            path = self.folder / log_file_name(self._sequence)
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                                   0o600)
            except FileExistsError:
                continue
            break
        self._path, self._size = path, 0
        _fsync_folder(self.folder)

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _fail(self, what: str) -> None:
        if not self._failing:  # once per run of failures, not once per record
            logger.exception(f"the distillation log failed {what} {self._path}; "
                             "records are lost until a new file can be written")
        self._failing = True
        self._unsynced = 0
        self._close_file()  # the next record starts a new file

    def _count(self, outcome: str, count: int = 1) -> None:
        if outcome == "written":
            self.written += count
        else:
            self.failed += count
        if self._metrics is not None:
            self._metrics.datalog_records.labels(outcome).inc(count)


def _fsync_folder(folder: Path) -> None:
    """Make a new file's name durable too (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


# --- the reader ---------------------------------------------------------------------------

@dataclass
class LogContents:
    """The records of a log folder in order, and what was skipped on the way."""

    records: list[dict[str, Any]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    torn: int = 0  # a file's last line without its newline (a crash while writing)
    invalid: int = 0  # complete lines that are not a JSON object

    @property
    def skipped(self) -> int:
        return self.torn + self.invalid


def iter_lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """The lines of one file as (bytes without newline, complete)."""
    with path.open("rb") as handle:
        for raw in handle:
            complete = raw.endswith(b"\n")
            yield (raw[:-1] if complete else raw), complete


def read_log(location: str | os.PathLike[str]) -> LogContents:
    """Read a log folder (or one file) in writing order, skipping torn and invalid lines."""
    path = Path(location).expanduser()
    if path.is_dir():
        files = log_files(path)
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no distillation log at {path}")
    contents = LogContents(files=files)
    for file in files:
        for line, complete in iter_lines(file):
            if not complete:
                contents.torn += 1  # only ever the last line of a file
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                contents.invalid += 1
                continue
            if not isinstance(record, dict):
                contents.invalid += 1
                continue
            contents.records.append(record)
    return contents
