"""One typed configuration tree for the whole service, read by every layer.

Loaded from ``config.yaml``, then overridden by environment variables
(``SBON_ENGINE__DTYPE=bfloat16``: prefix ``SBON_``, ``__`` between levels) and by
command-line overrides (``--set engine.dtype=bfloat16``); precedence CLI > env > file >
defaults. Validation happens once, at start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from common.overrides import field_type, typed_value
from common.prune import PruneSettings
from common.values import parse_lambda

logger = logging.getLogger(__name__)

ENV_PREFIX = "SBON_"
EMBEDDED_MODEL = "embedded"


class Normalization(StrEnum):
    """How raw rewards are transformed before the softmax (lambda is in these units)."""

    RAW = "raw"
    ZSCORE = "zscore"


class _RewardBase(BaseModel):
    """Fields every reward has: its name (what requests send as ``sbon.reward``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    # One scoring call (all candidates of a block) taking longer fails the request with a
    # 503 naming the reward (reward/guard.py); the reward's state turns to "failing".
    timeout_s: float = Field(default=120.0, gt=0.0)
    # The start-up self-test scores a fixed test prompt with every reward; a verifier that
    # only knows its own prompts sets this false (its model still loads at start).
    selftest: bool = True


class ModelRewardConfig(_RewardBase):
    """Fields of every reward that is a model: where it comes from and how it is loaded."""

    model: str = Field(min_length=1)  # a hub id or a folder
    revision: str | None = None  # a pinned commit of a hub model
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    trust_remote_code: bool = False


class LocalModelRewardConfig(ModelRewardConfig):
    """A reward model run with transformers in the serving process, on one scoring thread
    that batches concurrent requests (reward/batching.py)."""

    device: str = "cpu"
    max_batch_tokens: int = Field(default=8192, ge=64)
    max_length: int = Field(default=2048, ge=16)  # longer inputs lose their oldest tokens
    batch_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)


class HFRewardConfig(LocalModelRewardConfig):
    """A Hugging Face sequence-classification reward model, run with transformers.

    The reward is the raw logit of one output (``label`` picks it when the head has
    several); pairs are formatted with the model's chat template.
    """

    type: Literal["hf"]
    label: int | str | None = None
    use_chat_template: bool = True
    share_prompt_kv: bool = True  # compute a prompt's KV once for its n responses (causal models)


class PRMRewardConfig(LocalModelRewardConfig):
    """A process reward model, run with transformers: scores the newest step of a response.

    The response is split into steps at ``step_delimiter``; the model reads the question and
    every step, and a step's score is the model's probability that it is good, in [0, 1].
    ``format`` says how the model was trained to read steps: ``step_tag`` (math-shepherd:
    each step followed by ``step_tag``, p(good_token) / (p(good_token) + p(bad_token)) at
    the tag), ``chat`` (RLHFlow: steps as user turns, each answered by an assistant label;
    the same ratio where the label would be generated) or ``token_classification``
    (Qwen2.5-Math-PRM: ``separator`` after each step, a two-class head, p(class 1) at it).
    ``aggregation`` combines the step scores into the reward: ``last`` (the newest step:
    blockwise use with a block delimiter), ``min`` or ``prod`` (whole responses).
    """

    type: Literal["prm"]
    format: Literal["step_tag", "chat", "token_classification"] = "step_tag"
    step_delimiter: str = Field(default="\n\n", min_length=1)
    step_tag: str = Field(default="\u043a\u0438", min_length=1)  # math-shepherd's tag
    good_token: str = Field(default="+", min_length=1)
    bad_token: str = Field(default="-", min_length=1)
    separator: str = Field(default="<extra_0>", min_length=1)  # token_classification
    aggregation: Literal["last", "min", "prod"] = "last"
    share_prefix_kv: bool = True  # compute the question and earlier steps once per block


class VLLMRewardConfig(ModelRewardConfig):
    """A Hugging Face sequence-classification reward model served by a second, co-located
    vLLM engine in pooling mode (continuous batching, prefix caching, CUDA graphs on a GPU).

    The reward is the raw logit of one output (``label`` picks it), never squashed:
    soft selection is invariant to shifts of the reward, not to an activation.
    """

    type: Literal["vllm"]
    label: int | str | None = None
    max_model_len: int = Field(default=2048, ge=16)
    # GPU: this engine's share of GPU memory (weights + its KV cache); the generator's
    # engine.memory_fraction plus this must stay below 1. CPU: the KV cache in GiB.
    memory_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    kv_cache_gib: float = Field(default=1.0, gt=0.0)
    kv_block_size: int | None = Field(default=None, ge=1)  # None: as for the generator
    enforce_eager: bool = True
    use_chat_template: bool = True
    extra_args: dict[str, Any] = Field(default_factory=dict)


