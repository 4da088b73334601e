"""`rlhf-cluster gateway` and `rlhf-cluster tinker` on a port another server holds end at once with
one line naming it (trial 23b: each failed only after minutes of start-up, the gateway's engine
or tinker's Ray and learner, with a ~90-line bind traceback). A real listening socket holds it."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from actors.commands.cli import app


@pytest.fixture
def taken():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_the_gateway_and_tinker_refuse_a_taken_port_before_starting(taken, model_cache, monkeypatch):
    from rlhf_cluster.gateway import standalone

    monkeypatch.setattr(standalone, "serve", lambda *a, **k: pytest.fail("started on a taken port"))
    gateway = CliRunner().invoke(app, ["gateway", "--port", str(taken), "--set", f"model.cache_dir={model_cache}"])
    assert gateway.exit_code == 2, gateway.output
    assert f"127.0.0.1:{taken}: cannot listen there" in gateway.output and "--port N (0: any free one)" in gateway.output
    import actors.workers.tinker as tinker_worker

    monkeypatch.setattr(tinker_worker, "serve", lambda *a, **k: pytest.fail("started on a taken port"))
    monkeypatch.setenv("RLHF_TINKER_TOKEN", "tml-test")
    tinker = CliRunner().invoke(app, ["tinker", "--set", f"port={taken}", "--set", f"model.cache_dir={model_cache}"])
    assert tinker.exit_code == 2, tinker.output
    assert f"127.0.0.1:{taken}: cannot listen there" in tinker.output and "--set port=N" in tinker.output
