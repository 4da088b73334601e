"""The engine skips vLLM's per-token detokenizing for single-turn responses and decodes each
finished one itself: the text must be what vLLM's detokenizer would have given. A request vLLM
refuses (a context past max_model_len, as an agent can send) fails its caller, and the engine
goes on serving. A second engine in the same process gets its own KV cache size (an engine
argument, not the process's environment, where the first engine's size used to stick)."""

from __future__ import annotations

import pytest
import ray


@ray.remote(max_calls=1)  # the worker exits after it, with vLLM's process group
def _texts_both_ways(model_path: str) -> list[tuple[str, str]]:
    """(vLLM's text, ours) for 160 sampled responses. The engine runs in a Ray worker: vLLM
    sets up a torch.distributed group in its process, which would outlive the test here."""
    from rlhf_cluster.config import GenerationConfig, SamplingConfig
    from rlhf_cluster.data.prompts import Prompt
    from rlhf_cluster.generation.engine import VLLMEngine

    engine = VLLMEngine(model_path, GenerationConfig(sampling=SamplingConfig(n=4, max_new_tokens=40)))
    ours, build = engine._sampling_params, engine._rollouts
    pairs = []

    def detokenizing(*args, **kwargs):  # vLLM's detokenizer back on, to compare with
        params = ours(*args, **kwargs)
        if any(p.detokenize for p in params):
            raise AssertionError("single-turn sampling asks vLLM for text again")
        for p in params:
            p.detokenize = True
        return params

    def rollouts(prompt, group_id, outputs):
        built = build(prompt, group_id, outputs)
        pairs.extend((out.outputs[0].text, r.response_text) for out, r in zip(outputs, built))
        return built

    engine._sampling_params, engine._rollouts = detokenizing, rollouts
    try:
        futures = [engine.submit_group(Prompt(f"p{a}", f"{a}+{a * 7 % 50}=", "")) for a in range(40)]
        too_long = engine.submit_turn([5] * 300, 4, [])  # max_model_len is 256
        for future in futures:
            future.result(timeout=120)
        try:
            too_long.result(timeout=120)
            refused = ""
        except Exception as exc:  # noqa: BLE001 - what the caller hears
            refused = f"{type(exc).__name__}: {exc}"
        after = engine.submit_turn([5] * 10, 4, []).result(timeout=120)
        # Held-out evaluation's own sampling (`data.eval_sampling`) in place of the engine's 40 tokens at top_p 1.
        compared = len(pairs)  # (its responses' texts are checked too, not counted among the 160)
        held_out = Prompt("e", "3+4=", "")
        narrow = SamplingConfig(n=4, max_new_tokens=3, ignore_eos=True, top_p=1e-9)
        evaluated = [r.response_ids for r in engine.submit_group(held_out, 4, sampling=narrow).result(timeout=120)]
        greedy = engine.submit_group(held_out, greedy=True, sampling=narrow).result(timeout=120)[0].response_ids
        assert [(v, t) for v, t in pairs[compared:] if v != t] == []
        del pairs[compared:]
        # The second engine of this process, with twice the KV cache, serving beside the first.
        second = VLLMEngine(model_path, GenerationConfig(kv_cache_gb=2, sampling=SamplingConfig(n=1, max_new_tokens=4)),
                            name="gen1")
        try:
            served_by_second = len(second.submit_turn([5] * 10, 4, []).result(timeout=120).token_ids)
            caches = [(e.engine.vllm_config.cache_config.kv_cache_memory_bytes, e.engine.vllm_config.cache_config.num_gpu_blocks)
                      for e in (engine, second)]
        finally:
            second.close()
    finally:
        engine.close()
    return pairs, refused, len(after.token_ids), caches, served_by_second, (evaluated, greedy)


@pytest.fixture(scope="module")
def engine_text_results(ray_cluster, tiny_model_path):
    """One worker process for both tests (a process start is most of their time)."""
    return ray.get(_texts_both_ways.remote(tiny_model_path), timeout=300)


def test_response_text_is_what_vllms_detokenizer_gives(engine_text_results):
    pairs, refused, served_after, *_ = engine_text_results
    assert "maximum context length is 256" in refused and served_after > 0
    assert len(pairs) == 160
    # A random model writes byte soup: many responses end inside a multi-byte character.
    assert [(vllm_text, text) for vllm_text, text in pairs if vllm_text != text] == []


def test_two_engines_in_one_process_each_get_their_own_kv_cache_size(engine_text_results):
    *_, caches, served_by_second, _ = engine_text_results
    (first_bytes, first_blocks), (second_bytes, second_blocks) = caches
    assert (first_bytes, second_bytes) == (1 << 30, 2 << 30), caches
    assert first_blocks > 0 and second_blocks == 2 * first_blocks, caches  # what was really allocated
    assert served_by_second > 0


def test_evaluation_samples_with_its_own_settings(engine_text_results):
    """`data.eval_sampling` reaches vLLM: its max_new_tokens (3, not the engine's 40) bounds every
    answer, and its top_p (near 0) leaves only the likeliest token, so the four sampled answers
    are the greedy one (at training's top_p 1 a random model's four samples differ)."""
    evaluated, greedy = engine_text_results[-1]
    assert [len(ids) for ids in evaluated] == [3, 3, 3, 3] and len(greedy) == 3
    assert all(ids == greedy for ids in evaluated), (evaluated, greedy)
