"""What makes a generation worker start fast: vLLM imported with the GC paused and its objects
frozen, and no torch.compile in an engine that runs eager (docs/performance.md, "Job start")."""

import gc
import os

import pytest

from rlhf_cluster.config import GenerationConfig
from rlhf_cluster.generation.gc_pause import imports_without_gc
from rlhf_cluster.generation import vllm_process


@pytest.fixture
def restore_gc():
    was = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if was else gc.disable)()


def test_the_collector_is_paused_inside_and_what_was_made_is_frozen(restore_gc):
    gc.enable()
    gc.unfreeze()
    with imports_without_gc():
        assert not gc.isenabled()
        made = [[i] for i in range(1000)]  # tracked containers, as an import makes
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(made)


def test_a_collector_that_was_off_stays_off(restore_gc):
    gc.disable()
    with imports_without_gc():
        pass
    assert not gc.isenabled()


@pytest.mark.parametrize("enforce_eager, cuda, disabled", [(None, False, True), (None, True, False), (True, True, True),
                                                           (False, False, False)])
def test_only_an_eager_engine_turns_torch_compile_off(monkeypatch, enforce_eager, cuda, disabled):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "recorded")  # so that teardown restores the process's value
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_NO_USAGE_STATS", "VLLM_LOGGING_LEVEL"):
        monkeypatch.setenv(name, "kept")  # setdefault: the test leaves the process's values alone
    monkeypatch.setattr(vllm_process, "_process_eager", None)  # as in a process that has no engine yet
    monkeypatch.setattr(vllm_process.torch.cuda, "is_available", lambda: cuda)
    cfg = GenerationConfig(enforce_eager=enforce_eager)
    assert vllm_process.runs_eager(cfg) == (enforce_eager if enforce_eager is not None else not cuda)
    vllm_process.configure_vllm_environment(cfg)
    assert (os.environ.get("TORCHDYNAMO_DISABLE") == "1") == disabled


def test_a_second_engine_of_another_eager_mode_is_refused_and_the_kv_size_is_per_engine(monkeypatch, caplog):
    monkeypatch.setattr(vllm_process.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_process, "_process_eager", None)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "recorded")
    monkeypatch.setenv(vllm_process.KV_CACHE_ENV, "7")  # would size every engine of the process alike
    with caplog.at_level("WARNING"):
        vllm_process.configure_vllm_environment(GenerationConfig(kv_cache_gb=1))
    assert vllm_process.KV_CACHE_ENV not in os.environ and "generation.kv_cache_gb" in caplog.text
    vllm_process.configure_vllm_environment(GenerationConfig(kv_cache_gb=2))  # same eager mode: fine
    assert [vllm_process.cpu_kv_cache_bytes(GenerationConfig(kv_cache_gb=g)) for g in (1, 2)] == [1 << 30, 2 << 30]
    with pytest.raises(RuntimeError, match="generation.enforce_eager"):
        vllm_process.configure_vllm_environment(GenerationConfig(enforce_eager=False))
