"""A real ``sbon serve`` logging under load is killed with SIGKILL; its log is read back.

Every record synced before the kill (``sbon_datalog_records_total{outcome="written"}``
scraped just before it) is read back intact, every record holds exactly what its response
returned, nothing from an opted-out request is there, and a torn tail (simulated power loss
between two syncs) is skipped and counted.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from helpers import REPO_ROOT, free_port
from live_server import sbon_command, wait_healthy

from server.datalog import log_files, read_log

MODEL = "smollm2-135m-instruct"
FLUSH_RECORDS = 3
CLIENTS = 4
SYNCED_BEFORE_KILL = 3 * FLUSH_RECORDS  # the kill comes once at least this many are synced


@dataclass
class Load:
    """Requests sent from several threads until ``stop`` is set, and what came back."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: set[str] = field(default_factory=set)
    opted_out: set[str] = field(default_factory=set)
    answered: dict[str, tuple[str, float]] = field(default_factory=dict)  # id: (text, when)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def client(self) -> None:
        with httpx.Client(timeout=600) as http:
            while not self.stop.is_set():
                number = next(self.counter)
                request_id = f"load-{number}"
                private = number % 5 == 4  # every fifth request opts out of the log
                sbon = {"n": 4, "lambda": 0.5, "reward": "length", "log": not private}
                if number % 2:
                    body = {"model": MODEL, "prompt": f"Count from {number}:", "max_tokens": 6,
                            "seed": number, "sbon": sbon}
                    path = "/v1/completions"
                else:
                    body = {"model": MODEL, "max_tokens": 6, "seed": number, "sbon": {
                        **sbon, "block_size": 3},
                        "messages": [{"role": "user", "content": f"Name {number} colours."}]}
                    path = "/v1/chat/completions"
                with self.lock:
                    self.sent.add(request_id)
                    if private:
                        self.opted_out.add(request_id)
                try:
                    response = http.post(f"{self.url}{path}", json=body,
                                         headers={"X-Request-Id": request_id})
                except httpx.TransportError:
                    return  # the server was killed
                if response.status_code != 200:
                    continue
                choice = response.json()["choices"][0]
                text = choice["text"] if "text" in choice else choice["message"]["content"]
                with self.lock:
                    self.answered[request_id] = (text, time.monotonic())


def synced(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(r'^sbon_datalog_records_total\{outcome="written"\} (\S+)$', text,
                      re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def test_kill_9_loses_no_synced_record(model_cache_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "datalog"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SBON_MODEL__CACHE_DIR=str(model_cache_dir), HF_HUB_OFFLINE="1",
               SBON_ENGINE__MAX_MODEL_LEN="1024", SBON_LIMITS__MAX_CONCURRENT_REQUESTS="8",
               SBON_DATALOG__ENABLED="true", SBON_DATALOG__DIR=str(folder),
               SBON_DATALOG__FLUSH_RECORDS=str(FLUSH_RECORDS),
               SBON_DATALOG__FLUSH_SECONDS="3600")
    log = tmp_path / "server.log"
    command = [*sbon_command(), "serve", "--config", str(REPO_ROOT / "config.yaml"),
               "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as sink:  # its own process group: the engine's processes go too
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    load = Load(url)
    threads = [threading.Thread(target=load.client, daemon=True) for _ in range(CLIENTS)]
    try:
        wait_healthy(url, process, log)
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 600
        while (before_kill := synced(url)) < SYNCED_BEFORE_KILL:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # under load: requests are in flight
        killed_at = time.monotonic()
        process.wait(timeout=30)
    finally:
        load.stop.set()
        with_group_killed(process)
    for thread in threads:
        thread.join(timeout=60)

    contents = read_log(folder)
    records = contents.records
    files = log_files(folder)
    print(f"\nsynced before the kill: {before_kill}; records read back: {len(records)}; "
          f"responses: {len(load.answered)}; torn: {contents.torn}; "
          f"invalid: {contents.invalid}; files: {len(files)}")
    # Every synced record is there, and every line but a torn tail is a whole record.
    assert contents.invalid == 0
    assert contents.torn == sum(not f.read_bytes().endswith(b"\n") for f in files if
                                f.stat().st_size) <= 1
    assert len(records) >= before_kill >= SYNCED_BEFORE_KILL
    ids = [r["request_id"] for r in records]
    assert len(ids) == len(set(ids))  # one choice per request, each logged once
    assert set(ids) <= load.sent - load.opted_out  # never an opted-out request
    for record in records:
        answered = load.answered.get(record["request_id"])
        if answered is not None:  # the record holds what the response returned
            assert record["text"] == answered[0]
        for block in record["blocks"]:
            assert len(block["candidates"]) == 4
            assert 0 <= block["chosen_index"] < 4
    # Nothing else is lost: a response answered well before the kill was logged too.
    settled = {i for i, (_, when) in load.answered.items() if when < killed_at - 1.0}
    assert settled - load.opted_out <= set(ids)

    # A power loss between two syncs can leave a torn last line: skipped and counted.
    crashed = tmp_path / "crashed"
    shutil.copytree(folder, crashed)
    last = log_files(crashed)[-1]
    lines = last.read_bytes().split(b"\n")
    complete = lines[:-1]
    keep = len(complete) - 1  # the last whole record becomes a torn tail
    last.write_bytes(b"".join(line + b"\n" for line in complete[:keep])
                     + complete[keep][: len(complete[keep]) // 2])
    torn = read_log(crashed)
    assert torn.torn == 1 and torn.invalid == 0
    assert torn.records == records[: len(records) - 1]


def with_group_killed(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL whatever is left of the server's process group (the engine's processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=30)