class JudgeRewardConfig(_RewardBase):
    """The served policy model asked whether a response is good: log p(yes) - log p(no)."""

    type: Literal["judge"]
    # The question, asked as a follow-up turn after the response (None = the default one).
    question: str | None = None
    # A whole-query template with {prompt} and {response} instead; nothing of it is shared
    # between candidates, so every query is computed in full.
    judge_template: str | None = None
    yes_token: str = "Yes"
    no_token: str = "No"


class PythonRewardConfig(_RewardBase):
    """A ``module:function`` taking (prompt, response) and returning a number."""

    type: Literal["python"]
    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    # Optional companion ``module:function`` taking (prompt, partial response) and returning
    # (lower, upper) bounds on the final reward of any completion (docs/rewards.md).
    bounds: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    # Where the function runs: "threads" (a small thread pool in the server: cheap, but a
    # call that never returns holds its thread for good) or "process" (worker processes:
    # pairs cross a pipe, and a call past timeout_s has its worker killed and replaced).
    isolation: Literal["threads", "process"] = "threads"


RewardConfig = Annotated[
    HFRewardConfig | VLLMRewardConfig | JudgeRewardConfig | PythonRewardConfig
    | PRMRewardConfig,
    Field(discriminator="type"),
]


class ModelConfig(BaseModel):
    """The policy model. ``embedded`` is SmolLM2-135M-Instruct shipped in a Python package."""

    model_config = ConfigDict(extra="forbid")

    name: str = EMBEDDED_MODEL  # "embedded", a hub id or a local folder
    served_name: str | None = None  # the id clients send as "model"; defaults to name
    cache_dir: str = "~/.cache/sbon"
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def public_name(self) -> str:
        if self.served_name:
            return self.served_name
        return "smollm2-135m-instruct" if self.name == EMBEDDED_MODEL else self.name


