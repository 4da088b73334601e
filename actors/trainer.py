"""The trainer: the policy's rank group and, for PPO with a critic, the critic's; trains a step's
batch on both at once and publishes the policy's result as the next weight version (during a
critic warm-up, `critic.freeze_policy_steps`, the critic alone trains and the version holds the
policy's unchanged weights)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial

import ray

from actors.workers._common import heartbeat
from actors.workers.critic import CriticRank
from actors.workers.learner import LearnerRank
from actors.workers.rank_group import PLACEMENT_TIMEOUT_S, PlacementError, RankGroup, deal, interleave
from actors.workers.settings import CriticRankSettings, LearnerRankSettings
from rlhf_cluster.config import FaultsConfig, JobConfig
from rlhf_cluster.experience.build import finalize_batch
from rlhf_cluster.experience.records import ScoredSample, TrainBatch
from rlhf_cluster.generation.probe import Probe
from rlhf_cluster.job.elastic import shrunk_learner
from rlhf_cluster.job.override import JobOverride
from rlhf_cluster.run.run_dir import RunDir
from rlhf_cluster.telemetry import metrics as m
from rlhf_cluster.weights.buckets import now as delivery_time
from rlhf_cluster.weights.messages import Delivery, Publication
from rlhf_cluster.weights.shares import merge_publications

log = logging.getLogger(__name__)


class Trainer:
    """Owns the learner's RankGroup (and the critic's): step, publish, checkpoint, kill."""

    def __init__(
        self,
        cfg: JobConfig,
        model_path: str,
        probe: Probe | None,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ):
        self.cfg = cfg
        w = cfg.learner.world_size
        learner_settings = policy_rank_settings(cfg)  # each rank gets its section, not the whole job
        self.held_steps = policy_held_steps(cfg)
        self.stepped = False  # whether `train` ran: a run's first step logs a warm-up it starts inside
        self.policy = RankGroup(
            LearnerRank,
            lambda r: (learner_settings, model_path, r, w, probe),
            cfg.learner.resources,
            w,
            placement_timeout_s=placement_timeout_s,
        )
        self.critic: RankGroup | None = None
        if cfg.algorithm.advantage == "gae":  # PPO with a learned critic
            try:
                critic = cfg.critic
                if critic is None:  # preflight refuses this config; a Trainer built without preflight may see it
                    raise RuntimeError("algorithm.advantage gae trains a critic: the config has no `critic` section")
                cw = critic.world_size
                critic_settings = CriticRankSettings.of(cfg)
                self.critic = RankGroup(
                    CriticRank, lambda r: (critic_settings, model_path, r, cw), critic.resources, cw, section="critic"
                )
            except BaseException:
                self.policy.kill()
                raise

    @property
    def infos(self) -> dict[str, dict[str, dict]]:
        """Every rank's info (metrics endpoint, pid) by group, for scrape targets."""
        return {"learner": self.policy.infos, **({"critic": self.critic.infos} if self.critic else {})}

    def groups(self) -> list[RankGroup]:
        return [self.policy] + ([self.critic] if self.critic else [])

    async def watch(self, faults: FaultsConfig, on_spans: Callable[[list[dict]], None]) -> None:
        """Heartbeat every rank of both groups until they end; a hung rank is killed (and timed in
        `rlhf_fault_detection_seconds`), which fails the step in flight like a dead rank. The
        trace spans the ranks answer with go to `on_spans`."""

        def hung(group: str, rank: int, detected_s: float) -> None:
            m.HUNG_DETECTION_SECONDS.labels(job=self.cfg.name, pool=group, worker=f"rank{rank}").observe(detected_s)
            log.info(f"{group} rank {rank} was hung (no heartbeat answer): detected in {detected_s:.1f} s")

        await asyncio.gather(*(group.watch(faults, partial(hung, group.section), on_spans) for group in self.groups()))

    async def collect_spans(self, timeout_s: float) -> list[dict]:
        """One heartbeat round to every rank now: the trace spans recorded since the last one."""
        beats = await asyncio.gather(*(heartbeat(rank, timeout_s) for group in self.groups() for rank in group))
        return [span for beat in beats for span in beat.spans]

    async def train(
        self, step: int, samples: list[ScoredSample], kl_coef: float
    ) -> tuple[dict[str, float], Awaitable[Publication]]:
        """One step on every rank; the policy's result is published as version step + 1 (during a
        critic warm-up, `critic.freeze_policy_steps`, its unchanged weights: only the critic trains).
        Returns the step's stats and its publication: the one that came back with the step (done
        already), else rank 0's answer when it has published."""
        values = None
        if self.critic is not None:
            # The critic's values of this batch, before either model steps, give the GAE advantages
            # the policy trains on and the returns the critic regresses to.
            shares = [TrainBatch.from_samples(share) for share in deal(samples, self.critic.world_size)]
            values = interleave(await asyncio.gather(*self.critic.split("values", shares)))
        batch, stats = finalize_batch(samples, self.cfg.algorithm, kl_coef, values)
        created_at = delivery_time()  # the version's identity, the same on every rank that sends a share
        shares = batch.policy_shares(self.policy.world_size)
        held = step < self.held_steps  # the job's step: a resumed job continues the warm-up's count
        if (line := warm_up_line(step, self.held_steps, first=not self.stepped)) is not None:
            log.info(line)
        self.stepped = True
        if held:  # critic warm-up: the policy ranks run no training pass and publish their weights as they are
            policy_step = self.policy.split("hold", shares, step + 1, created_at)
        else:
            reset = self.cfg.resets_optimizer(step + 1)  # ProRL: the optimizer cleared with the reference's reset
            policy_step = self.policy.split("train", shares, step + 1, kl_coef, created_at, reset)
        steps = [asyncio.gather(*policy_step)]
        if self.critic is not None:
            steps.append(asyncio.gather(*self.critic.split("train", batch.critic_shares(self.critic.world_size))))
        # The two groups train on the same batch at the same time; rank 0 speaks for each.
        policy, *critic = await asyncio.gather(*steps)
        metrics, publication = policy[0]
        publication = _merged(step + 1, publication, [p for _, p in policy[1:]])
        stats.update(metrics)
        for group_stats in critic:
            stats.update(group_stats[0])
        stats["kl_coef"] = kl_coef
        if self.critic is not None:
            stats["policy/updated"] = float(not held)
        if publication is None:
            return stats, self.policy.leader.wait_published.remote(step + 1)
        done: asyncio.Future[Publication] = asyncio.get_running_loop().create_future()
        done.set_result(publication)
        return stats, done

    def publish_now(self, version: int) -> Delivery:
        """Publish the policy's current weights as `version` (persisted in the store whatever the
        transport) and wait until they are durable; returns their `delivery`."""
        self.policy.call("publish", version, True)
        published: Publication = ray.get(self.policy.leader.wait_published.remote(version))
        ray.get(self.policy.leader.wait_persisted.remote())
        return published.delivery

    def send(self, delivery: Delivery) -> ray.ObjectRef:
        """The policy's rank 0 takes part in pushing `delivery` (see `LearnerRank.send`)."""
        return self.policy.leader.send.remote(delivery)

    async def wait_persisted(self) -> None:
        """Until every version queued for the store is durable (the job's end)."""
        await self.policy.leader.wait_persisted.remote()

    def load_checkpoint(self, path) -> dict[str, list[str]]:
        """Every rank restores from the job checkpoint at `path`; the restored states' digests by group."""
        digests = {"rank_digests": self.policy.call("load_checkpoint", str(path))}
        if self.critic is not None:
            digests["critic_rank_digests"] = self.critic.call("load_checkpoint", str(path / RunDir.CRITIC))
        self.stepped = False  # the next step is a restored run's first: it logs a warm-up it is inside
        return digests

    async def stage_checkpoint(self, tmp) -> dict[str, list[str]]:
        """Every rank stages its state under `tmp` (written in the background); the staged digests."""
        digests = {"rank_digests": await asyncio.gather(*self.policy.submit("save_checkpoint", str(tmp)))}
        if self.critic is not None:
            digests["critic_rank_digests"] = await asyncio.gather(
                *self.critic.submit("save_checkpoint", str(tmp / RunDir.CRITIC))
            )
        return digests

    async def wait_checkpoint(self) -> None:
        await asyncio.gather(*[ref for group in self.groups() for ref in group.submit("wait_checkpoint")])

    def kill(self) -> None:
        for group in self.groups():
            group.kill()


