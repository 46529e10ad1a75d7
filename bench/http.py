"""The benchmark's methods against a running server, over its OpenAI-compatible API.

Plain sampling is OpenAI ``n`` choices with ``"sbon": {"n": 1}`` (the base model, no reward
call); the soft best-of-n methods send their settings in the ``sbon`` object and read the
phase timings back from it. The naive design needs direct access to the reward, so it is
measured in process only.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench.bench import NAIVE, PLAIN, BenchSettings, RequestFn, Sample
from bench.promptset import PromptItem
from common.values import json_number


class HTTPTarget:
    """The benchmark's methods as requests to ``{url}/v1/chat/completions``."""

    def __init__(self, url: str, prompts: list[PromptItem], settings: BenchSettings,
                 client: httpx.AsyncClient, model: str) -> None:
        self.url, self.prompts, self.settings = url.rstrip("/"), prompts, settings
        self.client, self.model = client, model
        self.name = self.url

    @classmethod
    async def connect(cls, url: str, prompts: list[PromptItem], settings: BenchSettings,
                      client: httpx.AsyncClient) -> HTTPTarget:
        """Ask the server which model it serves."""
        response = await client.get(f"{url.rstrip('/')}/v1/models")
        response.raise_for_status()
        return cls(url, prompts, settings, client, response.json()["data"][0]["id"])

    def supports(self, method: str) -> bool:
        return method != NAIVE

    def request_fn(self, method: str) -> RequestFn:
        if method == PLAIN:
            return self._plain
        return lambda index, rid: self._sbon(method, index, rid)

    def _body(self, index: int, method: str, sbon: dict[str, Any],
              choices: int = 1) -> dict[str, Any]:
        sampling = self.settings.sampling(index, method)
        return {"model": self.model, "messages": self.prompts[index].as_messages(),
                "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                "seed": sampling.seed, "n": choices, "sbon": sbon}

    async def _post(self, body: dict[str, Any], request_id: str) -> tuple[float, dict[str, Any]]:
        started = time.perf_counter()
        response = await self.client.post(f"{self.url}/v1/chat/completions", json=body,
                                          headers={"X-Request-Id": request_id})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {response.text}")
        return elapsed, response.json()

    async def _plain(self, index: int, request_id: str) -> Sample:
        elapsed, reply = await self._post(self._body(index, PLAIN, {"n": 1}, self.settings.n),
                                          request_id)
        tokens = int(reply["usage"]["completion_tokens"])
        return Sample(elapsed, tokens, tokens, generation_s=elapsed)

    async def _sbon(self, method: str, index: int, request_id: str) -> Sample:
        params = self.settings.params(method)
        lam = json_number(params.lam)
        sbon: dict[str, Any] = {"n": params.n, "lambda": lam, "block_size": params.block_size}
        if params.reward:
            sbon["reward"] = params.reward
        if params.prune is not None:
            sbon["prune"] = params.prune.model_dump(exclude_unset=True)
        elapsed, reply = await self._post(self._body(index, method, sbon), request_id)
        info = reply["choices"][0]["sbon"]
        timings = info["timings_s"]
        prefilled, cached = info.get("tokens_prefilled", {}), info.get("tokens_cached", {})
        return Sample(elapsed, int(info["tokens_generated"]),
                      int(reply["usage"]["completion_tokens"]), timings["generation"],
                      timings["scoring"], timings["selection"],
                      int(prefilled.get("generation", 0)), int(cached.get("generation", 0)),
                      int(prefilled.get("scoring", 0)), int(cached.get("scoring", 0)))