class EngineConfig(BaseModel):
    """Settings passed to vLLM's engine. Defaults suit a small CPU machine."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    max_model_len: int = Field(default=2048, ge=64)
    memory_fraction: float = Field(default=0.3, gt=0.0, le=1.0)  # gpu_memory_utilization
    kv_cache_gib: float | None = Field(default=None, gt=0.0)  # CPU backend KV cache size
    enforce_eager: bool = True
    # torch.compile of vLLM's helper kernels (log-probability ranks, sampling), which on the
    # CPU backend needs a C++ compiler at run time. None = off on the CPU backend when
    # enforce_eager is set (TORCHDYNAMO_DISABLE=1 unless the environment says otherwise),
    # vLLM's default elsewhere; true = on; false = off.
    torch_compile: bool | None = None
    enable_prefix_caching: bool = True
    # Tokens per KV-cache block; the prefix cache reuses whole blocks only. None = 32 on the
    # CPU backend (its default of 128 leaves short shared prefixes uncached), vLLM's own
    # default elsewhere.
    kv_block_size: int | None = Field(default=None, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    # None = vLLM's default, except on the CPU backend, where it is off (see vllm_backend).
    enable_chunked_prefill: bool | None = None
    seed: int = 0
    extra_args: dict[str, Any] = Field(default_factory=dict)  # any other AsyncEngineArgs field


class SBoNDefaults(BaseModel):
    """Soft best-of-n settings used when a request does not give them."""

    enabled: bool = True  # False: requests without an ``sbon`` object get plain decoding
    n: int = Field(default=4, ge=1)
    lam: float = Field(default=1.0, ge=0.0, alias="lambda")
    block_size: int | None = Field(default=None, ge=1)
    normalize: Normalization = Normalization.RAW
    # Nats of KL from uniform per selection; when set, lambda is solved per selection and
    # ``lambda`` is used only by requests that give it.
    kl_budget: float | None = Field(default=None, ge=0.0)
    block_delimiter: str | None = Field(default=None, min_length=1, max_length=64)
    # Early pruning of per-response requests (common/prune.py); None = off. Blockwise
    # requests never take this default.
    prune: PruneSettings | None = None
    # Particles in blockwise mode (engine/particles.py): weights exp(increment / lambda) on
    # raw rewards, resampled when ESS < ess_threshold x n. Per-response requests never take
    # this default.
    particles: bool = False
    ess_threshold: float = Field(default=0.5, gt=0.0, le=1.0)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("lam", mode="before")
    @classmethod
    def _parse_lambda(cls, value: Any) -> Any:
        return parse_lambda(value)

    @model_validator(mode="after")
    def _particles_need_raw_lambda(self) -> SBoNDefaults:
        if self.particles and self.kl_budget is not None:
            raise ValueError("sbon.particles weight by lambda; it excludes sbon.kl_budget")
        if self.particles and self.normalize is not Normalization.RAW:
            raise ValueError("sbon.particles need raw rewards (sbon.normalize: raw)")
        return self


class Limits(BaseModel):
    """Server policy: the work one request may ask for, and the server's total in flight.

    Requests above a per-request limit are refused with a 400 naming the parameter (413 for
    the body) before any work; beyond a server-wide cap the answer is 429 with Retry-After.
    """

    model_config = ConfigDict(extra="forbid")

    max_candidates: int = Field(default=16, ge=1)  # sbon.n
    max_tokens: int = Field(default=1024, ge=1)
    max_blocks: int = Field(default=64, ge=1)
    max_choices: int = Field(default=4, ge=1)  # OpenAI n
    max_prompts: int = Field(default=16, ge=1)  # entries of a completions prompt list
    max_total_choices: int = Field(default=16, ge=1)  # prompts x n
    max_stop_sequences: int = Field(default=16, ge=0)
    max_stop_chars: int = Field(default=256, ge=1)  # characters of one stop sequence
    max_messages: int = Field(default=256, ge=1)  # messages of a chat request
    # Content parts of a chat request, all messages together: counted before they are
    # validated one by one (which takes seconds for 150,000 of them).
    max_content_parts: int = Field(default=4096, ge=1)
    # Characters of one prompt (all its messages together), checked before tokenising.
    max_prompt_chars: int = Field(default=65536, ge=1)
    max_body_bytes: int = Field(default=2_097_152, ge=1024)  # request body; 413 beyond
    # The whole body must arrive within this time (408 beyond): a client that trickles its
    # body cannot hold a connection and a reader open indefinitely.
    body_timeout_s: float = Field(default=30.0, gt=0.0)
    max_concurrent_requests: int = Field(default=16, ge=1)  # completion requests in flight
    # Candidates in flight across the server: a request costs prompts x n x sbon.n, so one
    # large request takes its share and cannot starve many small ones.
    max_candidates_in_flight: int = Field(default=64, ge=1)
    # The whole request: waiting in the engine, generation, scoring (504 beyond).
    request_timeout_s: float = Field(default=300.0, gt=0.0)
    # A streaming client that does not read for this long is cut off and its work aborted.
    send_timeout_s: float = Field(default=30.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> Limits:
        if self.max_candidates_in_flight < self.max_candidates:
            raise ValueError("limits.max_candidates_in_flight must be at least "
                             "limits.max_candidates (one choice of the largest sbon.n)")
        return self


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ServerConfig(BaseModel):
    """The HTTP listener, its access control and its shutdown."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True
    # When set, /v1/*, /metrics and the OpenAPI pages need "Authorization: Bearer <api_key>"
    # (/health stays open for probes). Give it through the environment
    # (SBON_SERVER__API_KEY) or a file (api_key_file), not in config.yaml; it is taken as
    # the text given and never logged. An empty key is an error; one under 16 characters
    # is warned about.
    api_key: SecretStr | None = None
    # A file holding the key (a mounted secret): read as text, one trailing newline
    # dropped. Missing, unreadable or empty is an error; excludes api_key.
    api_key_file: str | None = Field(default=None, min_length=1)
    # On SIGTERM: stop accepting, let in-flight requests finish for up to drain_s seconds,
    # then end the rest with a 503 error (an error frame for streams). Container grace
    # periods must be longer (docker/compose.yaml, docker/k8s).
    drain_s: float = Field(default=30.0, ge=0.0)
    # How often the engine's and the rewards' health is checked; a dead generation engine,
    # or a reward whose engine or worker died, makes the process exit 1.
    engine_check_s: float = Field(default=1.0, gt=0.0, le=3600.0)
    # This many consecutive failures of the default reward make /health answer 503 (so a
    # probe can restart the server); 0 turns the rule off. A dead reward engine always does.
    reward_dead_after_failures: int = Field(default=0, ge=0, le=1_000_000)

    @field_validator("api_key")
    @classmethod
    def _non_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("server.api_key is empty; set a key, or leave it unset (null) "
                             "to serve without authentication")
        return value

    @model_validator(mode="after")
    def _key_from_file(self) -> ServerConfig:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("server.api_key and server.api_key_file are both set; give one")
        self.api_key = SecretStr(read_key_file(self.api_key_file))
        return self

    @property
    def loopback(self) -> bool:
        """Whether the listener is reachable from this machine only."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


def read_key_file(path: str) -> str:
    """The key in ``path``: its text without the trailing line break editors add."""
    file_path = Path(path).expanduser()
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"server.api_key_file: no such file: {file_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"server.api_key_file: cannot read {file_path}: "
                         f"{type(exc).__name__}") from None
    key = text.removesuffix("\n").removesuffix("\r")
    if not key.strip():
        raise ValueError(f"server.api_key_file: {file_path} is empty")
    return key


class DatalogConfig(BaseModel):
    """The distillation log (docs/datalog.md): every selection as one JSON line in ``dir``.

    Off by default. Records hold prompts and responses in clear text; a request opts out
    with ``"sbon": {"log": false}``. A full queue drops records (counted in /metrics) rather
    than slowing requests.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    dir: str = "sbon-datalog"  # created if missing; files sbon-000001.jsonl, ...
    flush_records: int = Field(default=64, ge=1)  # fsync after this many records ...
    flush_seconds: float = Field(default=1.0, gt=0.0)  # ... or this long after the first
    rotate_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)  # start a new file beyond
    queue_size: int = Field(default=10_000, ge=1)  # records waiting; more are dropped