def _merged(version: int, leader: Publication | None, others: list[Publication | None]) -> Publication | None:
    """Rank 0's publication of `version`, merged with the other ranks' shares where the transport
    deals the tensors to the ranks (each rank publishes its share); else rank 0's as it is."""
    parts = [p for p in others if p is not None]
    if not parts:
        return leader
    if leader is None or len(parts) != len(others):
        raise RuntimeError(
            f"version {version}: {len(parts) + (leader is not None)} of "
            f"{len(others) + 1} learner ranks published their share"
        )
    return merge_publications([leader, *parts])


def policy_held_steps(cfg: JobConfig) -> int:
    """The job's first steps that train the critic alone (`critic.freeze_policy_steps`; 0 without a
    critic, which only `algorithm.advantage: gae` trains)."""
    return cfg.critic.freeze_policy_steps if cfg.algorithm.advantage == "gae" and cfg.critic is not None else 0


def policy_rank_settings(cfg: JobConfig) -> LearnerRankSettings:
    """The policy ranks' settings. Under a critic warm-up the policy's LR schedule counts its own
    updates only (its scheduler steps when it updates, as veRL's actor's does), so it spans
    train.total_steps - freeze_policy_steps of them: `learner.lr_warmup_steps` start at its first
    update and a cosine or linear decay still ends at the job's last step. When versions are
    persisted still follows the job's steps (`total_steps` of the settings)."""
    settings = LearnerRankSettings.of(cfg)
    held = policy_held_steps(cfg)
    if not held:
        return settings
    return replace(settings, spec=replace(settings.spec, total_steps=cfg.train.total_steps - held))


