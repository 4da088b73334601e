"""One output channel (issue 38): the project's loggers reach the console through tqdm, once."""

from __future__ import annotations

import logging

from tqdm import tqdm

from rlhf_cluster.telemetry.console import PROJECT_LOGGERS, TqdmHandler, attach_console


def test_project_lines_reach_stdout_above_a_progress_bar_and_warnings_say_so(capsys):
    attach_console()
    attach_console()  # a second job in the process adds no second handler
    for name in PROJECT_LOGGERS:
        assert sum(isinstance(h, TqdmHandler) for h in logging.getLogger(name).handlers) == 1
    with tqdm(total=3, desc="train", file=None) as bar:
        logging.getLogger("actors.cluster").info("generation worker gen0 died; replaced by gen1")
        logging.getLogger("rlhf_cluster.run.checkpoint").warning("refusing checkpoint step-00000008")
        bar.update(1)
    out = capsys.readouterr().out
    assert "generation worker gen0 died; replaced by gen1\n" in out
    assert "warning: refusing checkpoint step-00000008\n" in out
    # Other libraries' loggers are left to their own configuration.
    logging.getLogger("vllm.engine").info("not ours")
    assert "not ours" not in capsys.readouterr().out
