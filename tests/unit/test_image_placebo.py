"""The images placebo: training prompts shown each other's images, a seeded permutation among
prompts with as many images; everything else about each prompt kept."""

from __future__ import annotations

from collections import Counter

from rlhf_cluster.config import DataConfig
from rlhf_cluster.data.placebo import shuffled_images
from rlhf_cluster.data.prompts import Prompt, task_prompts


def test_images_are_permuted_and_nothing_else_changes():
    prompts = task_prompts(DataConfig(task="visual_count", seed=0), 50)
    shuffled, moved = shuffled_images(prompts, seed=1)
    assert shuffled == shuffled_images(prompts, seed=1)[0] and shuffled != shuffled_images(prompts, seed=2)[0]
    assert Counter(p.images for p in shuffled) == Counter(p.images for p in prompts)
    assert [(p.prompt_id, p.text, p.answer) for p in shuffled] == [(p.prompt_id, p.text, p.answer) for p in prompts]
    assert moved == sum(a.images != b.images for a, b in zip(shuffled, prompts)) and moved >= 45
    # The answers no longer go with the images: far fewer prompts keep an image of their own count.
    own = {p.images: p.answer for p in prompts}
    assert sum(own[p.images] == p.answer for p in shuffled) < 25


def test_only_prompts_with_as_many_images_trade():
    one, two = (b"a",), (b"b", b"c")
    prompts = [Prompt("t", "text", "")] + [Prompt(f"o{i}", "q", "", images=one) for i in range(3)]
    prompts += [Prompt("w", "q", "", images=two)]
    shuffled, moved = shuffled_images(prompts, seed=0)
    assert shuffled[0].images == () and shuffled[-1].images == two and moved == 0  # all one-image prompts alike


def test_a_job_with_the_placebo_trains_on_shuffled_images_and_evaluates_on_its_own(tmp_path, model_cache):
    """prepare_inputs: the control reaches the job's training prompts; held-out prompts keep theirs."""
    from rlhf_cluster.config import JobConfig
    from rlhf_cluster.job.inputs import prepare_inputs
    from rlhf_cluster.run.run_dir import RunDir

    def inputs(placebo: bool, root):
        cfg = JobConfig.model_validate({
            "run_dir": str(root), "model": {"cache_dir": model_cache, "tiny": {"architecture": "qwen2_5_vl"}},
            "data": {"task": "visual_count", "num_prompts": 64, "eval_prompts": 8, "chat_template": True,
                     "placebo_images": placebo},
            "generation": {"probe": {"sequences": 0}},
        })  # fmt: skip
        return prepare_inputs(cfg, RunDir(cfg.run_dir, cfg.weights_dir, cfg.checkpoint_dir))

    own, placebo = inputs(False, tmp_path / "own"), inputs(True, tmp_path / "placebo")
    assert [p.prompt_id for p in placebo.prompts] == [p.prompt_id for p in own.prompts]
    assert sum(a.images != b.images for a, b in zip(placebo.prompts, own.prompts)) >= 50
    assert [p.images for p in placebo.eval_prompts] == [p.images for p in own.eval_prompts]
