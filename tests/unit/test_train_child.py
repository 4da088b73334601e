"""`rlhf-cluster train --max-retries`: the supervised child is the same `train` without the retries."""

import sys
from pathlib import Path

from actors.commands.training import _child_argv


def test_the_child_gets_every_option_but_the_retries():
    argv = _child_argv(Path("job.yaml"), ["train.total_steps=3", "seed=1"], "auto", "auto", "delete", True)
    assert argv == [
        sys.executable,
        "-m",
        "actors.commands.cli",
        "train",
        "job.yaml",
        "--set=train.total_steps=3",
        "--set=seed=1",
        "--address",
        "auto",
        "--resume",
        "auto",
        "--overwrite=delete",
        "--debug",
    ]


def test_options_left_out_are_not_passed():
    assert _child_argv(Path("job.yaml"), [], None, None, None, False)[3:] == ["train", "job.yaml"]
