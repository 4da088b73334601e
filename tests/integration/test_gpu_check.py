"""`make gpu-check` cannot rot unseen: its script runs here on the CPU at tiny shapes (the steps a GPU
machine runs at 0.5B: tests/gpu, the learner benchmark with DeepSpeed and a long-sequence batch, the
reference forward and the host hop, the compile parity bisect; the MoE learner step at a tiny
Qwen3-MoE) and writes the one JSON the issue is read from. The 1.5B steps and 0.5B's more sides
(DeepSpeed) are the 0.5B steps again at the tiny shape: the run leaves them out (the 0.5B step times
DeepSpeed's side), and tests/unit/test_bench_helpers.py parses their GPU commands (and every other
step's)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EVERY_STEP = {
    "tests/gpu",
    "learner 0.5B",
    "scoring and host hop 0.5B",
    "profile 0.5B",
    "compile parity",
    "learner MoE",
}


def test_gpu_check_runs_every_step_and_writes_one_report(tmp_path):
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "no-wheels"), "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["smoke"] and report["finished"]
    assert set(report["steps"]) == EVERY_STEP
    assert report["left_out_as_same"] == {"learner 1.5B": "learner 0.5B", "host hop 1.5B": "scoring and host hop 0.5B",
                                          "learner 0.5B, more sides": "learner 0.5B"}
    profiled = report["steps"]["profile 0.5B"]["result"]["sides"]
    assert [p["side"] for p in profiled] == ["ours", "plain"] and all(p["wall_s"] > 0 for p in profiled)
    learner = report["steps"]["learner 0.5B"]["result"]
    rows = learner["figures"]
    # Every side timed on the default batch, ours on the long one too; each alone.
    assert {"ours [default]", "ours, eager [default]", "plain [default]", "ours [256/seq]"} <= set(rows)
    assert "ours, deepspeed [default]" in rows
    assert all(r["seconds_per_step"] > 0 for r in rows.values()), rows
    assert learner["op_counts"]["forward_aten_ops_per_decoder_layer_per_micro_batch"] > 0
    paths = report["steps"]["scoring and host hop 0.5B"]["result"]
    assert {"reference/fp32", "reference/int8"} <= set(paths["reference_forward"])
    assert paths["host_hop"]["named_full_tensors (fp32)"]["gb_per_s"] > 0
    hop = paths["host_hop"]
    assert hop["engine tensors (bf16) packed"]["bytes"] == hop["engine tensors (bf16) staged, no checksum"]["bytes"] > 0
    parity = report["steps"]["compile parity"]["result"]
    assert [v["variant"]["name"] for v in parity["variants"]] == ["dynamo only"] and parity["variants"][0]["passed"]
    assert "tests collected" in "\n".join(report["steps"]["tests/gpu"]["tail"])  # their bodies run in make test
    for step in ("learner 0.5B", "learner MoE"):  # no side failed
        failed = {n: r["error"] for n, r in report["steps"][step]["result"]["figures"].items() if "error" in r}
        assert not failed, (step, failed)
    moe = report["steps"]["learner MoE"]["result"]
    assert moe["config"]["model"]["num_experts"] == 8 and moe["config"]["experts_implementation"]
    assert 0 < moe["config"]["active_parameters"] < moe["config"]["parameters"]  # MFU's N: top-2 of 8 experts
    assert {"ours [default]", "plain [default]"} == set(moe["figures"])
    assert all(r["seconds_per_step"] > 0 and r["real_tokens"] > 0 for r in moe["figures"].values())
    assert "learner MoE: ours [default]" in done.stdout
    assert "learner 0.5B: ours [default]" in done.stdout and "learner 0.5B: ours, deepspeed" in done.stdout
