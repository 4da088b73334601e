"""Sampling for the Tinker service on a real vLLM engine (CPU, tiny model): the base model and two
sampler adapters (peft folders of different ranks and weights, written here) served side by side.
Every log-prob the engine returns is checked against a Hugging Face forward of the same tokens on
the base model or on base + that adapter; requests on both adapters in flight at once each get
their own adapter's; stops end a sample with the stop's tokens kept; a removed sampler is refused
by name.

The engine runs in one child process for the whole module (its start is most of the time): vLLM
sets up a torch.distributed group and process-wide settings in its process. No Ray."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from rlhf_cluster.tinker.records import SampleSpec

TOLERANCE = 1e-4  # the engine tests' (test_lora, test_vlm_weight_push)
PROMPT = [5, 17, 42, 9, 101, 33, 7]
ADAPTERS = {  # name -> (rank, seed, target modules)
    "s1": (4, 1, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    "s2": (8, 2, ("q_proj", "v_proj", "down_proj")),
}
_engine = None  # the child's engine and adapter library
_library = None


def _write_adapter(model_path: str, folder: Path, rank: int, seed: int, targets: tuple[str, ...]) -> None:
    """A peft adapter with random nonzero A and B (peft starts B at zero), as the learner writes one."""
    from peft import LoraConfig, get_peft_model

    from rlhf_cluster.models.modeling import load_causal_lm

    model = get_peft_model(
        load_causal_lm(model_path), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(str(folder))


def _hf_model(model_path: str, folder: Path | None):
    from rlhf_cluster.models.modeling import load_causal_lm

    model = load_causal_lm(model_path)
    if folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    return model.eval()


def _hf_logprobs(model, ids: list[int], temperature: float = 1.0) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, the logits divided by `temperature`."""
    with torch.no_grad():
        logp = (model(input_ids=torch.tensor([ids])).logits.float() / temperature).log_softmax(-1)[0]
    return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


# ---- in the child process -----------------------------------------------------------------------
def _start(model_path: str, folders: dict[str, str]) -> None:
    global _engine, _library
    from rlhf_cluster.config import GenerationConfig
    from rlhf_cluster.generation.adapter_library import AdapterLibrary
    from rlhf_cluster.generation.engine import VLLMEngine
    from rlhf_cluster.generation.sampling import load_adapter, sampling_config

    # Three adapters (two samplers and the base's zero adapter) on two places: vLLM juggles them.
    _library = AdapterLibrary(max_rank=8, max_loras=2)
    _engine = VLLMEngine(model_path, sampling_config(GenerationConfig(max_num_seqs=16), _library))
    for name, folder in folders.items():
        load_adapter(_engine, _library, name, folder)


def _sample(jobs: list[tuple[str | None, list[int], int, SampleSpec]]):
    """Every job (sampler, prompt, n, spec) in flight at once; their results in order, and the
    largest number of different adapters vLLM ran in one step meanwhile."""
    from rlhf_cluster.generation.sampling import sample_on

    assert _engine is not None and _library is not None
    runner = _engine.engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    manager = runner.lora_manager
    seen: list[int] = []
    apply = manager._apply_adapters

    def counting(requests):  # the adapters of one engine step
        seen.append(len({r.lora_int_id for r in requests if r}))
        return apply(requests)

    manager._apply_adapters = counting
    try:
        futures = [sample_on(_engine, _library, name, prompt, n, spec) for name, prompt, n, spec in jobs]
        return [f.result(timeout=120) for f in futures], max(seen, default=0)
    finally:
        manager._apply_adapters = apply


def _base_logprobs(prompt: list[int], response: list[int]) -> list[float]:
    assert _engine is not None
    return _engine.logprobs_of(prompt, response)


def _stop() -> None:
    assert _engine is not None and _library is not None
    _engine.close()
    _library.close()


def _remove_while_sampling(name: str):
    """Remove `name` while a sample on it runs: what the running sample got, whether the
    adapter's folder outlived the removal until it finished, and what later calls for it hear."""
    from rlhf_cluster.generation.sampling import drop_adapter, sample_on

    assert _engine is not None and _library is not None
    folder = Path(_library.request(name).lora_path)
    running = sample_on(_engine, _library, name, PROMPT, 2, SampleSpec(max_tokens=48, seed=1))
    drop_adapter(_engine, _library, name)  # vLLM drops it too: the running sample reloads it
    kept = folder.exists() and not running.done()
    result = running.result(timeout=120)
    errors = []
    for call in (lambda: _library.request(name), lambda: sample_on(_engine, _library, name, PROMPT, 1, SampleSpec())):
        try:
            call()
            errors.append("")
        except KeyError as exc:
            errors.append(str(exc))
    return result, kept, folder.exists(), errors, _library.names()


# ---- the parent ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_folders(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("samplers")
    folders = {}
    for name, (rank, seed, targets) in ADAPTERS.items():
        folders[name] = root / name
        _write_adapter(tiny_model_path, folders[name], rank, seed, targets)
    return folders


