from __future__ import annotations

import asyncio

import pytest

from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.metrics import Registry, serve_metrics


def test_counter_gauge_histogram_render_in_prometheus_text_format() -> None:
    reg = Registry()
    c = reg.counter("trustmesh_things_total", "things done", ["outcome"])
    c.inc(outcome="ok")
    c.inc(2, outcome='we"ird\n')
    g = reg.gauge("trustmesh_streams", "open streams")
    g.set(3)
    g.dec()
    h = reg.histogram("trustmesh_latency_seconds", "latency", buckets=(0.1, 1.0))
    h.observe(0.1)
    h.observe(0.5)
    h.observe(7)
    text = reg.render()
    assert "# TYPE trustmesh_things_total counter" in text
    assert 'trustmesh_things_total{outcome="ok"} 1' in text
    assert 'trustmesh_things_total{outcome="we\\"ird\\n"} 2' in text
    assert "trustmesh_streams 2" in text
    assert 'trustmesh_latency_seconds_bucket{le="0.1"} 1' in text  # le is inclusive
    assert 'trustmesh_latency_seconds_bucket{le="1.0"} 2' in text  # prometheus_client prints bounds as floats
    assert 'trustmesh_latency_seconds_bucket{le="+Inf"} 3' in text
    assert "trustmesh_latency_seconds_count 3" in text
    assert h.count() == 3


def test_labels_must_match_the_declaration() -> None:
    reg = Registry()
    c = reg.counter("trustmesh_x_total", "x", ["a"])
    with pytest.raises(ValueError):
        c.inc(b="1")
    assert reg.counter("trustmesh_x_total", "x", ["a"]) is c
    with pytest.raises(ValueError):
        reg.gauge("trustmesh_x_total", "x", ["a"])


async def test_http_endpoint_serves_metrics_and_404s_the_rest() -> None:
    reg = Registry()
    reg.counter("trustmesh_up_total", "up").inc()
    server = await serve_metrics(reg, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        bodies = {}
        for path, status in (("/metrics", b"200"), ("/other", b"404")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            bodies[path] = await reader.read()
            writer.close()
            assert bodies[path].split(b" ")[1] == status
        assert b"trustmesh_up_total 1" in bodies["/metrics"]
        assert b"trustmesh_up_total" not in bodies["/other"]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("text", "want"), [("127.0.0.1:9090", ("127.0.0.1", 9090)), (":9090", ("0.0.0.0", 9090)),
                                            ("[::1]:80", ("::1", 80))])
def test_split_host_port(text: str, want: tuple[str, int]) -> None:
    assert split_host_port(text, listening=True) == want
    assert split_host_port(join_host_port(*want)) == want  # and back


@pytest.mark.parametrize("text", ["9090", "host:", "host:port", "host:65536"])
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text, listening=True)


def test_an_address_to_connect_to_names_its_host() -> None:
    with pytest.raises(ValueError, match="use host:port"):
        split_host_port(":9090")


def test_each_registry_is_its_own_with_process_and_build_metrics() -> None:
    from trustmesh import __version__

    one, two = Registry(), Registry()
    one.counter("trustmesh_only_here_total", "x").inc()
    two.counter("trustmesh_only_here_total", "x")  # the same name in another registry: no clash
    assert "trustmesh_only_here_total 1" in one.render()
    assert "trustmesh_only_here_total 0" in two.render()
    text = one.render()
    assert "process_resident_memory_bytes " in text and "process_cpu_seconds_total " in text
    assert f'trustmesh_build_info{{version="{__version__}"}} 1' in text
    assert "_created" not in text  # no start-time series beside every counter and histogram


def test_counters_are_named_total_and_values_read_back() -> None:
    reg = Registry()
    with pytest.raises(ValueError):
        reg.counter("trustmesh_things", "a counter without _total would be renamed by the exposition")
    g = reg.gauge("trustmesh_expiry_timestamp_seconds", "when", ["kind"])
    g.set(1700000000.5, kind="svid")
    assert g.value(kind="svid") == 1700000000.5 and g.value(kind="other") == 0
    with pytest.raises(ValueError):
        g.value()


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def test_http_endpoint_health_readiness_and_content_type() -> None:
    reg = Registry()
    ready = False
    server = await serve_metrics(reg, "127.0.0.1", 0, ready=lambda: ready)
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, _ = await _get(port, "/metrics?x=1")
        assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert (await _get(port, "/healthz"))[0] == 200
        assert (await _get(port, "/readyz"))[0] == 503
        ready = True
        assert (await _get(port, "/readyz"))[0] == 200
        assert (await _get(port, "/metrics", "POST"))[0] == 404
    finally:
        await server.wait_closed()
