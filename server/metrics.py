"""Every Prometheus metric of the service, declared in one place with the ``sbon_`` prefix.

Each app owns its own registry (no module-level mutable state), so several apps can live in
one process (tests). Units are in the names, buckets are explicit, and labels carry only
bounded values: endpoint, status code, phase, reward name. Never prompts or request ids.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "sbon"
PHASES = ("queue", "generation", "scoring", "selection", "total")

# Seconds: CPU runs take tens of seconds, GPU runs tens of milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0, 320.0)
REWARD_BUCKETS = (-20.0, -10.0, -5.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
                  50.0, 100.0, 1000.0)
ESS_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
KL_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "HTTP requests by endpoint and status code.",
            ["endpoint", "status"], registry=r)
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight", "Completion requests being served now.", registry=r)
        self.candidates_in_flight = Gauge(
            f"{PREFIX}_candidates_in_flight", "Candidates admitted and not yet finished "
            "(prompts x n x sbon.n per request; limits.max_candidates_in_flight).", registry=r)
        self.engine_requests = Gauge(
            f"{PREFIX}_engine_unfinished_requests",
            "Engine requests queued or running now (candidates and judge queries).", registry=r)
        self.phase_seconds = Histogram(
            f"{PREFIX}_phase_duration_seconds",
            "Time per request spent in each phase: queue (arrival until generation starts), "
            "generation, reward scoring, selection, and the total.",
            ["phase"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Counter(
            f"{PREFIX}_candidates", "Candidates generated (n per selection).", registry=r)
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated across all candidates.", registry=r)
        self.scored_tokens = Counter(
            f"{PREFIX}_scored_tokens", "Response tokens passed to reward models.", registry=r)
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Tokens of the returned completions.", registry=r)
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.prefill_tokens = Counter(
            f"{PREFIX}_prefill_tokens",
            "Prompt tokens of engine requests by stage (generation, scoring) and by whether "
            "they were computed or served from the prefix cache.",
            ["stage", "source"], registry=r)
        self.computed_tokens = Counter(
            f"{PREFIX}_computed_tokens", "The cost axis: tokens decoded for every candidate "
            "(pruned ones up to where they stopped) plus prompt tokens computed, not cached, "
            "by generation and by engine-backed rewards.", registry=r)
        self.pruned_candidates = Counter(
            f"{PREFIX}_pruned_candidates", "Candidates stopped early by sbon.prune, by mode.",
            ["mode"], registry=r)
        self.selections = Counter(
            f"{PREFIX}_selections", "Soft best-of-n selections (one per block).", registry=r)
        self.chosen_reward = Histogram(
            f"{PREFIX}_chosen_reward", "Reward of the chosen candidate (final selection).",
            ["reward"], buckets=REWARD_BUCKETS, registry=r)
        self.ess = Histogram(
            f"{PREFIX}_effective_sample_size", "Effective sample size of the selection weights "
            "(mean over blocks).", buckets=ESS_BUCKETS, registry=r)
        self.kl_from_uniform = Histogram(
            f"{PREFIX}_kl_from_uniform_nats", "KL of the selection weights from uniform, summed "
            "over blocks.", buckets=KL_BUCKETS, registry=r)
        self.kl_estimate = Histogram(
            f"{PREFIX}_kl_estimate_nats", "Best-of-n KL estimator D(eps), summed over blocks.",
            buckets=KL_BUCKETS, registry=r)

        self.datalog_records = Counter(
            f"{PREFIX}_datalog_records", "Distillation log records by outcome: written "
            "(fsynced), dropped (the queue was full) or failed (a write error).",
            ["outcome"], registry=r)
        self.datalog_queue = Gauge(
            f"{PREFIX}_datalog_queue_records", "Distillation log records waiting to be "
            "written.", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