@pytest.fixture(scope="module")
def served(tiny_model_path, adapter_folders):
    """(run in the engine's process, model path, adapter folders)."""
    folders = adapter_folders
    pool = ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(tiny_model_path, {k: str(v) for k, v in folders.items()}),
    )
    try:

        def run(fn, *args):
            return pool.submit(fn, *args).result(timeout=300)

        yield run, tiny_model_path, folders
        run(_stop)
    finally:
        pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def models(served):
    _, path, folders = served
    return {None: _hf_model(path, None), **{name: _hf_model(path, f) for name, f in folders.items()}}


def _gap(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want)
    return max((abs(a - b) for a, b in zip(got, want)), default=0.0)


def test_base_model_samples_carry_the_log_probs_of_their_tokens(served, models):
    run, *_ = served
    (result,), _ = run(_sample, [(None, PROMPT, 3, SampleSpec(max_tokens=12, seed=0))])
    assert len(result.sequences) == 3 and result.prompt_logprobs is None
    assert len({tuple(s.tokens) for s in result.sequences}) > 1  # each its own draw
    for seq in result.sequences:
        assert 0 < len(seq.tokens) == len(seq.logprobs) <= 12
        assert seq.stop_reason == ("length" if len(seq.tokens) == 12 else "stop")
        assert _gap(seq.logprobs, run(_base_logprobs, PROMPT, seq.tokens)) < TOLERANCE
        assert _gap(seq.logprobs, _hf_logprobs(models[None], PROMPT + seq.tokens)[len(PROMPT) - 1 :]) < TOLERANCE


def test_each_adapter_samples_with_its_own_weights_also_when_both_run_at_once(served, models):
    run, *_ = served
    spec = SampleSpec(max_tokens=10, seed=3, prompt_logprobs=True)
    jobs = [("s1", PROMPT, 2, spec), ("s2", PROMPT, 2, spec), (None, PROMPT, 1, spec)] * 2
    results, most_at_once = run(_sample, jobs)
    assert most_at_once == 2  # vLLM on CPU ran both adapters in one step (max_loras=2)
    for (name, *_), result in zip(jobs, results):
        model = models[name]
        assert _gap(result.prompt_logprobs[1:], _hf_logprobs(model, PROMPT)) < TOLERANCE, name
        for seq in result.sequences:
            want = _hf_logprobs(model, PROMPT + seq.tokens)[len(PROMPT) - 1 :]
            assert _gap(seq.logprobs, want) < TOLERANCE, name
    # The same tokens score differently under each adapter (and the base): the weights differ.
    lps = {name: _hf_logprobs(models[name], PROMPT) for name in (None, "s1", "s2")}
    assert min(_gap(lps[a], lps[b]) for a, b in [(None, "s1"), (None, "s2"), ("s1", "s2")]) > 1e-2


def test_prompt_log_probs_start_with_none_and_are_the_models(served, models):
    run, *_ = served
    spec = SampleSpec(max_tokens=4, temperature=0.7, seed=5, prompt_logprobs=True)
    (result,), _ = run(_sample, [("s2", PROMPT, 1, spec)])
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(PROMPT)
    # The model's own, whatever the sampling temperature...
    assert _gap(result.prompt_logprobs[1:], _hf_logprobs(models["s2"], PROMPT)) < TOLERANCE
    # A prompt of several KV blocks, cached by an earlier request: all of it still scored.
    long_prompt = PROMPT * 6
    run(_sample, [("s2", long_prompt, 1, SampleSpec(max_tokens=1))])
    (cached,), _ = run(_sample, [("s2", long_prompt, 1, SampleSpec(max_tokens=1, prompt_logprobs=True))])
    assert _gap(cached.prompt_logprobs[1:], _hf_logprobs(models["s2"], long_prompt)) < TOLERANCE
    # ...while the sampled tokens' are those they were drawn with (after temperature), as in rollouts.
    tokens = result.sequences[0].tokens
    want = _hf_logprobs(models["s2"], PROMPT + tokens, temperature=0.7)[len(PROMPT) - 1 :]
    assert _gap(result.sequences[0].logprobs, want) < TOLERANCE


def _stop_at(tokenizer, tokens: list[int]) -> int | None:
    """A position k >= 2 whose token's text (printable ASCII) appears nowhere before it: a stop
    string and a stop token that first occur at k."""
    for k in range(2, len(tokens)):
        text = tokenizer.decode([tokens[k]])
        if text.isascii() and text.strip() and text.isprintable() and text not in tokenizer.decode(tokens[:k]):
            if tokens[k] not in tokens[:k]:
                return k
    return None


