"""Held-out evaluation scores its answers in parts of whole prompts (`actors/evaluation._by_prompt`):
a batch reward function's call sees about a training call's size, never a prompt split."""

from __future__ import annotations

from actors.evaluation import _by_prompt
from rlhf_cluster.experience.records import Rollout


def _rollouts(counts: list[int]) -> list[Rollout]:
    return [
        Rollout(f"s{p}-{i}", f"p{p}", f"g{p}", [1], [2], [0.0], 0, "stop", "x")
        for p, n in enumerate(counts)
        for i in range(n)
    ]


def test_parts_hold_whole_prompts_in_order_up_to_the_size():
    rollouts = _rollouts([3, 3, 3, 5, 1])
    parts = _by_prompt(rollouts, 6)
    assert [[r.prompt_id for r in part] for part in parts] == [
        ["p0"] * 3 + ["p1"] * 3, ["p2"] * 3, ["p3"] * 5 + ["p4"]]  # fmt: skip
    assert [r for part in parts for r in part] == rollouts
    assert [len(part) for part in _by_prompt(_rollouts([8, 2]), 6)] == [8, 2]  # a prompt over the size: alone
    assert _by_prompt([], 6) == []


def test_each_part_is_scored_with_its_own_prompts_and_the_scores_keep_their_order():
    import asyncio
    from types import SimpleNamespace

    from actors.evaluation import EVAL_SCORING_CALL, _judged
    from rlhf_cluster.data.prompts import Prompt

    prompts = [Prompt(f"p{i}", f"q{i}", str(i)) for i in range(40)]
    rollouts = [r for i in range(40) for r in _rollouts([0] * i + [3])[-3:]]  # 3 answers of each prompt, in order
    sent: list[tuple[list[str], set[str]]] = []

    async def call(pool, method, *args):
        if pool == "generation":
            return "gen0", rollouts
        part, contexts = args
        sent.append(([r.prompt_id for r in part], set(contexts)))
        await asyncio.sleep(0.001 * (len(sent) % 3))  # answered out of order
        return "reward0", [(float(r.prompt_id[1:]), {"correct": 1.0}) for r in part]

    cluster = SimpleNamespace(call=call, pools={"reward": [object(), object()]})
    correct, rewards = asyncio.run(_judged(cluster, prompts, 0, samples=3))
    assert rewards == [float(r.prompt_id[1:]) for r in rollouts]  # in the rollouts' order
    assert all(len(ids) <= EVAL_SCORING_CALL and set(ids) == own for ids, own in sent)
    assert len(sent) > 1 and len(correct) == 40


def test_accuracy_is_reported_only_where_the_reward_says_which_answers_are_right():
    """Trial 23a B3: a reward function returning a number (no `correct` component) had held-out
    accuracy and pass@k a constant 0 (and `guardrails.patience` stopped a run whose every answer
    earned 1.0). Now such a run reports its held-out reward alone (greedy and sampled); verl's
    `acc` component counts as the verifier's `correct` does."""
    import asyncio
    from types import SimpleNamespace

    from actors.evaluation import evaluate
    from rlhf_cluster.config import DataConfig
    from rlhf_cluster.data.prompts import Prompt

    prompts = [Prompt(f"p{i}", f"q{i}", str(i)) for i in range(4)]

    def run(components: dict, samples: int = 2) -> dict:
        async def call(pool, method, *args):
            if pool == "generation":
                _, _, n = args
                return "gen0", [r for i in range(4) for r in _rollouts([0] * i + [max(n, 1)])[-max(n, 1) :]]
            part, _ = args
            return "reward0", [(1.0 if r.prompt_id != "p0" else 0.0, dict(components)) for r in part]

        cluster = SimpleNamespace(call=call, pools={"reward": [object()]})
        data = DataConfig(eval_samples=samples, eval_pass_k=[1, 2])
        return asyncio.run(evaluate(cluster, prompts, 0, data))

    bare = run({})
    assert bare == {"eval_reward_mean": 0.75, "eval_sampled_reward_mean": 0.75}
    verl = run({"acc": 1.0})
    assert verl["eval_accuracy"] == verl["eval_sampled_accuracy"] == verl["eval_pass@2"] == 1.0
    verifier = run({"correct": 0.0, "acc": 1.0})  # the verifier's `correct` first
    assert verifier["eval_accuracy"] == 0.0 and verifier["eval_reward_mean"] == 0.75
