"""Runs a user's agent against the gateway, one call per sample, and turns each episode's trace
into a rollout.

The agent is any function `agent(base_url, api_key, messages)` (named in config as
`module:function`; or an OpenEnv environment server, run by `openenv.OpenEnvAgent`) that talks
to an OpenAI-compatible server at `base_url` with any client, e.g.
`openai.OpenAI(base_url=base_url, api_key=api_key)`, starting from the prompt's `messages`. It may
return a number, the episode's reward from the agent's side (added to the episode's last turn as
a turn reward, combined by `generation.turn_rewards`), or None; the scoring pool scores the
episode's text as it does every sample. The agent runs in a process of its own per slot
(`isolation`, killed at its deadline, its memory capped) or in a thread with a deadline; when the
deadline passes its episode is closed (its further calls are refused). A failed call costs its
sample only (`Rollout.failure`), never the worker.

With a vision-language policy the agent's messages hold the prompt's images as `image_url` parts
(data URLs), and the gateway takes the images the agent sends (`images`): up to the engine's
`limit_mm_per_prompt` an episode, as `generation.agent.image_urls` and `max_image_bytes` allow.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhf_cluster.config import AgentConfig, GenerationConfig
from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.experience.records import Rollout
from rlhf_cluster.gateway.images import ImagePolicy, agent_messages
from rlhf_cluster.gateway.isolation import AgentFailed, AgentProcesses
from rlhf_cluster.gateway.openenv import OpenEnvAgent
from rlhf_cluster.gateway.replies import ReplyParser
from rlhf_cluster.gateway.server import Gateway, start_server
from rlhf_cluster.generation.engine import VLLMEngine
from rlhf_cluster.generation.image_turns import submit_turn_seen
from rlhf_cluster.user_code import FailureRate, import_spec

AgentFunction = Callable[[str, str, list[dict]], "float | None"]
log = logging.getLogger(__name__)
BROKEN_AFTER = 32  # agent calls failing in a row that mean the agent itself is broken
PROJECT = Path(__file__).resolve().parents[2]  # this project's folder: its own agents run in threads by default


def _in_project(agent: AgentFunction) -> bool:
    try:
        source = inspect.getsourcefile(agent)
    except TypeError:  # a builtin, a C extension's callable: not ours
        return False
    return source is not None and Path(source).resolve().is_relative_to(PROJECT)


class AgentBroken(RuntimeError):
    """The agent failed on too many of its recent calls (`generation.agent.max_failure_fraction`) or on
    `BROKEN_AFTER` in a row: the job stops, naming it."""


def load_agent(spec: str, field: str = "generation.agent.function") -> AgentFunction:
    found = import_spec(spec, field, kind="function", example="my_agent:run")
    if not callable(found):
        raise ValueError(
            f"{field}={spec!r}: expected a function agent(base_url, api_key, messages), got {type(found).__name__}"
        )
    return found


class AgentRunner:
    """The gateway of one generation worker (its own HTTP server on the worker's event loop) and
    the agent episodes run through it."""

    def __init__(self, engine: VLLMEngine, cfg: GenerationConfig):
        agent = cfg.agent
        if agent is None:
            raise RuntimeError("an AgentRunner serves agent episodes: generation.agent must be set")
        self.agent_cfg: AgentConfig = agent
        self.cfg, self.engine = cfg, engine
        self.processes: AgentProcesses | None = None
        if agent.environment is not None:  # a public environment format: its episodes in this worker's threads
            self.agent: AgentFunction = OpenEnvAgent(agent.environment, agent.model_name)
        else:
            assert agent.function is not None  # the config holds one of the two
            self.agent = load_agent(agent.function)
            isolated = agent.isolation == "process" or (agent.isolation == "auto" and not _in_project(self.agent))
            if isolated:
                self.processes = AgentProcesses(agent.function, agent.max_concurrent, agent.memory_mb)
        self.failures: dict[str, int] = {}  # failed agent calls by kind (AgentFailed.kind)
        self.failure_rate = FailureRate(
            agent.name,
            agent.max_failure_fraction,
            agent.failure_window,
            BROKEN_AFTER,
        )
        # The agent needs a key either way (the openai client refuses none); one is checked only if set.
        self.api_key = agent.token or secrets.token_hex(8)

        self.gateway = Gateway(
            engine.tokenizer,
            engine_turns(engine),
            model_name=agent.model_name,
            budget=cfg.sampling.max_new_tokens,
            max_model_len=cfg.max_model_len,
            turn_max_tokens=cfg.turn_max_tokens,
            token=agent.token,
            replies=ReplyParser(engine.tokenizer, agent.tool_parser, agent.reasoning_parser),
            samples=agent.samples,
            images=image_policy(engine, agent),
        )
        self.server: object | None = None  # uvicorn's server, once started
        self.url: str | None = None
        # Agents block on HTTP calls: each needs its own thread (the default pool has cores + 4).
        self.threads = ThreadPoolExecutor(agent.max_concurrent, thread_name_prefix="agent")
        self._starting = asyncio.Lock()  # the first episodes of a request all wait for the one start

    async def start(self) -> str:
        """Serve the gateway (once); returns its URL once it listens."""
        async with self._starting:
            if self.server is None:
                await self._serve()
        assert self.url is not None  # `_serve` set it
        return self.url

    async def _serve(self) -> None:
        agent = self.agent_cfg
        self.server, self._serving, port = await start_server(self.gateway, agent.bind_address, agent.port)
        wildcard = agent.bind_address in ("0.0.0.0", "::")
        self.url = f"http://{agent.advertise_address or ('127.0.0.1' if wildcard else agent.bind_address)}:{port}"

    async def episode(self, prompt: Prompt, group_id: str, sample_id: str, greedy: bool) -> tuple[list[Rollout], int]:
        """Run the agent once on `prompt`; returns the episode's rollouts (one, or one per model turn
        where it trains per turn: `generation.agent.samples`) and its history rewrites.
        An agent call that fails (raises, hangs, dies, returns a non-reward) costs only its
        sample: the rollout comes back with its `failure` (logged, counted by kind in
        `failures`), and the driver drops it as it drops a failed reward."""
        url = await self.start()
        episode_id = f"{sample_id}:{uuid.uuid4().hex[:8]}"
        trace = self.gateway.open(episode_id, greedy)
        messages = agent_messages(prompt)  # its images as data URLs
        try:
            result = await self._call(f"{url}/episodes/{episode_id}/v1", messages)
            if result is not None and (isinstance(result, bool) or not isinstance(result, (int, float))):
                raise AgentFailed(
                    "bad_result",
                    f"returned {result!r}; expected a number (the episode's reward from the agent) or None",
                )
        except AgentFailed as exc:
            return [self._failed(trace, prompt, group_id, sample_id, exc)], 0
        finally:
            self.gateway.close(episode_id)
        if result is not None:
            trace.rewards.append(float(result))
        try:
            rollouts = trace.to_rollouts(
                self.engine.tokenizer, prompt.prompt_id, group_id, sample_id, self.engine.name, self.engine.version
            )
        except ValueError as exc:
            return [self._failed(trace, prompt, group_id, sample_id, AgentFailed("bad_result", str(exc)))], 0
        self.failure_rate.ok()
        return rollouts, trace.rewrites

    async def _call(self, base_url: str, messages: list[dict]):
        """One agent call, in its process slot or a thread, bounded by `agent.timeout_s`."""
        timeout = self.agent_cfg.timeout_s
        if self.processes is not None:
            return await self.processes.call(base_url, self.api_key, messages, timeout)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.get_running_loop().run_in_executor(
                    self.threads, self.agent, base_url, self.api_key, messages
                )
        except TimeoutError:
            raise AgentFailed("timeout", f"did not return within generation.agent.timeout_s={timeout:g} s") from None
        except Exception as exc:
            raise AgentFailed("raised", f"raised {type(exc).__name__}: {exc}") from exc

    def _failed(self, trace, prompt: Prompt, group_id: str, sample_id: str, exc: AgentFailed) -> Rollout:
        reason = f"{self.agent_cfg.name} failed on episode {trace.episode_id}: {exc}"
        log.warning(reason)
        self.failures[exc.kind] = self.failures.get(exc.kind, 0) + 1
        broken = self.failure_rate.failed(f"episode {trace.episode_id}: {exc}")
        if broken is not None:  # not a bad episode: a broken agent, whose every sample would be dropped
            raise AgentBroken(broken) from exc
        return Rollout(
            sample_id=sample_id,
            prompt_id=prompt.prompt_id,
            group_id=group_id,
            prompt_ids=list(trace.prompt_ids or []),
            response_ids=[],
            rollout_logprobs=[],
            policy_version=self.engine.version,
            finish_reason="stop",
            worker=self.engine.name,
            loss_mask=[],
            failure=reason,
        )


def engine_turns(engine: VLLMEngine):
    """The gateway's `Generate` over `engine`: a turn, or with images the turn and the context as
    the engine saw it (`image_turns.submit_turn_seen`)."""

    async def generate(context, max_tokens, stop, greedy, images=()):
        if images:
            return await asyncio.wrap_future(submit_turn_seen(engine, context, max_tokens, stop, greedy, images))
        return await asyncio.wrap_future(engine.submit_turn(context, max_tokens, stop, greedy))

    return generate


def image_policy(engine: VLLMEngine, agent: AgentConfig | None) -> ImagePolicy:
    """What the gateway over `engine` takes of images: none for a text-only model; for a
    vision-language one, up to the engine's `limit_mm_per_prompt` a request, as `agent` allows."""
    from rlhf_cluster.generation.multimodal import image_token_id

    token = image_token_id(engine.engine)
    mm = engine.engine.model_config.multimodal_config
    if token is None or mm is None:
        return ImagePolicy()
    limit = mm.get_limit_per_prompt("image")
    return ImagePolicy(
        max_images=limit,
        max_bytes=agent.max_image_bytes if agent else AgentConfig.model_fields["max_image_bytes"].default,
        urls=agent.image_urls if agent else "data",
        image_token_id=token,
        placeholder=engine.tokenizer.decode([token]),
    )
