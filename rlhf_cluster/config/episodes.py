"""Episodes in the generation pool: how an environment's per-turn rewards combine (`turn_rewards`)
and an agent served through the OpenAI-compatible gateway (`agent`, its OpenEnv environment).
`GenerationConfig` holds both sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rlhf_cluster.config.base import FailureBudget, _Strict, _Typed


class TurnRewardsConfig(_Strict):
    """How the rewards a multi-turn environment gives each model turn (`StepResult.reward`) enter
    the episode's reward, beside the scoring pool's final one (`rlhf_cluster.rewards.turns`)."""

    combine: Literal["none", "sum", "last", "weighted"] = Field(
        "none",
        description="none: turn rewards are ignored; sum: final + the turns' sum; last: final + the last "
        "turn's; weighted: final + weight x the turns' sum. Default none, but sum with generation.agent (the "
        "reward an agent returns, or an OpenEnv environment's, is a turn reward).",
    )
    weight: float = Field(1.0, description="`weighted`: the factor on the turns' sum.")
    assign: Literal["episode", "turn"] = Field(
        "episode",
        description="episode: every token of the episode gets the episode's advantage; turn: each model "
        "turn's tokens get the advantage of that turn's return (the rewards from that turn on, discounted by `gamma` "
        "per turn), against the group's baseline of episode returns (GRPO, Dr.GRPO, RLOO; needs combine sum or "
        "weighted).",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="`assign: turn`: the discount per turn.")

    @model_validator(mode="after")
    def _turn_credit_needs_added_rewards(self) -> TurnRewardsConfig:
        if self.assign == "turn" and self.combine not in ("sum", "weighted"):
            raise ValueError(
                f"assign 'turn' splits the episode's reward by the turns that earned it, so combine must be "
                f"'sum' or 'weighted', not {self.combine!r}"
            )
        return self


def is_loopback(address: str) -> bool:
    """Whether an address to bind is reachable only from this machine."""
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


class OpenEnvEnvironment(_Typed):
    """An OpenEnv environment server (the `openenv-core` format: an `Environment` served by its
    `create_fastapi_app`) as the agent: per sample one episode over the server's WebSocket session
    (`rlhf_cluster/gateway/openenv.py`): reset, then the model's reply to each observation is the
    action, until the environment says done or `max_turns`; the episode's reward is the sum of the
    steps' rewards."""

    type: Literal["openenv"] = Field("openenv", description="Environment format.")
    url: str = Field(..., description="The environment server's base URL (http://host:port).")
    action_field: str = Field("message", description="The Action field the model's reply text goes into.")
    observation_field: str | None = Field(
        None,
        description="The observation field shown to the model as the user's turn (None: the whole observation, JSON).",
    )
    max_turns: int = Field(8, ge=1, description="Steps at most per episode.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens per reply (None: the gateway's per-turn budget).")
    seed_from_prompt: bool = Field(
        True,
        description="reset(seed=...) from the prompt's text, so every sample of a prompt's group meets the same "
        "task (GRPO compares them); false: the environment picks.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Seconds to connect, and per reset or step reply.")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ValueError(f"{url!r}: expected the server's base URL, http://host:port")
        return url.rstrip("/")


