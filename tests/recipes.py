"""The shipped recipes (configs/recipes/) and the cluster shape each is written for, with the
inputs a recipe expects built here: the model and data paths are pointed at folders made in code,
nothing else is changed. Shared by the recipes' placement check against each shape
(tests/unit/test_recipes_fit.py) and their dry runs on real raylets of that shape
(tests/integration/test_recipes.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.byo import save_chat_model, write_gsm8k_parquet

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"

# Node groups as deploy/kuberay/raycluster.yaml declares them: (count, CPUs, GPUs, labels). The 70B
# recipe's layout is the reference design's: 8 engines x 4 GPUs, reward model and reference 4 GPUs
# each, 32 learner GPUs.
SHAPES = {
    "qwen2.5-0.5b-gsm8k-1gpu.yaml": [(1, 8, 1, {})],
    "7b-lora-8gpu.yaml": [(1, 96, 8, {"rlhf_generation": 4, "rlhf_scoring": 1, "rlhf_learner": 3})],
    "70b-72gpu.yaml": [(4, 96, 8, {"rlhf_generation": 8}), (1, 96, 8, {"rlhf_scoring": 8}),
                       (4, 96, 8, {"rlhf_learner": 8})],
}


def node_resources(recipe: str) -> list[dict[str, float]]:
    """Each node's resources, as `ray.nodes()` reports them for a cluster of the recipe's shape."""
    return [{"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in labels.items()}}
            for count, cpus, gpus, labels in SHAPES[recipe] for _ in range(count)]


def build_inputs(root: Path) -> dict:
    """A chat model (policy, reference and draft), a reward model folder, and prompt files."""
    from transformers import AutoTokenizer

    from rlhf_cluster.models.scalar_head import RewardModel

    model = save_chat_model(root / "model", positions=8192)  # as long as the longest recipe's max_model_len
    RewardModel.from_lm(model).save_pretrained(root / "rm", AutoTokenizer.from_pretrained(model))
    pq.write_table(pa.table({"prompt": ["What is 2+2?", "What is 3+3?"], "answer": ["\\boxed{4}", "\\boxed{6}"]}),
                   root / "prompts.parquet")  # two: the recipes hold a share of the prompts out
    return {"model": model, "rm": root / "rm", "gsm8k": write_gsm8k_parquet(root / "gsm8k.parquet", 8),
            "gsm8k_test": write_gsm8k_parquet(root / "gsm8k_test.parquet", 4, seed=1),
            "prompts": root / "prompts.parquet"}


def overrides(recipe: str, inputs: dict) -> list[str]:
    """The `--set` values that point a recipe at `inputs`."""
    sets = [f"model.path={inputs['model']}", "run_dir=/tmp/never-written"]
    if recipe.startswith("qwen"):
        return sets + [f"data.path={inputs['gsm8k']}", f"data.eval_path={inputs['gsm8k_test']}"]
    sets.append(f"data.path={inputs['prompts']}")
    name = "rm7b" if recipe.startswith("7b") else "rm70b"
    weight = 0.5 if recipe.startswith("7b") else 1.0
    sets.append(f"scoring.rewards=[{{type: verifier}}, {{type: model, weight: {weight}, models: [{{path: {inputs['rm']}, name: {name}}}]}}]")
    if recipe.startswith("70b"):
        sets.append(f"generation.speculative={{method: draft_model, model: {inputs['model']}, num_speculative_tokens: 4}}")
    return sets


# What the 70B recipe's dry run says of a cluster one generation node short.
SHORT_OF_A_GENERATION_NODE = "the job needs 32 rlhf_generation in all (generation 8 x 4), but the cluster has 24"


def assert_70b_layout(dry_run_stdout: str) -> None:
    """The 70B recipe's plan is the reference design's: 8 engines x 4 GPUs, reward model and
    reference 4 GPUs each, 32 learner ranks of one GPU, 72 GPUs in all."""
    lines = dry_run_stdout.splitlines()
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in lines
            if line.split() and line.split()[0] in ("learner", "generation", "reward", "reference")}
    assert rows["generation"][0] == "8" and "GPU=4" in rows["generation"][1] and "rlhf_generation=4" in rows["generation"][1]
    assert rows["reward"][0] == "1" and "GPU=4" in rows["reward"][1]
    assert rows["reference"][0] == "1" and "GPU=4" in rows["reference"][1]
    assert rows["learner"][0] == "32" and "GPU=1" in rows["learner"][1]
    assert "GPU=72" in next(line for line in lines if line.startswith("in all"))
