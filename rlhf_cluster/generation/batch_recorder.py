"""A vLLM stat logger that keeps the engine's batch size per step (what shows whether requests
arriving one at a time really share engine steps)."""

from __future__ import annotations

from collections.abc import Callable


class EngineBatchRecorder:
    """A vLLM stat logger that keeps the engine's batch size (running requests) after each step.

    This is vLLM's own scheduler accounting (`SchedulerStats.num_running_reqs`), the number of
    sequences the engine decoded together; it is what shows whether requests that arrive one at a
    time really share engine steps.
    """

    def __init__(self, on_step: Callable[[int, int], None] | None = None):
        self.on_step = on_step
        self.steps = 0
        self.max_running = 0
        self.running_total = 0
        self.generated_tokens = 0  # sampled tokens, counted per engine step

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if iteration_stats is not None:
            self.generated_tokens += iteration_stats.num_generation_tokens
        if scheduler_stats is None:
            return
        running = scheduler_stats.num_running_reqs
        self.steps += 1
        self.max_running = max(self.max_running, running)
        self.running_total += running
        if self.on_step is not None:
            self.on_step(running, scheduler_stats.num_waiting_reqs)

    def log_engine_initialized(self) -> None:  # the StatLoggerBase interface
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "max_batch": self.max_running,
            "mean_batch": self.running_total / self.steps if self.steps else 0.0,
        }
