"""The engine's counters: written by the engine thread only, read (as a snapshot) by anyone."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineCounters:
    prompt_tokens_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    generated_tokens_total: int = 0
    computed_tokens_total: int = 0  # tokens run through the model (prefill chunks + decodes)
    requests_finished_total: int = 0
    requests_failed_total: int = 0
    steps_total: int = 0


@dataclass
class ThroughputMeter:
    """Generated tokens per second over a sliding window of steps."""

    window_s: float = 5.0
    _steps: deque = field(default_factory=deque)  # (time, tokens)

    def add(self, now: float, tokens: int) -> None:
        self._steps.append((now, tokens))
        while now - self._steps[0][0] > self.window_s:
            self._steps.popleft()

    def rate(self) -> float:
        steps = list(self._steps)
        if len(steps) < 2:
            return 0.0
        span = steps[-1][0] - steps[0][0]
        return sum(n for _, n in steps[1:]) / span if span > 0 else 0.0
