"""Prometheus metrics, one registry per process (tests build their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.replies = Counter(
            "parley_replies", "Replies by outcome.", ["platform", "outcome"], registry=r
        )
        self.first_token = Histogram(
            "parley_time_to_first_token_seconds",
            "From the turn starting to the backend's first chunk.",
            buckets=SECONDS,
            registry=r,
        )
        self.first_visible = Histogram(
            "parley_time_to_first_visible_seconds",
            "From the turn starting to the first answer text shown on the platform.",
            buckets=SECONDS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "parley_tokens_per_second",
            "Generation speed of each reply as the backend reports it.",
            buckets=(1, 5, 10, 20, 40, 80, 160, 320),
            registry=r,
        )
        self.edits_per_reply = Histogram(
            "parley_edits_per_reply",
            "Platform edits made for one reply.",
            buckets=(0, 1, 2, 5, 10, 20, 50, 100),
            registry=r,
        )
        self.platform_rate_limited = Counter(
            "parley_platform_rate_limited",
            "Platform 429s met while replying.",
            ["platform"],
            registry=r,
        )
        self.user_rate_limited = Counter(
            "parley_user_rate_limited",
            "Requests refused by the per-user limits.",
            ["platform"],
            registry=r,
        )
        self.in_flight = Gauge(
            "parley_generations_in_flight", "Generations running in this process.", registry=r
        )
        self.backend_errors = Counter(
            "parley_backend_errors", "Backend errors by kind.", ["backend", "kind"], registry=r
        )

        self.tokens = Counter(
            "parley_tokens",
            "Tokens the backends reported, by backend, model and kind (prompt, completion).",
            ["backend", "model", "kind"],
            registry=r,
        )

        self.feedback = Counter(
            "parley_feedback",
            "Votes on replies (one per person and reply; a changed vote counts anew).",
            ["model", "vote"],
            registry=r,
        )
        self.feedback_retracted = Counter(
            "parley_feedback_retracted",
            "Votes changed away from (feedback minus this is the votes standing).",
            ["model", "vote"],
            registry=r,
        )
        self.tool_calls = Counter(
            "parley_tool_calls",
            "Tool calls run for models (web_search, web_fetch), by outcome (ok, error).",
            ["tool", "outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