class AppConfig(BaseModel):
    """The whole configuration tree."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: list[RewardConfig]([JudgeRewardConfig(name="judge", type="judge")])
    )
    default_reward: str | None = None  # defaults to the first entry of ``rewards``
    sbon: SBoNDefaults = Field(default_factory=SBoNDefaults)
    limits: Limits = Field(default_factory=Limits)
    server: ServerConfig = Field(default_factory=ServerConfig)
    datalog: DatalogConfig = Field(default_factory=DatalogConfig)

    @model_validator(mode="after")
    def _check_rewards(self) -> AppConfig:
        if not self.rewards:
            raise ValueError("at least one reward must be configured")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if self.default_reward is None:
            self.default_reward = names[0]
        elif self.default_reward not in names:
            raise ValueError(f"default_reward '{self.default_reward}' is not among {names}")
        if self.sbon.n > self.limits.max_candidates:
            raise ValueError("sbon.n exceeds limits.max_candidates")
        return self

    def reward_config(self, name: str) -> RewardConfig | None:
        return next((r for r in self.rewards if r.name == name), None)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path``; a numeric key indexes a list (``rewards.0.model``)."""
    node: Any = tree
    for depth, key in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            index = _list_index(key, node, path)
            if last:
                node[index] = value
                return
            if not isinstance(node[index], dict):
                node[index] = {}
            node = node[index]
            continue
        if last:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict | list):
            child = {}
            node[key] = child
        node = child


def _list_index(key: str, items: list[Any], path: list[str]) -> int:
    dotted = ".".join(path)
    if not key.lstrip("-").isdigit():
        raise ValueError(f"override '{dotted}': '{key}' must be an index into a list")
    index = int(key)
    if not -len(items) <= index < len(items):
        raise ValueError(f"override '{dotted}': index {index} is outside a list of {len(items)}")
    return index


Override = tuple[list[str], str, str]
"""(path, the value's text, where it came from: an environment variable or ``--set``)."""


def env_overrides(environ: Mapping[str, str]) -> list[Override]:
    """``SBON_A__B=v`` becomes ([a, b], "v", "SBON_A__B"); the text is typed later."""
    found = []
    for key, raw in environ.items():
        if (key.startswith(ENV_PREFIX) and "__" in key[len(ENV_PREFIX) :]) or (
            key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() == "default_reward"
        ):
            path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
            found.append((path, raw, key))
    return found


