"""Every recipe's `--dry-run` passes against the resources of the cluster it is written for
(tests/recipes.py), in this process: its config validates, preflight accepts its inputs, and
every pool finds room on the shape's nodes. The same shape one node short of a pool's label is
refused. The 70B plan is the reference design's. (Against real raylets of each shape:
tests/integration/test_recipes.py.)"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from actors.commands import training
from actors.commands.cli import app
from tests.recipes import (
    RECIPES,
    SHAPES,
    SHORT_OF_A_GENERATION_NODE,
    assert_70b_layout,
    build_inputs,
    node_resources,
    overrides,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("recipe-inputs"))


def _dry_run(monkeypatch, recipe: str, inputs: dict, nodes: list[dict]):
    monkeypatch.setattr(training, "cluster_capacity", lambda address, cfg: nodes)
    args = ["train", str(RECIPES / recipe), "--dry-run", "--address", "ray://shape-of-the-recipe:10001"]
    for value in overrides(recipe, inputs):
        args += ["--set", value]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_every_recipe_fits_the_cluster_it_is_written_for(monkeypatch, inputs, recipe):
    result = _dry_run(monkeypatch, recipe, inputs, node_resources(recipe))
    assert result.exit_code == 0, result.output
    assert "dry run ok" in result.output
    if recipe.startswith("70b"):
        assert_70b_layout(result.stdout)


@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_a_node_short_is_refused(monkeypatch, inputs, recipe):
    nodes = node_resources(recipe)
    result = _dry_run(monkeypatch, recipe, inputs, nodes[1:])  # the first node group loses a node
    assert result.exit_code == 2, result.output
    assert "dry run ok" not in result.output and "error:" in result.output
    if recipe.startswith("70b"):  # the first group is the generation nodes'
        assert SHORT_OF_A_GENERATION_NODE in result.output, result.output
