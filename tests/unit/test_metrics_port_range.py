"""metrics.port_range: endpoints on one node take the range's free ports in turn, and a full range
is an error that names the field (pods declare the range; a PodMonitor scrapes it)."""

import socket
import urllib.request

import pytest

from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.telemetry.metrics import serve_metrics


def _free_block(size: int) -> int:
    for start in range(20000, 60000, 97):
        socks = []
        try:
            for port in range(start, start + size):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


def test_endpoints_take_free_ports_of_the_range_in_turn():
    first = _free_block(3)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", first))  # another process holds the first port
    try:
        ports = [serve_metrics("127.0.0.1", port_range=(first, first + 2)) for _ in range(2)]
        assert ports == [first + 1, first + 2]
        assert b"python_info" in urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5).read()
        with pytest.raises(RuntimeError, match=r"metrics.port_range \[\d+, \d+\]: every port is taken"):
            serve_metrics("127.0.0.1", port_range=(first, first + 2))
    finally:
        blocker.close()


def test_port_range_is_checked():
    assert load_config(None, ["metrics.port_range=[9100, 9115]"]).metrics.port_range == (9100, 9115)
    with pytest.raises(ConfigError, match="metrics.port_range"):
        load_config(None, ["metrics.port_range=[9200, 9100]"])
