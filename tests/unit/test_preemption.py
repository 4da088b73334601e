"""SIGTERM/SIGINT: the first asks the job to stop with a checkpoint; a second signal, or the
grace running out, interrupts the main thread."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rlhf_cluster.job.preemption import GracefulStop


class _Job:
    def __init__(self):
        self.stops = 0

    def stop(self):
        self.stops += 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_stops_the_job_a_second_interrupts(sig):
    job = _Job()
    with GracefulStop(grace_s=60) as stop:
        stop.attach(job)
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert job.stops == 1 and stop.received == sig.name
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
            time.sleep(1)
    assert signal.getsignal(sig) is not stop._handle  # the previous handler is back


def test_grace_running_out_interrupts_the_main_thread():
    with GracefulStop(grace_s=0.2) as stop:
        stop.attach(_Job())
        os.kill(os.getpid(), signal.SIGTERM)
        begun = time.perf_counter()
        with pytest.raises(KeyboardInterrupt, match="did not stop within 0.2 s of SIGTERM"):
            time.sleep(30)
        assert time.perf_counter() - begun < 5  # the interrupt woke the sleeping main thread


def test_a_signal_before_the_job_exists_interrupts_at_once():
    with GracefulStop(grace_s=60):
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