class AgentConfig(FailureBudget):
    """Agent episodes through the OpenAI-compatible gateway (`rlhf_cluster.gateway`): each sample
    is one call of the user's agent function (or one episode of an `environment`), whose requests to
    the gateway are recorded token for token."""

    function: str | None = Field(
        None,
        description="`module:function` called as agent(base_url, api_key, messages) per sample; "
        "returns the agent's reward (a number) or None. Or set `environment`.",
    )
    environment: OpenEnvEnvironment | None = Field(
        None,
        description="A public environment format run as the agent, in place of `function`: "
        "{type: openenv, url, action_field, observation_field, max_turns}.",
    )
    timeout_s: float = Field(300.0, gt=0, description="An agent call that has not returned by then fails the request.")
    max_concurrent: int = Field(64, ge=1, description="Agent calls running at once per generation worker (threads).")
    bind_address: str = Field("127.0.0.1", description="Where each worker's gateway listens (loopback by default).")
    port: int = Field(0, ge=0, le=65535, description="Gateway port (0: any free port; each worker serves its own).")
    advertise_address: str | None = Field(
        None, description="The host agents reach the gateway at (None: bind_address, or 127.0.0.1 for a wildcard)."
    )
    token: str | None = Field(
        None, description="Bearer token every call must carry (required when bind_address is not loopback)."
    )
    model_name: str = Field("policy", description="The model id the gateway reports and accepts.")
    samples: Literal["auto", "episode", "turn"] = Field(
        "auto",
        description="What an episode trains as. `episode`: one sample, the episode's whole token sequence (model "
        "turns in the loss, what the agent added between them masked out); a request that rewrites earlier messages "
        "(strips a <think> block, summarises the history) is refused with HTTP 409, since no one sequence holds both "
        "contexts. `turn`: each model turn is its own sample, its prompt the context the engine saw for that turn "
        "(the agent's messages as sent, rendered by the chat template), its response that turn's tokens; the "
        "episode's reward goes to every turn and advantages are computed over episodes. `auto`: `episode` until an "
        "episode rewrites its history, `turn` for that episode.",
    )
    isolation: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where each episode's agent call runs: `process` (one child process per agent.max_concurrent "
        "slot, killed at timeout_s, its memory capped at memory_mb; a crash or hang costs only its sample) or "
        "`thread` (in the worker's process: a hung call keeps its thread). `auto`: process for agents from "
        "outside this project's folder.",
    )
    memory_mb: int = Field(
        4096, ge=64, description="With isolation process: address space an agent call may add to its process."
    )
    tool_parser: str = Field(
        "hermes",
        description="How the model's tool calls are read back into OpenAI `tool_calls`: a tool parser of the "
        "installed vLLM, by the name `vllm serve --tool-call-parser` takes (hermes, llama3_json, mistral, "
        "qwen3_coder, kimi_k2, openai, ...; checked at preflight).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="A reasoning parser of the installed vLLM (`vllm serve --reasoning-parser`: qwen3, "
        "deepseek_r1, ...) that splits the model's thinking into `reasoning_content`; None: none.",
    )
    image_urls: Literal["data", "any"] = Field(
        "data",
        description="A vision-language policy's `image_url` parts: `data` takes base64 data URLs "
        "(data:image/png;base64,...) only and refuses http(s) URLs with a 400; `any` also fetches http(s) URLs "
        "(from the generation worker, size-capped, 10 s timeout).",
    )
    max_image_bytes: int = Field(
        16 * 2**20,
        ge=1,
        description="An image part larger than this (encoded bytes) is refused with a 400 naming the part.",
    )

    @property
    def name(self) -> str:
        """How errors and logs name the agent."""
        if self.environment is not None:
            return f"generation.agent.environment ({self.environment.type} at {self.environment.url})"
        return f"generation.agent.function={self.function!r}"

    @model_validator(mode="after")
    def _one_agent(self) -> AgentConfig:
        if (self.function is None) == (self.environment is None):
            raise ValueError(
                "generation.agent: set one of `function` (module:function) and `environment` ({type: openenv, url})"
            )
        if self.environment is not None and self.isolation == "process":
            raise ValueError(
                "generation.agent.isolation: process runs a function in a child process; an environment's episodes "
                "run in the worker's threads (the environment itself runs in its own server): use auto or thread"
            )
        return self

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AgentConfig:
        if not is_loopback(self.bind_address) and not self.token:
            raise ValueError(
                f"generation.agent.token: the gateway binds {self.bind_address!r}, reachable from other "
                "hosts, so every call must carry a token; set one (or bind 127.0.0.1)"
            )
        return self