def test_stops_end_a_sample_with_the_stops_tokens_kept(served, models, tiny_model_path):
    from transformers import AutoTokenizer

    run, *_ = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    seeds = range(11, 17)
    results, _ = run(_sample, [("s1", PROMPT, 1, SampleSpec(max_tokens=24, seed=s)) for s in seeds])
    unstopped = [r.sequences[0] for r in results]
    assert all(s.stop_reason == ("length" if len(s.tokens) == 24 else "stop") for s in unstopped)
    seed, full, k = next((s, u, k) for s, u in zip(seeds, unstopped) if (k := _stop_at(tokenizer, u.tokens)))
    # The same seed draws the same tokens, up to the stop and with it.
    by_token = SampleSpec(max_tokens=24, seed=seed, stop_token_ids=(full.tokens[k],))
    by_string = SampleSpec(max_tokens=24, seed=seed, stop_strings=(tokenizer.decode([full.tokens[k]]),))
    results, _ = run(_sample, [("s1", PROMPT, 1, by_token), ("s1", PROMPT, 1, by_string)])
    for result in results:
        stopped = result.sequences[0]
        assert stopped.stop_reason == "stop" and stopped.tokens == full.tokens[: k + 1]
        assert stopped.logprobs == pytest.approx(full.logprobs[: k + 1], abs=TOLERANCE)
    short = SampleSpec(max_tokens=k, seed=seed, stop_token_ids=(full.tokens[k],))  # the limit comes first
    greedy = SampleSpec(max_tokens=k, temperature=0.0, stop_token_ids=(full.tokens[k],))
    (result, greedy_result), _ = run(_sample, [("s1", PROMPT, 1, short), ("s1", PROMPT, 3, greedy)])
    assert result.sequences[0].tokens == full.tokens[:k] and result.sequences[0].stop_reason == "length"
    assert len(greedy_result.sequences) == 3 and len({tuple(s.tokens) for s in greedy_result.sequences}) == 1
    # Greedy: each token the likeliest, its log-prob the model's own (no temperature to divide by).
    first = greedy_result.sequences[0]
    with torch.no_grad():
        logits = models["s1"](input_ids=torch.tensor([PROMPT + first.tokens])).logits[0, len(PROMPT) - 1 : -1]
    assert first.tokens[: len(logits)] == logits.argmax(-1).tolist()[: len(first.tokens)]
    assert _gap(first.logprobs, _hf_logprobs(models["s1"], PROMPT + first.tokens)[len(PROMPT) - 1 :]) < TOLERANCE


def test_a_removed_sampler_finishes_its_running_samples_then_is_refused_by_name(served, models):
    run, *_ = served
    result, kept_while_running, kept_after, errors, left = run(_remove_while_sampling, "s2")
    assert kept_while_running and not kept_after
    for seq in result.sequences:  # still on its own adapter to the end
        assert _gap(seq.logprobs, _hf_logprobs(models["s2"], PROMPT + seq.tokens)[len(PROMPT) - 1 :]) < TOLERANCE
    assert all("'s2'" in e for e in errors), errors
    assert left == ["s1"]


# ---- the library alone (no engine) --------------------------------------------------------------
def test_the_library_copies_each_adapter_under_an_id_of_its_own(adapter_folders, tmp_path):
    from safetensors.torch import load_file

    from rlhf_cluster.generation.adapter_library import AdapterLibrary, lora_engine_args

    folders = adapter_folders
    assert lora_engine_args(4, 2) == {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2, "max_cpu_loras": 2}
    assert lora_engine_args(33, 1, 3)["max_lora_rank"] == 64
    with pytest.raises(ValueError, match="max_cpu_loras"):
        lora_engine_args(8, 4, 2)
    library = AdapterLibrary(max_rank=4, max_loras=2, root=str(tmp_path))
    try:
        with pytest.raises(ValueError, match="'s2': adapter rank 8"):
            library.add("s2", folders["s2"])
        assert library.base() is None  # no adapter yet: base-model requests carry none
        first = library.add("a", folders["s1"])
        base = library.base()  # now the zero copy of the first adapter (vLLM CPU's index -1: the last slot)
        assert base is not None and base.lora_int_id not in (first.lora_int_id,)
        zeros = load_file(str(Path(base.lora_path) / "adapter_model.safetensors"))
        assert zeros.keys() == load_file(str(folders["s1"] / "adapter_model.safetensors")).keys()
        assert all(not t.any() for t in zeros.values())
        second = library.add("b", folders["s1"])
        again = library.add("a", folders["s1"])  # new weights for a sampler: a new adapter to vLLM
        assert len({first.lora_int_id, second.lora_int_id, again.lora_int_id, base.lora_int_id}) == 4
        assert again != first  # vLLM's LoRARequest equality is by name: the name carries the id
        assert library.request("a") == again and library.names() == ["a", "b"]
        assert Path(again.lora_path).parent == library.root and not Path(first.lora_path).exists()
        held = library.hold("b")
        library.remove("b")  # a sample on it may still run: its folder stays until released
        assert Path(held.lora_path).exists() and library.names() == ["a"]
        library.release(held)
        assert not Path(held.lora_path).exists()
        with pytest.raises(KeyError, match="'b'"):
            library.hold("b")
    finally:
        library.close()
    assert not library.root.exists()
