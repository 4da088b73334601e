"""Every recipe under configs/recipes/ passes `--dry-run` against a Ray cluster of its shape:
raylets started on this machine, each declaring a node's GPUs, CPUs and pool labels (the custom
resources deploy/kuberay/ gives its node groups); shapes and inputs: tests/recipes.py. The same
70B cluster one generation node short is refused.

`make test` runs the 7B LoRA recipe here (one raylet whose labels are custom resources: the
placement read from a real cluster, through the CLI's --address); every recipe's dry run against
its shape's resources, the 70B layout and its refusal one node short included, is a unit test
(tests/unit/test_recipes_fit.py); `make test-slow` runs every recipe here (the 70B one on nine
raylets)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.recipes import RECIPES, SHAPES, SHORT_OF_A_GENERATION_NODE, assert_70b_layout, build_inputs, overrides

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "rlhf-cluster")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("recipe-inputs"))


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
    for s in overrides(recipe, inputs):
        args += ["--set", s]
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_recipe_is_tested():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("recipe", [r if r.startswith("7b") else pytest.param(r, marks=pytest.mark.slow)
                                    for r in sorted(SHAPES)])
def test_recipe_dry_runs_on_a_cluster_of_its_shape(recipe, inputs):
    with _cluster_of(SHAPES[recipe]) as (cluster, nodes):
        out = _dry_run(recipe, inputs, cluster.address)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "dry run ok" in out.stdout
        if not recipe.startswith("70b"):
            return
        assert_70b_layout(out.stdout)
        # One generation node short (the head is the first generation node; the last one goes):
        cluster.remove_node(nodes[3])
        short = _dry_run(recipe, inputs, cluster.address)
        assert short.returncode == 2
        assert SHORT_OF_A_GENERATION_NODE in short.stderr, short.stderr
