"""With image prompts the job's mismatch probe is off, and its log line points at the metrics.jsonl
columns that still measure the mismatch on samples: they must be columns a step writes (the line
named `mismatch/*`, which no step writes; they are `correction/mismatch_k1` and `_k3`)."""

from __future__ import annotations

import logging
import re

from rlhf_cluster.data.prompts import Prompt
from rlhf_cluster.job.inputs import build_job_probe
from rlhf_cluster.telemetry.metrics import STEP_GAUGES


def test_the_probe_off_line_names_columns_the_steps_write(job_config, caplog):
    cfg = job_config(generation={"probe": {"sequences": 4}})
    prompts = [Prompt("p0", "What is shown?", "a cat", images=(b"\x89PNG",))]
    with caplog.at_level(logging.INFO, logger="rlhf_cluster.job.inputs"):
        assert build_job_probe(cfg, None, prompts) is None
    [line] = [r.getMessage() for r in caplog.records if "mismatch probe off" in r.getMessage()]
    named = re.findall(r"[\w]+/[\w*]+", line)
    assert named == ["correction/mismatch_k1", "correction/mismatch_k3"], line
    assert all(column in STEP_GAUGES for column in named)