def warm_up_line(step: int, held_steps: int, first: bool) -> str | None:
    """The log line of a critic warm-up at `step` (None: none): its start, at a run's `first` step
    inside it (step 0, or a resume or rollback into it), and the policy's first update after it."""
    if first and step < held_steps:
        resumed = f" (from step {step})" if step else ""
        return (
            f"critic warm-up: steps {step}..{held_steps - 1} train the critic alone{resumed}, "
            f"{held_steps} in all (critic.freeze_policy_steps)"
        )
    if step == held_steps > 0:
        return f"step {step}: critic warm-up done ({held_steps} steps); the policy trains from this step on"
    return None


def start_trainer(
    cfg: JobConfig, override: JobOverride, model_path: str, probe: Probe | None
) -> tuple[Trainer, JobOverride]:
    """A trainer with the learner of `cfg` (the job's config) as `override` has it now; with
    `faults.elastic`, when its ranks cannot all be placed within `faults.elastic_wait_s`, one
    with as many as can be (`shrunk_learner`). Returns the trainer and the override it runs
    under (`override` itself unless the learner shrank)."""
    wanted = override.apply(cfg)
    if not cfg.faults.elastic:
        return Trainer(wanted, model_path, probe), override
    try:
        return Trainer(wanted, model_path, probe, placement_timeout_s=cfg.faults.elastic_wait_s), override
    except PlacementError as exc:
        smaller = shrunk_learner(cfg, override, exc.placeable)
        log.info(
            f"learner: {wanted.learner.world_size} ranks could not be placed in {cfg.faults.elastic_wait_s:g} s "
            f"({exc.placeable} can be); continuing on {smaller.learner_world_size} (faults.elastic)"
        )
        return Trainer(smaller.apply(cfg), model_path, probe), smaller


async def watch_learners(current: Callable[[], Trainer], faults: FaultsConfig, on_spans: Callable[[list[dict]], None]):
    """Heartbeat the current trainer's ranks, and after a rollback or a rebuild the new ones
    (`current()` is the trainer of the moment): a hung rank is killed, so the step in flight
    fails and the driver rolls back as for a dead one."""
    while True:
        trainer = current()
        await trainer.watch(faults, on_spans)
        while current() is trainer:  # until the rebuild has made the next ranks
            await asyncio.sleep(faults.heartbeat_interval_s)
