"""The dry run's placement checks: per actor, in total, and packed onto the nodes all at once."""

from rlhf_cluster.config import load_config
from rlhf_cluster.job.placement import PoolRequest, check_capacity, check_packing, format_plan, resource_plan


def test_totals_can_fit_while_the_actors_do_not_pack():
    # Two 8-GPU nodes: 16 GPUs in all, enough for three 4-GPU engines and four 1-GPU ranks (16),
    # but each engine also takes 40 CPUs of a node's 64, so only one engine fits per node.
    plan = [PoolRequest("generation", "generation.resources", 3, {"GPU": 4, "CPU": 40}),
            PoolRequest("learner", "learner.resources", 4, {"GPU": 1, "CPU": 1})]
    nodes = [{"GPU": 8, "CPU": 64}, {"GPU": 8, "CPU": 64}]
    total = {"GPU": 16, "CPU": 128}  # 3 x 40 + 4 x 1 = 124 CPUs: fits in total
    assert check_capacity(plan, total, nodes[0]) == []
    assert check_packing(plan, nodes) == [
        "the pools do not pack onto the cluster's nodes all at once; left unplaced: generation 1"]
    assert check_packing(plan, nodes + [{"GPU": 8, "CPU": 64}]) == []


def test_lora_has_no_reference_pool_and_the_plan_shows_totals():
    lora = load_config(None, ["learner.lora={rank: 8}"])
    assert "reference" not in [r.pool for r in resource_plan(lora)]
    cfg = load_config(None, ["generation.replicas=2", "generation.resources={num_gpus: 4}", "learner.world_size=2",
                             "learner.resources={num_gpus: 1}"])
    assert format_plan(resource_plan(cfg)).splitlines()[-1].split() == ["in", "all", "6", "GPU=10"]


def test_the_teacher_and_the_judge_are_pools_of_their_own_in_the_plan():
    distill = load_config(None, ["algorithm.kl.coef=0", "algorithm.distillation={teacher: /teacher}"])
    pools = [r.pool for r in resource_plan(distill)]
    assert "teacher" in pools and "reference" not in pools
    judge = load_config(None, ["scoring.judge_replicas=2",
                               "scoring.rewards=[{type: verifier, weight: 0}, {type: judge, model: /judge}]"])
    (row,) = [r for r in resource_plan(judge) if r.pool == "judge"]
    assert (row.replicas, row.field) == (2, "scoring.resources")
    assert "judge" not in [r.pool for r in resource_plan(load_config())]


def test_warm_spares_hold_their_resources_in_the_plan():
    cfg = load_config(None, ["generation.replicas=2", "generation.spares=1", "scoring.spares=2"])
    replicas = {r.pool: r.replicas for r in resource_plan(cfg)}
    assert (replicas["generation"], replicas["reward"], replicas["reference"]) == (3, 3, 3)


def test_a_custom_resource_no_node_declares_says_how_a_node_declares_it():
    plan = [PoolRequest("learner", "learner.resources", 2, {"CPU": 1, "rlhf_learner": 1}),
            PoolRequest("generation", "generation.resources", 1, {"CPU": 64})]
    nodes = {"CPU": 8}
    problems = check_capacity(plan, nodes, nodes)
    assert problems[0] == (
        "learner pool: each actor needs 1 rlhf_learner (learner.resources), but no node has more than 0 "
        "(a custom resource: the nodes that may run it declare it, e.g. ray start --resources='{\"rlhf_learner\": 1}')")
    assert problems[1] == "generation pool: each actor needs 64 CPU (generation.resources), but no node has more than 8"
    # Declared somewhere, only too small on each node: no hint.
    assert "custom resource" not in " ".join(check_capacity(plan, {"CPU": 128, "rlhf_learner": 4},
                                                            {"CPU": 64, "rlhf_learner": 0.5}))