def cli_overrides(items: Iterable[str]) -> list[Override]:
    """``a.b=v`` strings (from ``--set``) become ([a, b], "v", "--set a.b")."""
    found = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key.path=value")
        key, raw = item.split("=", 1)
        found.append(([p.strip() for p in key.split(".")], raw, f"--set {key.strip()}"))
    return found


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Build the configuration: defaults < file < environment < command line."""
    tree: dict[str, Any] = {}
    if path is not None:
        file_path = Path(path).expanduser()
        if not file_path.is_file():
            raise FileNotFoundError(f"configuration file not found: {file_path}")
        loaded = yaml.safe_load(file_path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{file_path}: the top level must be a mapping")
        tree = loaded
    env = os.environ if environ is None else environ
    changes = env_overrides(env) + cli_overrides(overrides)
    defaults: dict[str, Any] | None = None
    for key_path, text, source in changes:
        if len(key_path) > 1 and key_path[1].isdigit() and key_path[0] not in tree:
            # An index into a list the file does not set: start from the default list.
            defaults = defaults or AppConfig().model_dump(mode="json", by_alias=True)
            tree[key_path[0]] = defaults.get(key_path[0], [])
        # By the field's declared type: a string (a key, a name) is the text as given.
        value = typed_value(field_type(AppConfig, tree, key_path), text, source)
        _set_path(tree, key_path, value)
    return AppConfig.model_validate(tree)


MIN_KEY_CHARS = 16  # shorter API keys can be guessed: warned about at start


def config_warnings(config: AppConfig) -> list[str]:
    """Settings that work but are probably not what was meant, for the start-up log."""
    warnings: list[str] = []
    key = config.server.api_key
    if key is not None and len(key.get_secret_value()) < MIN_KEY_CHARS:
        warnings.append(f"server.api_key is shorter than {MIN_KEY_CHARS} characters; "
                        "a long random key is much harder to guess")
    unpinned = [("model", config.model.trust_remote_code, config.model.revision)] + [
        (f"rewards '{r.name}'", r.trust_remote_code, r.revision) for r in config.rewards
        if isinstance(r, HFRewardConfig | PRMRewardConfig | VLLMRewardConfig)]
    for where, trusted, revision in unpinned:
        if trusted and revision is None:
            warnings.append(f"{where}: trust_remote_code runs the model repository's code; "
                            "pin 'revision' to a commit so that code cannot change under you")
    context = config.engine.max_model_len
    for reward in config.rewards:
        length = _reward_length(reward)
        if length is not None and length < context:
            warnings.append(
                f"reward '{reward.name}' reads at most {length} tokens but engine.max_model_len "
                f"is {context}: long conversations lose their oldest prompt tokens for the "
                "reward, and a response longer than that is refused")
    return warnings


def _reward_length(reward: RewardConfig) -> int | None:
    if isinstance(reward, VLLMRewardConfig):
        return reward.max_model_len
    if isinstance(reward, HFRewardConfig | PRMRewardConfig):
        return reward.max_length
    return None


def non_default_values(config: AppConfig) -> dict[str, Any]:
    """The settings that differ from the built-in defaults, for the start-up log.

    ``extra_args`` are passed to vLLM as given and may hold a token: only their keys are
    shown.
    """
    defaults = AppConfig().model_dump(mode="json")
    current = config.model_dump(mode="json")
    return _diff(_redact(defaults), _redact(current), "")


def _redact(values: Any) -> Any:
    """``values`` with every ``extra_args`` value replaced by a placeholder."""
    if isinstance(values, list):
        return [_redact(v) for v in values]
    if not isinstance(values, dict):
        return values
    return {key: {k: "<not logged>" for k in value}
            if key == "extra_args" and isinstance(value, dict) else _redact(value)
            for key, value in values.items()}


def _diff(default: Any, current: Any, prefix: str) -> dict[str, Any]:
    if isinstance(default, dict) and isinstance(current, dict):
        out: dict[str, Any] = {}
        for key, value in current.items():
            out.update(_diff(default.get(key), value, f"{prefix}{key}."))
        return out
    if default != current:
        return {prefix.rstrip("."): current}
    return {}
