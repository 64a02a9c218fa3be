"""deploy/haproxy.cfg in front of three real `fastrelay serve` nodes, with real curl.

Node-addressed mode (works with today's fastrelay): each node's
``--public-url`` is its own URL, so a mint through HAProxy (round-robin)
answers URLs that point straight at the node holding the ticket. Tests that
send a transfer *through* HAProxy's path hash pick a ticket whose path
hashes to the node that minted it (`routable`). HAProxy runs with
``FASTRELAY_NODE_HEADER`` set, so every answer names its node
(``X-Fastrelay-Node``). The findings these tests pin are written up in
deploy/README.md.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.cluster.processes import (
    HAPROXY_CFG,
    HAProxy,
    Node,
    ProcessError,
    RedisServer,
    http_status,
    mint,
    port_open,
    wait_for,
    which,
)

CURL = shutil.which("curl")
if which("haproxy") is None:
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)
if CURL is None:
    pytest.skip("curl is not installed (apt-get install curl)", allow_module_level=True)

NODE_HEADER = {"FASTRELAY_NODE_HEADER": "1"}
PATHS = [f"/relay/rly_{i:043d}" for i in range(60)]  # ticket-shaped, never minted
CURL_FAILED_TRANSFER = (18, 56)  # partial file / failure receiving data


@dataclasses.dataclass
class Cluster:
    nodes: list[Node]
    proxy: HAProxy
    tmp: pathlib.Path

    def node_name(self, url: str) -> str:
        """``nodeN`` holding a ticket minted in node-addressed mode (by its URL's port)."""
        port = int(re.match(r"http://127\.0\.0\.1:(\d+)/", url).group(1))  # type: ignore[union-attr]
        return f"node{[n.port for n in self.nodes].index(port) + 1}"

    def node(self, name: str) -> Node:
        return self.nodes[int(name.removeprefix("node")) - 1]


def start_nodes(count: int, extra_args: Sequence[str] = ()) -> list[Node]:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(Node.addressed, extra_args) for _ in range(count)]
        nodes, errors = [], []
        for fut in futures:
            try:
                nodes.append(fut.result())
            except Exception as exc:
                errors.append(exc)
    if errors:
        for node in nodes:
            node.close()
        raise errors[0]
    return nodes


@contextlib.contextmanager
def cluster_of(tmp: pathlib.Path, count: int = 3, **proxy_kw: Any) -> Iterator[Cluster]:
    nodes = start_nodes(count)
    try:
        env = {**NODE_HEADER, **proxy_kw.pop("env", {})}
        with HAProxy([n.address for n in nodes], env=env, **proxy_kw) as proxy:
            proxy.wait_all_up(timeout=10)
            yield Cluster(nodes, proxy, tmp)
    finally:
        for node in nodes:
            node.close()


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """Three nodes, HAProxy with fast checks (inter 200ms fall 2 rise 1)."""
    with cluster_of(tmp_path) as c:
        yield c


@pytest.fixture
def slow_check_cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """Checks every 30 s: a node that goes away stays UP for the whole test."""
    with cluster_of(tmp_path, check_inter="30s") as c:
        yield c


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("data") / "payload.bin"
    path.write_bytes(os.urandom(2 * 1024 * 1024 + 4321))
    return path


