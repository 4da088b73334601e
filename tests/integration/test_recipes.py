"""Every recipe under configs/recipes/ passes `--dry-run` against a Ray cluster of its shape:
raylets started on this machine, each declaring a node's GPUs, CPUs and pool labels (the custom
resources deploy/kuberay/ gives its node groups). The model and data paths a recipe expects are
pointed at folders built here; nothing else is changed. The 70B recipe's layout is the
reference design's: 8 engines x 4 GPUs, reward model and reference 4 GPUs each, 32 learner GPUs.
The same cluster one generation node short is refused."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.byo import save_chat_model, write_gsm8k_parquet

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")
RECIPES = REPO / "configs" / "recipes"

# Node groups as deploy/kuberay/raycluster.yaml declares them: (count, CPUs, GPUs, labels).
SHAPES = {
    "qwen2.5-0.5b-gsm8k-1gpu.yaml": [(1, 8, 1, {})],
    "7b-lora-8gpu.yaml": [(1, 96, 8, {"rlhf_generation": 4, "rlhf_scoring": 1, "rlhf_learner": 3})],
    "70b-72gpu.yaml": [(4, 96, 8, {"rlhf_generation": 8}), (1, 96, 8, {"rlhf_scoring": 8}),
                       (4, 96, 8, {"rlhf_learner": 8})],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A chat model (policy, reference and draft), a reward model folder, and prompt files."""
    from rlhf_cluster.scoring.reward_model import RewardModel

    root = tmp_path_factory.mktemp("recipe-inputs")
    model = save_chat_model(root / "model")
    from transformers import AutoTokenizer

    RewardModel.from_lm(model).save_pretrained(root / "rm", AutoTokenizer.from_pretrained(model))
    pq.write_table(pa.table({"prompt": ["What is 2+2?"], "answer": ["\\boxed{4}"]}), root / "prompts.parquet")
    return {"model": model, "rm": root / "rm", "gsm8k": write_gsm8k_parquet(root / "gsm8k.parquet", 8),
            "prompts": root / "prompts.parquet"}


def _overrides(recipe: str, inputs: dict) -> list[str]:
    sets = [f"model.path={inputs['model']}", "run_dir=/tmp/never-written"]
    if recipe.startswith("qwen"):
        return sets + [f"data.path={inputs['gsm8k']}"]
    sets.append(f"data.path={inputs['prompts']}")
    name = "rm7b" if recipe.startswith("7b") else "rm70b"
    weight = 0.5 if recipe.startswith("7b") else 1.0
    sets.append(f"scoring.rewards=[{{type: verifier}}, {{type: model, weight: {weight}, models: [{{path: {inputs['rm']}, name: {name}}}]}}]")
    if recipe.startswith("70b"):
        sets.append(f"generation.speculative={{method: draft_model, model: {inputs['model']}, num_speculative_tokens: 4}}")
    return sets


@contextlib.contextmanager
def _cluster_of(shape: list[tuple]):
    """Raylets on this machine, one per node of `shape`, started together."""
    from ray.cluster_utils import Cluster

    cluster = Cluster()
    try:
        nodes = [cluster.add_node(num_cpus=cpus, num_gpus=gpus, resources=labels, include_dashboard=False, wait=False)
                 for count, cpus, gpus, labels in shape for _ in range(count)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()


def _dry_run(recipe: str, inputs: dict, address: str) -> subprocess.CompletedProcess:
    args = [CLI, "train", str(RECIPES / recipe), "--dry-run", "--address", address]
    for s in _overrides(recipe, inputs):
        args += ["--set", s]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_recipe_dry_runs_on_a_cluster_of_its_shape(recipe, inputs):
    with _cluster_of(SHAPES[recipe]) as (cluster, nodes):
        out = _dry_run(recipe, inputs, cluster.address)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "dry run ok" in out.stdout
        if not recipe.startswith("70b"):
            return
        rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()
                if line.split() and line.split()[0] in ("learner", "generation", "reward", "reference")}
        assert rows["generation"][0] == "8" and "GPU=4" in rows["generation"][1] and "rlhf_generation=4" in rows["generation"][1]
        assert rows["reward"][0] == "1" and "GPU=4" in rows["reward"][1]
        assert rows["reference"][0] == "1" and "GPU=4" in rows["reference"][1]
        assert rows["learner"][0] == "32" and "GPU=1" in rows["learner"][1]
        assert "GPU=72" in next(line for line in out.stdout.splitlines() if line.startswith("in all"))

        # One generation node short (the head is the first generation node; the last one goes):
        cluster.remove_node(nodes[3])
        short = _dry_run(recipe, inputs, cluster.address)
        assert short.returncode == 2
        assert "the job needs 32 rlhf_generation in all (generation 8 x 4), but the cluster has 24" in short.stderr, short.stderr
