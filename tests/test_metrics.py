"""Prometheus metrics: the exposition format, the request metrics, every process's endpoint on a local
system (counters move with traffic), the endpoint's own defences, and config validation with clear
messages."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import pytest

from engine.devtools.up import LocalSystem
from engine.node import NodeConfig
from engine.service.metrics import (LATENCY_BUCKETS_S, Families, MetricsHTTPServer, RequestMetrics,
                                    parse_address)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? '
                     r'(-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text format: every line a comment or a sample; TYPE before a family's
    samples; returns name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in typed, f"family {name} typed twice"
            typed[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or base in typed, f"sample before its TYPE: {line!r}"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"', m.group(2) or ""))
        out.setdefault(name, []).append((labels, float(m.group(5))))
    return out


def value(fams: dict, name: str, **labels: str) -> float:
    got = [v for lab, v in fams.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items())]
    return sum(got)


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


def test_families_render_the_text_format():
    fam = Families(service="shard", node=2)
    fam.gauge("zwallet_x", "an x", 3, part='a"b\\c')
    fam.counter("zwallet_y_total", "a y", 7)
    fam.gauge("zwallet_x", "", 4, part="d")
    fam.gauge("zwallet_skipped", "no value", None)
    rm = RequestMetrics({1: "APPLY"})
    for s in (0.00005, 0.0003, 0.0003, 20.0):
        rm.observe(1, s)
    rm.error(1, "OVERLOADED")
    rm.add_to(fam)
    text = fam.render().decode()
    fams = parse(text)
    assert text.count("# TYPE zwallet_x gauge") == 1 and "zwallet_skipped" not in text
    assert value(fams, "zwallet_x", part='a\\"b\\\\c') == 3 and value(fams, "zwallet_x", part="d") == 4
    assert value(fams, "zwallet_y_total", service="shard", node="2") == 7
    buckets = [(lab["le"], v) for lab, v in fams["zwallet_request_seconds_bucket"]]
    assert len(buckets) == len(LATENCY_BUCKETS_S) + 1 and buckets[-1] == ("+Inf", 4.0)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert dict(buckets)["0.0001"] == 1 and dict(buckets)["0.0005"] == 3 and dict(buckets)["10.0"] == 3
    assert value(fams, "zwallet_request_seconds_count", op="APPLY") == 4
    assert value(fams, "zwallet_request_seconds_sum", op="APPLY") == pytest.approx(20.00065)
    assert value(fams, "zwallet_requests_total", op="APPLY") == 4
    assert value(fams, "zwallet_request_errors_total", op="APPLY", code="OVERLOADED") == 1


@pytest.mark.parametrize("bad", ["nohost", "host:", ":80", "h:99999", "h:x", ""])
def test_a_bad_metrics_address_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="metrics address"):
        parse_address(bad)


def test_the_endpoint_serves_only_its_paths_and_idle_connections_do_not_hold_it():
    srv = MetricsHTTPServer("127.0.0.1:0", lambda: b"zwallet_up 1\n").start()
    try:
        base = f"http://{srv.address}"
        idle = [socket.create_connection(srv_addr(srv)) for _ in range(6)]   # connect, send nothing
        t0 = time.monotonic()
        assert urllib.request.urlopen(base + "/metrics", timeout=5).read() == b"zwallet_up 1\n"
        assert time.monotonic() - t0 < 2.0
        assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/other", timeout=5)
        assert e.value.code == 404
        more = [socket.create_connection(srv_addr(srv)) for _ in range(6)]     # past CONNECTIONS_MAX: closed
        time.sleep(0.3)
        assert srv.refused >= 1
        for s in idle + more:
            s.close()
    finally:
        srv.close()


def srv_addr(srv: MetricsHTTPServer) -> tuple[str, int]:
    host, port = srv.address.rsplit(":", 1)
    return host, int(port)


def test_a_failing_collection_is_a_500_and_the_endpoint_stays_up():
    calls = {"n": 0}

    def collect() -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("boom")
        return b"zwallet_up 1\n"
    srv = MetricsHTTPServer("127.0.0.1:0", collect).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{srv.address}/metrics", timeout=5)
        assert e.value.code == 500
        assert urllib.request.urlopen(f"http://{srv.address}/metrics", timeout=5).read() == b"zwallet_up 1\n"
    finally:
        srv.close()


def test_config_errors_are_clear(tmp_path):
    base = {"node": {"id": 1, "data_dir": str(tmp_path)}, "security": {"insecure": True},
            "replica": [{"id": 1, "raft": "tcp://127.0.0.1:1", "client": "tcp://127.0.0.1:2",
                         "pub": "tcp://127.0.0.1:3"}]}
    NodeConfig.from_dict(base)
    with pytest.raises(ValueError, match=r"\[limits\] pending_requests_max must be an integer, not 'many'"):
        NodeConfig.from_dict({**base, "limits": {"pending_requests_max": "many"}})
    with pytest.raises(ValueError, match=r"\[raft\] sync must be true or false"):
        NodeConfig.from_dict({**base, "raft": {"sync": 1}})
    with pytest.raises(ValueError, match=r"\[raft\] snapshot_keep_entries"):
        NodeConfig.from_dict({**base, "raft": {"snapshot_threshold_entries": 5, "snapshot_keep_entries": 9}})
    with pytest.raises(ValueError, match="metrics address"):
        NodeConfig.from_dict({**base, "node": {**base["node"], "metrics": "127.0.0.1"}})
    with pytest.raises(ValueError, match=r"unknown setting \[limits\] nonsense"):
        NodeConfig.from_dict({**base, "limits": {"nonsense": 1}})
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nid = 1\ndata_dir = "x"\n[security]\ninsecure = true\n[raft]\ntick_ms = "fast"\n')
    p = subprocess.run([sys.executable, "-m", "engine.node", "--config", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "[raft] tick_ms must be an integer" in p.stderr and "Traceback" not in p.stderr


def test_every_process_of_a_local_system_serves_metrics_that_move_with_traffic(tmp_path):
    import gateway
    import marker
    with LocalSystem(str(tmp_path), shards=2, replicas=1, sync=False) as ls:
        ls.start()
        with open(ls.system_path, "rb") as f:
            urls = tomllib.load(f)["metrics"]
        assert set(urls) == {"shard_1", "shard_2", "marker_1", "gateway", "query"}
        before = {k: scrape(u[0]) for k, u in urls.items()}
        for k, fams in before.items():
            if k not in ("gateway", "query"):
                assert value(fams, "zwallet_raft_role", role="leader") == 1
                assert value(fams, "zwallet_raft_term") >= 1
                assert value(fams, "zwallet_disk_bytes", part="raft_log") > 0
        system = ls.system
        a1 = next(a for a in range(1, 10_000) if system.shard_map.shard_of(a) == 1)
        a2 = next(a for a in range(1, 10_000) if system.shard_map.shard_of(a) == 2)
        b1 = next(a for a in range(a1 + 1, 10_000) if system.shard_map.shard_of(a) == 1)
        with gateway.Client.from_system(ls.system_path) as g:
            for k, a in enumerate((a1, a2, b1)):
                assert g.create_account(10 + k, a, "USD", lower_limit=None).code == 0
            for k in range(5):
                assert g.transfer(100 + k, a1, b1, 3, "USD").code == 0     # one shard
                assert g.transfer(200 + k, a1, a2, 3, "USD").code == 0     # two: a Marker workflow
        with marker.Client.from_system(ls.system_path) as m:
            assert m.transfer(300, a2, a1, 1, "USD").code == 0
        after = {k: scrape(u[0]) for k, u in urls.items()}
        s1, s2, mk, gw = after["shard_1"], after["shard_2"], after["marker_1"], after["gateway"]
        assert value(s1, "zwallet_results_total", code="OK") >= 5 + 5 + 2
        assert value(s1, "zwallet_requests_total", op="APPLY") > value(before["shard_1"], "zwallet_requests_total",
                                                                        op="APPLY")
        assert value(s1, "zwallet_shard_accounts") == 2 and value(s2, "zwallet_shard_accounts") == 1
        assert value(s1, "zwallet_last_seq") > value(before["shard_1"], "zwallet_last_seq")
        assert value(mk, "zwallet_requests_total", op="SUBMIT") >= 6
        assert value(mk, "zwallet_marker_workflows_in_flight") == 0
        assert value(gw, "zwallet_requests_total", op="transfer") == 10
        assert value(gw, "zwallet_request_seconds_count", op="transfer") == 10
        assert value(gw, "zwallet_results_total", code="OK") == 13
        assert ls.groups["shard 1"].metrics_urls == urls["shard_1"]
        import query
        with query.Client.from_system(ls.system_path) as q:
            head = value(after["shard_1"], "zwallet_last_seq")
            assert q.balance(a1, min_seqs={1: int(head)})["account_id"] == a1     # read-your-writes
        qm = scrape(urls["query"][0])
        assert value(qm, "zwallet_requests_total", op="BALANCE") >= 1
        assert value(qm, "zwallet_query_applied_seq", shard="1") >= 1
        assert value(qm, "zwallet_query_projector_stopped") == 0