@pytest.fixture(scope="module")
def big_payload(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("data") / "big.bin"
    path.write_bytes(os.urandom(32 * 1024 * 1024))
    return path


# --- curl --------------------------------------------------------------------------


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", *args], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def curl_bg(*args: str, stdin: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A background curl; killed and reaped on the way out, whatever happens."""
    assert CURL is not None
    proc = subprocess.Popen(
        [CURL, "-sS", *args],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def exit_status(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"curl {proc.args!r} still running after {timeout}s") from None


def auth(ticket: str) -> list[str]:
    return ["-H", f"Authorization: Bearer {ticket}"]


def answering_node(proxy: HAProxy, path: str, method: str) -> str | None:
    """The node HAProxy sends ``method path`` to (no credentials: the node answers 401)."""
    how = ["-I"] if method == "HEAD" else ["-o", "/dev/null", "-D", "-", "-X", method]
    done = curl(*how, f"{proxy.url}{path}")
    assert done.returncode == 0, done.stderr
    found = re.search(r"(?im)^x-fastrelay-node: *(\S+)", done.stdout)
    return found.group(1) if found else None


def routable(c: Cluster, **fields: Any) -> tuple[dict[str, Any], str, str]:
    """Mint through HAProxy until the ticket's path hashes to the node that minted it.

    Returns (mint answer, node name, the ticket's URL through HAProxy).
    """
    for _ in range(60):
        answer = mint(c.proxy.url, **fields)
        owner = c.node_name(answer["upload_url"])
        path = f"/relay/{answer['ticket']}"
        if answering_node(c.proxy, path, "HEAD") == owner:
            return answer, owner, f"{c.proxy.url}{path}"
    raise AssertionError("no minted ticket hashed to its own node in 60 tries")


def wait_get_at_node(c: Cluster, node: str) -> None:
    """Until HAProxy holds one open request to ``node`` (a waiting GET)."""
    wait_for(
        lambda: c.proxy.server_stat("relay", node)["scur"] == "1",
        10,
        f"one open request to relay/{node}",
        describe=lambda: str(c.proxy.server_stat("relay", node)),
    )


def wait_bytes(path: pathlib.Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the download ``proc`` writing ``path`` has received body bytes."""

    def flowing() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"download ended early: {proc.returncode}")
        return path.exists() and path.stat().st_size > 0

    wait_for(flowing, 10, f"body bytes in {path.name}")


# --- the config file ---------------------------------------------------------------


def test_config_checks_with_1_3_8_nodes_tls_and_redispatch(tmp_path: pathlib.Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    pem = tmp_path / "edge.pem"
    cert = ca.issue_cert("127.0.0.1")
    pem.write_bytes(
        b"".join(b.bytes() for b in cert.cert_chain_pems) + cert.private_key_pem.bytes()
    )
    for count, env, tls in [
        (1, {}, None),
        (3, {"FASTRELAY_RELAY_REDISPATCH": "1"}, pem),
        (8, {"FASTRELAY_CHECK_INTER": "2s", "FASTRELAY_CHECK_RISE": "2"}, None),
    ]:
        nodes = [f"127.0.0.1:{20000 + i}" for i in range(count)]
        proxy = HAProxy(nodes, env=env, tls_pem=tls, start=False)
        with proxy:
            proxy.check_config()
    bad = HAProxy(["127.0.0.1:1"], check_inter="soon", start=False)
    with bad, pytest.raises(ProcessError, match="inter"):
        bad.check_config()


def test_tls_at_haproxy_plain_to_nodes(tmp_path: pathlib.Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file, pem = tmp_path / "ca.pem", tmp_path / "edge.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert = ca.issue_cert("127.0.0.1")
    pem.write_bytes(
        b"".join(b.bytes() for b in cert.cert_chain_pems) + cert.private_key_pem.bytes()
    )
    with cluster_of(tmp_path, tls_pem=pem) as c:
        health = curl("-v", "--cacert", str(ca_file), f"{c.proxy.tls_url}/healthz")
        assert health.returncode == 0, health.stderr
        assert "ALPN: server accepted http/1.1" in health.stderr
        minted = curl(
            "--cacert", str(ca_file),
            "-H", f"Authorization: Bearer {c.nodes[0].secret}",
            "-d", '{"workspace_id":"ws","source_exe_id":"a","dest_exe_id":"b"}',
            f"{c.proxy.tls_url}/api/exec-gateway/relay/create",
        )  # fmt: skip
        assert minted.returncode == 0, minted.stderr
        assert json.loads(minted.stdout)["upload_url"].startswith("http://127.0.0.1:")


# --- node-addressed mode -----------------------------------------------------------


def test_mint_round_robin_then_curl_transfers_to_the_returned_urls(
    cluster: Cluster, payload: pathlib.Path
) -> None:
    answers = [mint(cluster.proxy.url) for _ in range(3)]
    owners = [cluster.node_name(a["upload_url"]) for a in answers]
    assert sorted(owners) == ["node1", "node2", "node3"]
    for answer in answers:
        assert answer["download_url"] == answer["upload_url"]
        out = cluster.tmp / f"{answer['ticket'][-8:]}.bin"
        with curl_bg("-f", *auth(answer["ticket"]), "-o", str(out), answer["download_url"]) as get:
            put = curl("-f", *auth(answer["ticket"]), "-T", str(payload), answer["upload_url"])
            assert put.returncode == 0, put.stderr
            assert json.loads(put.stdout) == {"bytes": payload.stat().st_size, "status": "ok"}
            assert exit_status(get, 20) == 0
        assert out.read_bytes() == payload.read_bytes()


def test_healthz_answered_by_haproxy_while_a_node_is_up(cluster: Cluster) -> None:
    assert http_status(f"{cluster.proxy.url}/healthz") == 200
    for node in cluster.nodes:
        node.terminate()
    for i, node in enumerate(cluster.nodes, 1):
        assert node.wait_exit(10) == 0
        cluster.proxy.wait_server_state("relay", f"node{i}", "DOWN", timeout=5)
    assert http_status(f"{cluster.proxy.url}/healthz") == 503


def test_sigterm_node_goes_down_and_mints_avoid_it(cluster: Cluster) -> None:
    node2 = cluster.nodes[1]
    node2.terminate()
    assert node2.wait_exit(10) == 0
    cluster.proxy.wait_server_state("relay", "node2", "DOWN", timeout=5)
    cluster.proxy.wait_server_state("mint", "node2", "DOWN", timeout=5)
    owners = {cluster.node_name(mint(cluster.proxy.url)["upload_url"]) for _ in range(6)}
    assert owners == {"node1", "node3"}
    assert "Traceback" not in node2.stderr_text()


# --- finding 4: path hashing -------------------------------------------------------


def test_transfer_through_the_path_hash(cluster: Cluster, payload: pathlib.Path) -> None:
    answer, owner, url = routable(cluster)
    out = cluster.tmp / "out.bin"
    get_head = cluster.tmp / "get.head"
    with curl_bg("-f", *auth(answer["ticket"]), "-D", str(get_head), "-o", str(out), url) as get:
        put = curl("-f", "-D", "-", *auth(answer["ticket"]), "-T", str(payload), url)
        assert put.returncode == 0, put.stderr
        assert exit_status(get, 20) == 0
    assert f"x-fastrelay-node: {owner}" in put.stdout.lower()
    assert f"x-fastrelay-node: {owner}" in get_head.read_text().lower()
    assert out.read_bytes() == payload.read_bytes()


def test_path_hash_same_for_put_and_get_and_stable_when_another_node_leaves(
    cluster: Cluster,
) -> None:
    before = {p: answering_node(cluster.proxy, p, "GET") for p in PATHS}
    assert {p: answering_node(cluster.proxy, p, "PUT") for p in PATHS} == before
    assert set(before.values()) == {"node1", "node2", "node3"}
    cluster.nodes[2].terminate()
    cluster.proxy.wait_server_state("relay", "node3", "DOWN", timeout=5)
    after = {p: answering_node(cluster.proxy, p, "PUT") for p in PATHS}
    for path in PATHS:
        if before[path] != "node3":
            assert after[path] == before[path], path  # unrelated paths do not move
        else:
            assert after[path] in ("node1", "node2"), path


# --- finding 1: Expect: 100-continue -----------------------------------------------


def test_expect_100_continue_reaches_curl_promptly(cluster: Cluster, payload: pathlib.Path) -> None:
    answer, owner, url = routable(cluster)
    with curl_bg("-f", *auth(answer["ticket"]), "-o", "/dev/null", url) as get:
        wait_get_at_node(cluster, owner)
        put = curl(
            "-v", "-f", *auth(answer["ticket"]), "-T", str(payload),
            "-w", "\n%{time_starttransfer}", url,
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        assert exit_status(get, 20) == 0
    assert "> Expect: 100-continue" in put.stderr
    assert "< HTTP/1.1 100 Continue" in put.stderr
    assert "Done waiting for 100-continue" not in put.stderr  # curl's 1 s fallback
    assert float(put.stdout.rsplit("\n", 1)[1]) < 0.9


# --- finding 2: a waiting side is ended by fastrelay, not by HAProxy ---------------


def test_waiting_get_ends_at_the_node_ttl_not_at_a_haproxy_timeout(cluster: Cluster) -> None:
    answer, _, url = routable(cluster, ttl_seconds=2)
    started = time.monotonic()
    got = curl("-w", "\n%{http_code}", *auth(answer["ticket"]), url)
    waited = time.monotonic() - started
    body, status = got.stdout.rsplit("\n", 1)
    assert status == "408", got
    assert json.loads(body) == {"error": "timed out waiting for PUT side"}
    assert waited >= 1.5


def test_a_short_timeout_server_would_cut_the_waiting_get(tmp_path: pathlib.Path) -> None:
    with cluster_of(tmp_path, env={"FASTRELAY_HAPROXY_TIMEOUT": "1s"}) as c:
        answer, _, url = routable(c, ttl_seconds=30)
        got = curl("-o", "/dev/null", "-w", "%{http_code}", *auth(answer["ticket"]), url)
        assert got.stdout == "504"


# --- finding 3: failures stay visible through HAProxy ------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_uploader_killed_mid_stream_fails_the_get(
    cluster: Cluster, big_payload: pathlib.Path, framing: str
) -> None:
    answer, _, url = routable(cluster)
    out = cluster.tmp / "partial.bin"
    with curl_bg(*auth(answer["ticket"]), "-o", str(out), url) as get:
        if framing == "content-length":
            put_cm = curl_bg(
                *auth(answer["ticket"]), "--limit-rate", "2M", "-T", str(big_payload), url
            )
        else:
            put_cm = curl_bg(*auth(answer["ticket"]), "-T", "-", url, stdin=subprocess.PIPE)
        with put_cm as put:
            if put.stdin is not None:
                put.stdin.write(big_payload.read_bytes()[: 1024 * 1024])
                put.stdin.flush()
            wait_bytes(out, get)
            put.send_signal(signal.SIGKILL)
            assert exit_status(get, 20) in CURL_FAILED_TRANSFER
    assert out.stat().st_size < big_payload.stat().st_size


def test_node_killed_mid_transfer_fails_the_get(
    cluster: Cluster, big_payload: pathlib.Path
) -> None:
    answer, owner, url = routable(cluster)
    out = cluster.tmp / "partial.bin"
    with (
        curl_bg(*auth(answer["ticket"]), "-o", str(out), url) as get,
        curl_bg(
            "-f", *auth(answer["ticket"]), "--limit-rate", "2M", "-T", str(big_payload), url
        ) as put,
    ):
        wait_bytes(out, get)
        cluster.node(owner).kill()
        assert exit_status(get, 20) in CURL_FAILED_TRANSFER
        # HAProxy answers the upload 502 itself (curl -f: 22), or closes it
        # while curl is still sending (55/56).
        assert exit_status(put, 20) in (22, 55, 56)
    assert out.stat().st_size < big_payload.stat().st_size


# --- finding 5: a closed listener before the check marks the node DOWN -------------


def test_closed_listener_before_down_503_by_default_or_next_node_with_redispatch(
    slow_check_cluster: Cluster,
) -> None:
    c = slow_check_cluster
    owner = {p: answering_node(c.proxy, p, "GET") for p in PATHS}
    on2 = [p for p in PATHS if owner[p] == "node2"]
    assert on2
    c.nodes[1].terminate()
    assert c.nodes[1].wait_exit(10) == 0
    assert c.proxy.server_state("relay", "node2").split()[0] == "UP"
    # Default: no retry on the relay backend, an immediate 503 from HAProxy.
    for path in on2[:5]:
        started = time.monotonic()
        done = curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", f"{c.proxy.url}{path}")
        assert done.stdout == "503"
        assert time.monotonic() - started < 0.5
    # FASTRELAY_RELAY_REDISPATCH: the next node of the ring, the same for PUT and GET.
    env = {**NODE_HEADER, "FASTRELAY_RELAY_REDISPATCH": "1"}
    with HAProxy([n.address for n in c.nodes], check_inter="30s", env=env) as proxy:
        redispatched = {p: answering_node(proxy, p, "PUT") for p in on2}
        assert {p: answering_node(proxy, p, "GET") for p in on2} == redispatched
        assert set(redispatched.values()) <= {"node1", "node3"}
        assert proxy.server_state("relay", "node2").split()[0] == "UP"
        proxy.command("set server relay/node2 health down")
        proxy.wait_server_state("relay", "node2", "DOWN", timeout=5)
        after_down = {p: answering_node(proxy, p, "PUT") for p in on2}
    moved = [p for p in on2 if after_down[p] != redispatched[p]]
    # What deploy/README.md reports: the retry walks the ring from the nearest
    # point, the ring without node2 picks the nearest remaining point, and
    # these differ for part of the paths.
    assert moved, "redispatch now agrees with the post-DOWN ring: update deploy/README.md"


# --- finding 6: no request rides a draining node's kept-alive connection -----------


def test_no_request_reaches_a_draining_node_over_a_kept_alive_connection(
    slow_check_cluster: Cluster, big_payload: pathlib.Path
) -> None:
    import http.client

    c = slow_check_cluster
    on2 = [p for p in PATHS if answering_node(c.proxy, p, "GET") == "node2"]
    client = http.client.HTTPConnection("127.0.0.1", c.proxy.port, timeout=10)
    try:
        client.request("GET", on2[0])
        first = client.getresponse()
        first.read()
        assert (first.status, first.getheader("x-fastrelay-node")) == (401, "node2")
        # A transfer running on node2 keeps it draining (listener closed) after SIGTERM.
        node2 = c.nodes[1]
        answer = node2.mint()
        ticket = answer["ticket"]
        with (
            curl_bg(*auth(ticket), "-o", "/dev/null", answer["download_url"]),
            curl_bg(
                *auth(ticket), "--limit-rate", "1M", "-T", str(big_payload), answer["upload_url"]
            ),
        ):
            wait_for(lambda: "relay created" in node2.stderr_text(), 10, "node2's relay")
            wait_for(lambda: node2.metric("fastrelay_waiting_relays") == 0.0, 10, "the pairing")
            node2.terminate()
            wait_for(lambda: "draining" in node2.stderr_text(), 10, "node2 to drain")
            assert node2.running and not port_open("127.0.0.1", node2.port)
            assert c.proxy.server_state("relay", "node2").split()[0] == "UP"
            # The same client connection: HAProxy answers 503 itself (the
            # node's listener refuses), it does not reuse a kept-alive
            # server connection to node2.
            client.request("GET", on2[1])
            second = client.getresponse()
            second.read()
            assert second.status == 503
            assert second.getheader("x-fastrelay-node") is None
            # Mints skip node2 (refused, retried on another node).
            owners = {c.node_name(mint(c.proxy.url)["upload_url"]) for _ in range(6)}
            assert "node2" not in owners
    finally:
        client.close()


# --- the support module ------------------------------------------------------------


def test_redis_server_stop_kill_and_restart_on_the_same_port() -> None:
    if which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as redis:
        port = redis.port
        assert redis.ping()
        assert redis.command("SET", "k", "v") == b"+OK\r\n"
        redis.stop()
        assert not redis.ping()
        redis.start()
        assert redis.port == port and redis.ping()
        assert redis.command("GET", "k") == b"$-1\r\n"  # no persistence
        redis.kill()
        assert not redis.ping()
        redis.start()
        assert redis.ping()


def test_config_path_is_the_shipped_file() -> None:
    assert HAPROXY_CFG.name == "haproxy.cfg" and HAPROXY_CFG.parent.name == "deploy"
    assert HAPROXY_CFG.is_file()
