"""Configs that load (every field is valid on its own) but that `preflight` refuses, each with the
field its message must name.

Shared by tests/unit/test_preflight.py (preflight alone) and the driver's test (the same list fed
to the Driver, which must refuse it before any Ray call). Each case's `sections` are written over
a base config section by section, so they apply to the default config and to the integration
tests' `job_config(**sections)` alike: every value a case relies on is spelled out in the case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_cluster.config import JobConfig

MISSING = "/nonexistent/rlhf-preflight"  # a path that never exists
PLACEBO = "rlhf_cluster.rewards.controls:placebo_arithmetic"  # an importable reward function


@dataclass(frozen=True)
class BadConfig:
    """One refused config: `sections` over a base, and the field the refusal names."""

    name: str
    sections: dict
    field: str
    reads_files: bool = False  # refused only by a check of a file it names (preflight(files=False) accepts it)
    also: list[str] = field(default_factory=list)  # further strings the message contains


BAD_CONFIGS: list[BadConfig] = [
    # ---- rules between sections ----
    BadConfig("no-task-no-path", {"data": {"task": None, "path": None},
                                  "scoring": {"rewards": [{"type": "function", "function": PLACEBO}]}}, "data.path"),
    BadConfig("verifier-without-task", {"data": {"task": None, "path": f"{MISSING}/prompts.jsonl"}},
              "scoring.rewards[0]", also=["data.task"]),
    BadConfig("tool-task-without-episodes", {"data": {"task": "tool_arithmetic"}, "generation": {"environment": None}},
              "generation.environment", also=["data.task=tool_arithmetic"]),
    BadConfig("buffer-too-small", {"buffer": {"capacity": 1}, "train": {"prompts_per_step": 4, "max_staleness": 1}},
              "buffer.capacity"),
    BadConfig("overlong-buffer-too-long", {"algorithm": {"shaping": {"overlong_buffer": 8}},
                                           "generation": {"sampling": {"n": 4, "max_new_tokens": 8}}},
              "algorithm.shaping.overlong_buffer", also=["generation.sampling.max_new_tokens"]),
    BadConfig("lora-on-deepspeed", {"learner": {"world_size": 1, "backend": "deepspeed", "lora": {"rank": 4}}},
              "learner.lora", also=["learner.backend"]),
    BadConfig("lora-with-kl-in-reward", {"learner": {"world_size": 1, "lora": {"rank": 4}},
                                         "algorithm": {"kl": {"placement": "reward"}}}, "algorithm.kl.placement"),
    BadConfig("grpo-with-one-sample", {"algorithm": {"advantage": "grpo"}, "generation": {"sampling": {"n": 1}}},
              "generation.sampling.n"),
    BadConfig("gae-without-critic", {"algorithm": {"advantage": "gae"}, "generation": {"sampling": {"n": 1}}},
              "algorithm.advantage=gae", also=["`critic` section"]),
    BadConfig("batch-not-divisible-by-learner", {"train": {"prompts_per_step": 3}, "generation": {"sampling": {"n": 3}},
                                                 "learner": {"world_size": 2}}, "learner.world_size=2"),
    BadConfig("batch-not-divisible-by-critic", {"algorithm": {"advantage": "gae"}, "critic": {"world_size": 3},
                                                "generation": {"sampling": {"n": 1}}, "train": {"prompts_per_step": 4},
                                                "learner": {"world_size": 1}}, "critic.world_size=3"),
    BadConfig("empty-mini-batches", {"learner": {"world_size": 1, "mini_batches": 100_000}}, "learner.mini_batches"),
    # ---- files the config names ----
    BadConfig("model-dir-missing", {"model": {"path": f"{MISSING}/model"}}, "model.path", reads_files=True),
    BadConfig("context-past-the-models-positions", {"generation": {"max_model_len": 512}}, "generation.max_model_len",
              reads_files=True, also=["model.tiny.max_position_embeddings", "expected at most 256"]),
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine.
    BadConfig("metrics-bind-address-not-here", {"metrics": {"bind_address": "192.0.2.1", "enabled": True}},
              "metrics.bind_address", reads_files=True, also=["cannot listen there"]),
    BadConfig("prompt-file-missing", {"data": {"task": None, "path": f"{MISSING}/prompts.jsonl"},
                                      "scoring": {"rewards": [{"type": "function", "function": PLACEBO}]}},
              "data.path", reads_files=True),
    BadConfig("reward-function-missing", {"scoring": {"rewards": [{"type": "function", "function": "no_such_rlhf_module:score"}]}},
              "scoring.rewards[0].function", reads_files=True, also=["no_such_rlhf_module"]),
    BadConfig("reward-model-missing", {"scoring": {"rewards": [{"type": "verifier"},
                                                               {"type": "model", "models": [{"path": f"{MISSING}/rm"}]}]}},
              "scoring.rewards[1].models[0].path", reads_files=True),
    BadConfig("critic-init-missing", {"algorithm": {"advantage": "gae"}, "critic": {"init": f"{MISSING}/critic"},
                                      "generation": {"sampling": {"n": 1}}}, "critic.init", reads_files=True),
    BadConfig("deepspeed-json-missing", {"learner": {"world_size": 1, "backend": {"type": "deepspeed",
                                                                                 "config_file": f"{MISSING}/ds.json"}}},
              "learner.backend.config_file", reads_files=True),
]


def merge(base: dict, sections: dict) -> dict:
    """`base` with `sections` written over it, recursively (neither is changed)."""
    out = dict(base)
    for key, value in sections.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(case: BadConfig, base: dict | None = None) -> JobConfig:
    """The case's config over `base` (default: the default config), validated (it loads; preflight refuses it)."""
    return JobConfig.model_validate(merge(base or {}, case.sections))
