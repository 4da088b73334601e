"""What each pool asks of the cluster, and whether a cluster can give it (the dry run's check).

Ray-free: the caller passes the cluster's capacity (totals and the largest node), read from
`ray.cluster_resources()` / `ray.nodes()` or, for a local instance, from this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_cluster.config import JobConfig, ResourcesConfig


@dataclass(frozen=True)
class PoolRequest:
    """One pool's actors and the resources each of them needs."""

    pool: str
    field: str  # the config section that sets these resources, for error messages
    replicas: int
    per_actor: dict[str, float]


def _per_actor(res: ResourcesConfig) -> dict[str, float]:
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    return {k: v for k, v in out.items() if v}


def resource_plan(cfg: JobConfig) -> list[PoolRequest]:
    """Every pool of the job with its replica count and per-actor resources."""
    spares = cfg.scoring.spares  # of each scoring pool; a warm spare holds its resources too
    plan = [
        PoolRequest("learner", "learner.resources", cfg.learner.world_size, _per_actor(cfg.learner.resources)),
        PoolRequest(
            "generation",
            "generation.resources",
            cfg.generation.replicas + cfg.generation.spares,  # a warm spare holds its resources too
            _per_actor(cfg.generation.resources),
        ),
        PoolRequest(
            "reward", "scoring.resources", cfg.scoring.reward_replicas + spares, _per_actor(cfg.scoring.resources)
        ),
    ]
    if cfg.critic is not None and cfg.algorithm.advantage == "gae":
        plan.append(PoolRequest("critic", "critic.resources", cfg.critic.world_size, _per_actor(cfg.critic.resources)))
    scoring = _per_actor(cfg.scoring.resources)
    if cfg.scoring.reference and not cfg.learner.lora.enabled:  # with LoRA the learner's base model is the reference
        # With distillation the teacher's pool takes the reference's place (`actors/workers/pool_table.py`).
        name = "reference" if cfg.algorithm.distillation is None else "teacher"
        plan.append(PoolRequest(name, "scoring.resources", cfg.scoring.reference_replicas + spares, scoring))
    if cfg.scoring.judge_source is not None:
        plan.append(PoolRequest("judge", "scoring.resources", cfg.scoring.judge_replicas + spares, scoring))
    return plan


def check_capacity(plan: list[PoolRequest], total: dict[str, float], largest_node: dict[str, float]) -> list[str]:
    """Problems that would keep the job's actors from ever being scheduled (empty: it fits)."""
    problems: list[str] = []
    needed: dict[str, float] = {}
    for req in plan:
        for resource, amount in req.per_actor.items():
            needed[resource] = needed.get(resource, 0.0) + amount * req.replicas
            if amount > largest_node.get(resource, 0.0):
                problems.append(
                    f"{req.pool} pool: each actor needs {amount:g} {resource} ({req.field}), "
                    f"but no node has more than {largest_node.get(resource, 0.0):g}{_custom_hint(resource, total)}"
                )
    for resource, amount in needed.items():
        if amount > total.get(resource, 0.0) + 1e-9:
            parts = ", ".join(
                f"{r.pool} {r.replicas} x {r.per_actor[resource]:g}" for r in plan if r.per_actor.get(resource)
            )
            problems.append(
                f"the job needs {amount:g} {resource} in all ({parts}), but the cluster has "
                f"{total.get(resource, 0.0):g}"
            )
    return problems


def _custom_hint(resource: str, total: dict[str, float]) -> str:
    """For a custom resource (`resources.custom`) no node declares: how a node declares it."""
    if resource in ("CPU", "GPU", "memory") or total.get(resource):
        return ""
    declare = f"ray start --resources='{{\"{resource}\": 1}}'"
    return f" (a custom resource: the nodes that may run it declare it, e.g. {declare})"


def check_packing(plan: list[PoolRequest], nodes: list[dict[str, float]]) -> list[str]:
    """Whether every actor fits on some node at once (first fit, largest actors first), beyond
    the per-actor and total checks: e.g. two 4-GPU engines and eight 1-GPU ranks on 8-GPU nodes
    whose CPUs run out first. Names the pools left unplaced (empty: they all pack)."""
    free = [dict(node) for node in nodes]
    actors = [(req.pool, req.per_actor) for req in plan for _ in range(req.replicas)]
    actors.sort(key=lambda a: (-a[1].get("GPU", 0.0), -sum(a[1].values())))
    unplaced: dict[str, int] = {}
    for pool, need in actors:
        node = next((n for n in free if all(n.get(r, 0.0) + 1e-9 >= v for r, v in need.items())), None)
        if node is None:
            unplaced[pool] = unplaced.get(pool, 0) + 1
            continue
        for r, v in need.items():
            node[r] = node.get(r, 0.0) - v
    if not unplaced:
        return []
    return [
        "the pools do not pack onto the cluster's nodes all at once; left unplaced: "
        + ", ".join(f"{pool} {count}" for pool, count in unplaced.items())
    ]


def check_placement(plan: list[PoolRequest], nodes: list[dict[str, float]]) -> list[str]:
    """Every reason the job's actors could not all be placed on `nodes` (each node's resources):
    an actor larger than every node, totals beyond the cluster's, or actors that do not pack."""
    total: dict[str, float] = {}
    largest: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + v
            largest[k] = max(largest.get(k, 0.0), v)
    return check_capacity(plan, total, largest) or check_packing(plan, nodes)


def format_plan(plan: list[PoolRequest]) -> str:
    """The plan as a small table for the dry run, with the totals it asks of the cluster."""
    lines = [f"{'pool':<12}{'replicas':>9}  per actor"]
    totals: dict[str, float] = {}
    for req in plan:
        per = ", ".join(f"{k}={v:g}" for k, v in req.per_actor.items()) or "(no reserved resources)"
        lines.append(f"{req.pool:<12}{req.replicas:>9}  {per}")
        for k, v in req.per_actor.items():
            totals[k] = totals.get(k, 0.0) + v * req.replicas
    if totals:
        lines.append(
            f"{'in all':<12}{sum(r.replicas for r in plan):>9}  " + ", ".join(f"{k}={v:g}" for k, v in totals.items())
        )
    return "\n".join(lines)
