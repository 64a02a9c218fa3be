"""One-address mode: three real nodes behind deploy/haproxy.cfg, sharing a ticket
key and a real redis-server, driven with real curl.

Each node runs ``--ticket-key-file`` (signed tickets: any node serves any
node's ticket) and ``--redis-url`` (caps, single use and leases for the
whole cluster), and its ``--public-url`` is HAProxy's address, so mint
answers point at HAProxy and its consistent path hash brings both sides of
a ticket to one node. HAProxy adds ``X-Fastrelay-Node`` to every answer so a
test knows which node served a request.

Every wait polls a condition with a deadline (`processes.wait_for`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.cluster.processes import (
    DEFAULT_SECRET,
    HAProxy,
    Node,
    RedisServer,
    free_port,
    wait_for,
    which,
)

CURL = shutil.which("curl")
for _tool in ("haproxy", "redis-server"):
    if which(_tool) is None:
        pytest.skip(f"{_tool} is not installed (.ci/run installs it)", allow_module_level=True)
if CURL is None:
    pytest.skip("curl is not installed", allow_module_level=True)

LEASE_S = 1.5  # a dead node's leases and running slots free themselves this fast
SIZES = [0, 1, 777, 65_536, 100_003, 1_048_576, 2_500_000]


@dataclasses.dataclass
class Cluster:
    redis: RedisServer
    nodes: list[Node]
    proxy: HAProxy
    tmp: pathlib.Path
    tickets: dict[pathlib.Path, str] = dataclasses.field(default_factory=dict)
    """The ticket of each transfer `start_in_flight` started, by output file."""

    @property
    def url(self) -> str:
        return self.proxy.url

    def node_by_name(self, name: str) -> Node:
        return self.nodes[int(name.removeprefix("node")) - 1]

    def metric(self, node: Node, name: str) -> float:
        value = node.metric(name)
        return -1.0 if value is None else value

    def live_slots(self, workspace: str) -> int:
        """Slots of ``workspace`` in Redis whose deadline has not passed."""
        now_s, micros = _redis_time(self.redis)
        now_ms = now_s * 1000 + micros // 1000
        reply = self.redis.command("ZCOUNT", f"fastrelay:ws:{workspace}", f"({now_ms}", "+inf")
        return int(reply[1:].strip())


def _redis_time(redis: RedisServer) -> tuple[int, int]:
    # TIME answers a two-element array; read it with a raw socket like `command`.
    import socket

    with socket.create_connection((redis.host, redis.port), timeout=2) as sock:
        sock.sendall(b"*1\r\n$4\r\nTIME\r\n")
        data = b""
        while data.count(b"\r\n") < 5:
            data += sock.recv(4096)
    parts = data.split(b"\r\n")
    return int(parts[2]), int(parts[4])


@contextlib.contextmanager
def cluster_of(
    tmp: pathlib.Path,
    *,
    count: int = 3,
    node_args: Sequence[str] = (),
    redis: bool = True,
) -> Iterator[Cluster]:
    keyfile = tmp / "ticket-keys"
    keyfile.write_text(secrets.token_urlsafe(32) + "\n")
    keyfile.chmod(0o600)
    port = free_port()
    with RedisServer() as redis_server:
        args = [
            "--public-url",
            f"http://127.0.0.1:{port}",
            "--ticket-key-file",
            str(keyfile),
            "--cluster-lease",
            str(LEASE_S),
            "--redis-timeout",
            "0.3",
            *(["--redis-url", redis_server.url] if redis else []),
            *node_args,
        ]
        nodes: list[Node] = []
        try:
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                for fut in [pool.submit(Node, args) for _ in range(count)]:
                    nodes.append(fut.result())
            with HAProxy(
                [n.address for n in nodes], port=port, env={"FASTRELAY_NODE_HEADER": "1"}
            ) as proxy:
                proxy.wait_all_up(timeout=10)
                yield Cluster(redis_server, nodes, proxy, tmp)
        finally:
            for node in nodes:
                node.close()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[int, pathlib.Path]:
    base = tmp_path_factory.mktemp("payloads")
    out = {}
    for size in SIZES:
        path = base / f"p{size}.bin"
        path.write_bytes(os.urandom(size))
        out[size] = path
    return out


# --- requests ------------------------------------------------------------------------


def mint(base: str, timeout: float = 10, **fields: Any) -> tuple[int, dict[str, Any]]:
    body = {"workspace_id": "ws", "source_exe_id": "src", "dest_exe_id": "dst", **fields}
    req = urllib.request.Request(
        f"{base}/api/exec-gateway/relay/create",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {DEFAULT_SECRET}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read() or b"{}")


def request_status(method: str, url: str, ticket: str) -> int:
    req = urllib.request.Request(
        url, method=method, data=b"" if method == "PUT" else None,
        headers={"Authorization": f"Bearer {ticket}"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def status_once_unowned(method: str, url: str, ticket: str) -> int:
    """The answer to ``method url`` once no dead node's owner lease holds the
    ticket (421 until then: it lapses with the slots, give or take a beat)."""
    seen: list[int] = []

    def unowned() -> bool:
        seen.append(request_status(method, url, ticket))
        return seen[-1] != 421

    wait_for(unowned, 10, f"the owner lease on {url} to lapse")
    return seen[-1]


@dataclasses.dataclass
class Transfer:
    """One relay run with two curls; what each saw."""

    get_rc: int
    put_rc: int
    put_answer: str
    node: str | None  # X-Fastrelay-Node of the GET's answer
    intact: bool


def _curl(*args: str) -> list[str]:
    assert CURL is not None
    return [CURL, "-sS", *args]


@contextlib.contextmanager
def started_transfer(
    url: str,
    ticket: str,
    payload: pathlib.Path,
    out: pathlib.Path,
    *,
    chunked: bool,
    rate: str = "",
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """A GET and a PUT under way (the GET first); both reaped on the way out."""
    auth = f"Authorization: Bearer {ticket}"
    # -f: an error answer (408, 410, 421, 503 ...) is a non-zero exit too.
    get = subprocess.Popen(
        _curl("-f", "-H", auth, "-o", str(out), "-D", f"{out}.head", url),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    limit = ["--limit-rate", rate] if rate else []
    if chunked:
        with payload.open("rb") as stdin:
            put = subprocess.Popen(
                _curl("-H", auth, *limit, "-T", "-", url),
                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
    else:
        put = subprocess.Popen(
            _curl("-H", auth, *limit, "-T", str(payload), url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    try:
        yield get, put
    finally:
        for proc in (get, put):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def finish(
    procs: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]],
    payload: pathlib.Path,
    out: pathlib.Path,
    timeout: float = 60,
) -> Transfer:
    get, put = procs
    put_out, _ = put.communicate(timeout=timeout)
    get.communicate(timeout=timeout)
    head = pathlib.Path(f"{out}.head")
    node = None
    if head.exists():
        for line in head.read_text(errors="replace").splitlines():
            if line.lower().startswith("x-fastrelay-node:"):
                node = line.split(":", 1)[1].strip()
    intact = out.exists() and _sha(out) == _sha(payload)
    return Transfer(get.returncode, put.returncode, put_out.decode(errors="replace"), node, intact)


def relay_once(
    base: str, payload: pathlib.Path, out: pathlib.Path, *, chunked: bool, workspace: str = "ws"
) -> Transfer:
    status, answer = mint(base, workspace_id=workspace)
    assert status == 201, answer
    assert answer["upload_url"].startswith(base + "/relay/rly_")
    url = answer["upload_url"]
    with started_transfer(url, answer["ticket"], payload, out, chunked=chunked) as procs:
        return finish(procs, payload, out)


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ok(t: Transfer, size: int) -> bool:
    try:
        answer = json.loads(t.put_answer)
    except ValueError:
        return False
    return (
        t.get_rc == 0 and t.put_rc == 0 and t.intact and answer == {"bytes": size, "status": "ok"}
    )


# --- the tests -----------------------------------------------------------------------


def test_300_relays_through_haproxy_all_intact_none_misrouted(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    with cluster_of(tmp_path) as c:
        jobs = [(i, SIZES[i % len(SIZES)], i % 2 == 1) for i in range(300)]

        def run(job: tuple[int, int, bool]) -> tuple[int, int, Transfer]:
            i, size, chunked = job
            out = tmp_path / f"out-{i}.bin"
            t = relay_once(c.url, payloads[size], out, chunked=chunked)
            out.unlink(missing_ok=True)
            return i, size, t

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(run, jobs))
        bad = [(i, size, t) for i, size, t in results if not ok(t, size)]
        assert not bad, bad[:5]
        per_node: dict[str, int] = {}
        for _, _, t in results:
            assert t.node is not None
            per_node[t.node] = per_node.get(t.node, 0) + 1
        assert sorted(per_node) == ["node1", "node2", "node3"], per_node
        # No pair was split: every node ended exactly the relays it served, all ok.
        for name, count in per_node.items():
            node = c.node_by_name(name)
            assert c.metric(node, 'fastrelay_relays_total{outcome="ok"}') == count
            for outcome in ("expired", "upload_aborted", "download_aborted", "shutdown"):
                assert c.metric(node, f'fastrelay_relays_total{{outcome="{outcome}"}}') == 0


def test_a_ticket_minted_on_one_node_is_served_by_another_and_then_spent_everywhere(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    with cluster_of(tmp_path) as c:
        a, b, _ = c.nodes
        status, answer = mint(a.url)
        assert status == 201
        ticket = answer["ticket"]
        url_b = f"{b.url}/relay/{ticket}"
        out = tmp_path / "out.bin"
        payload = payloads[1_048_576]
        with started_transfer(url_b, ticket, payload, out, chunked=False) as procs:
            assert ok(finish(procs, payload, out), payload.stat().st_size)
        assert c.metric(b, 'fastrelay_relays_total{outcome="ok"}') == 1
        assert c.metric(a, 'fastrelay_relays_total{outcome="ok"}') == 0
        # Spent: 410 on every node, for either side, and through HAProxy.
        for node in c.nodes:
            for method in ("GET", "PUT"):
                wait_for(
                    lambda n=node, m=method: (
                        request_status(m, f"{n.url}/relay/{ticket}", ticket) == 410
                    ),
                    5,
                    f"{method} of the spent ticket on {node.url} to get 410",
                )
        assert request_status("GET", f"{c.url}/relay/{ticket}", ticket) == 410


def test_the_workspace_cap_holds_across_nodes(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    with cluster_of(tmp_path, node_args=["--max-per-workspace", "3"]) as c:
        tickets = []
        for node in c.nodes:  # one mint on each node in turn
            status, answer = mint(node.url, workspace_id="capped")
            assert status == 201, answer
            tickets.append(answer["ticket"])
        for node in c.nodes:
            status, answer = mint(node.url, workspace_id="capped")
            assert (status, answer) == (
                429,
                {"error": "relay: workspace concurrent relay cap reached"},
            )
        assert mint(c.url, workspace_id="other")[0] == 201  # other workspaces are not held
        # One relay ends (on whichever node HAProxy picks): its slot frees everywhere.
        out = tmp_path / "out.bin"
        with started_transfer(
            f"{c.url}/relay/{tickets[0]}", tickets[0], payloads[777], out, chunked=False
        ) as procs:
            assert ok(finish(procs, payloads[777], out), 777)
        wait_for(
            lambda: mint(c.nodes[2].url, workspace_id="capped")[0] == 201,
            5,
            "the freed slot to be minted again",
        )
        assert mint(c.nodes[0].url, workspace_id="capped")[0] == 429


def _wait_paired(c: Cluster, count: int) -> None:
    def paired() -> bool:
        active = sum(c.metric(n, "fastrelay_active_relays") for n in c.nodes)
        waiting = sum(c.metric(n, "fastrelay_waiting_relays") for n in c.nodes)
        return active == count and waiting == 0

    wait_for(paired, 15, f"{count} relays to be paired")


def start_in_flight(
    c: Cluster,
    stack: contextlib.ExitStack,
    payload: pathlib.Path,
    count: int,
    workspace: str,
) -> list[tuple[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]], pathlib.Path]]:
    """``count`` rate-limited transfers through HAProxy, returned once all are paired."""
    running = []
    for i in range(count):
        status, answer = mint(c.url, workspace_id=workspace)
        assert status == 201
        out = c.tmp / f"{workspace}-{i}.bin"
        procs = stack.enter_context(
            started_transfer(
                answer["upload_url"], answer["ticket"], payload, out,
                chunked=i % 2 == 1, rate="1M",
            )
        )  # fmt: skip
        running.append((procs, out))
        c.tickets[out] = answer["ticket"]
    _wait_paired(c, count)
    return running


def busiest_node(c: Cluster) -> tuple[Node, str, int]:
    """The node serving the most relays now: (node, HAProxy's name for it, count)."""
    served = [int(c.metric(n, "fastrelay_active_relays")) for n in c.nodes]
    i = max(range(len(c.nodes)), key=lambda k: served[k])
    assert served[i] > 0
    return c.nodes[i], f"node{i + 1}", served[i]


def test_kill_9_of_a_node_fails_only_its_transfers_visibly(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    payload = payloads[2_500_000]
    size = payload.stat().st_size
    with cluster_of(tmp_path) as c, contextlib.ExitStack() as stack:
        running = start_in_flight(c, stack, payload, 12, "before")
        victim, victim_name, held = busiest_node(c)
        victim.kill()
        results = [finish(procs, payload, out) for procs, out in running]
        on_victim = [t for t in results if t.node == victim_name]
        elsewhere = [t for t in results if t.node != victim_name]
        assert len(on_victim) == held and elsewhere
        # Every transfer of the dead node failed, visibly to its receiver
        # (curl 18 or 56, never a clean short file); the uploader too.
        for t in on_victim:
            assert t.get_rc in (18, 56) and not t.intact, t
            assert t.put_rc != 0 or '"status":"ok"' not in t.put_answer, t
        for t in elsewhere:
            assert ok(t, size), t
        print(
            f"\nnode loss: {len(on_victim)} of {len(results)} transfers were on the killed node;"
            f" GET exit codes {sorted(t.get_rc for t in on_victim)} (all visible failures);"
            f" the other {len(elsewhere)} completed intact"
        )
        # Once HAProxy marks it DOWN, new relays go to the two others and succeed.
        c.proxy.wait_server_state("relay", victim_name, "DOWN", timeout=10)
        for i in range(20):
            t = relay_once(c.url, payloads[65_536], tmp_path / f"after{i}.bin", chunked=False)
            assert ok(t, 65_536) and t.node != victim_name, t
        # The dead node's slots in Redis free themselves (its lease ends).
        wait_for(lambda: c.live_slots("before") == 0, 10, "the dead node's slots to free")
        # Its tickets failed mid-transfer: single use holds after the lease
        # lapsed too. Every node, and HAProxy, answers 410 for either side;
        # none serves them afresh (the hole: they used to be served again).
        dead = [
            c.tickets[out]
            for (_, out), t in zip(running, results, strict=True)
            if t.node == victim_name
        ]
        survivors = [n for n in c.nodes if n is not victim]
        for ticket in dead:
            for base in [c.url, *(n.url for n in survivors)]:
                for method in ("GET", "PUT"):
                    status = status_once_unowned(method, f"{base}/relay/{ticket}", ticket)
                    assert status == 410, (base, method, status)


def test_sigterm_drain_finishes_transfers_and_new_relays_go_elsewhere(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    payload = payloads[2_500_000]
    size = payload.stat().st_size
    args = ["--drain-grace", "2", "--drain-timeout", "30"]
    with cluster_of(tmp_path, node_args=args) as c, contextlib.ExitStack() as stack:
        running = start_in_flight(c, stack, payload, 9, "draining")
        victim, victim_name, held = busiest_node(c)
        victim.terminate()
        # New relays while the node drains: during its grace it still serves
        # them (HAProxy has not yet taken it out), then they go elsewhere.
        # The relays run one after the other, so at most one can straddle
        # the moment HAProxy takes the node out (its GET there, its PUT
        # elsewhere): that one must fail visibly and at once (421 for the
        # PUT, 503 for the GET at the end of the grace), never hang or lie.
        during = [
            relay_once(c.url, payloads[1_048_576], tmp_path / f"n{i}.bin", chunked=i % 2 == 1)
            for i in range(10)
        ]
        c.proxy.wait_server_state("relay", victim_name, "DOWN", timeout=10)
        after = [
            relay_once(c.url, payloads[1_048_576], tmp_path / f"m{i}.bin", chunked=False)
            for i in range(10)
        ]
        # Every transfer in flight on the draining node finished intact.
        for t in (finish(procs, payload, out) for procs, out in running):
            assert ok(t, size), t
        succeeded = [t for t in during if ok(t, 1_048_576)]
        print(
            f"\ndrain: {len(running)} transfers in flight, {held} on the draining"
            f" node, all finished; {len(during)} relays sent meanwhile,"
            f" {sum(t.node == victim_name for t in succeeded)} served by the draining node,"
            f" {len(during) - len(succeeded)} failed visibly; {len(after)} after DOWN all elsewhere"
        )
        assert len(succeeded) >= len(during) - 1, during
        for t in during:
            assert t in succeeded or (t.get_rc != 0 and not t.intact), t
        assert all(ok(t, 1_048_576) and t.node != victim_name for t in after), after
        assert victim.wait_exit(30) == 0
        assert "outcome=shutdown" not in victim.stderr_text()


def test_without_redis_mint_is_503_and_paired_transfers_complete(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    payload = payloads[2_500_000]
    with cluster_of(tmp_path) as c:
        status, answer = mint(c.url)
        assert status == 201
        spare_status, spare = mint(c.url)  # minted now, first used while Redis is away
        assert spare_status == 201
        out = tmp_path / "out.bin"
        with started_transfer(
            answer["upload_url"], answer["ticket"], payload, out, chunked=False, rate="1M"
        ) as procs:
            _wait_paired(c, 1)
            c.redis.stop()
            c.redis.wait_down()
            started = time.monotonic()
            assert mint(c.url) == (503, {"error": "cluster state unavailable"})
            assert time.monotonic() - started < 5  # each node answers within its Redis timeout
            # A first arrival needs the cluster's word too: 503, not a guess.
            assert request_status("GET", spare["download_url"], spare["ticket"]) == 503
            assert ok(finish(procs, payload, out), payload.stat().st_size)
        down = [c.metric(n, "fastrelay_cluster_up") for n in c.nodes]
        assert 0.0 in down
        c.redis.start()
        wait_for(lambda: mint(c.url)[0] == 201, 10, "minting to work again with Redis back")


def _retry_until_ok(args: list[str], deadline: float) -> tuple[int, str, int]:
    """Run ``curl args`` until it exits 0 (a client retrying through HAProxy
    while the cluster takes the ticket over): (last exit code, its stdout,
    attempts)."""
    attempts = 0
    while True:
        attempts += 1
        try:
            done = subprocess.run(
                _curl(*args), capture_output=True, timeout=max(deadline - time.monotonic(), 1)
            )
        except subprocess.TimeoutExpired as exc:
            return -1, (exc.stdout or b"").decode(errors="replace"), attempts
        if done.returncode == 0 or time.monotonic() > deadline:
            return done.returncode, done.stdout.decode(errors="replace"), attempts
        time.sleep(0.2)  # a client's backoff between attempts, not an ordering


def test_a_resumable_relay_survives_the_kill_9_of_its_node(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    """Both sides of a resumable transfer come back through HAProxy after
    its node is killed, and finish on the node that takes the ticket over
    once the dead node's lease lapsed: one intact body, nothing sent twice
    to the destination."""
    payload = payloads[2_500_000]
    size = payload.stat().st_size
    with cluster_of(tmp_path) as c, contextlib.ExitStack() as stack:
        status, answer = mint(c.url, workspace_id="resumable", resumable=True)
        assert status == 201 and answer["resumable"] is True
        ticket, url = answer["ticket"], answer["upload_url"]
        out = tmp_path / "resumed.bin"
        auth = f"Authorization: Bearer {ticket}"
        get = subprocess.Popen(
            _curl("-f", "-H", auth, "-o", str(out), url),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        put = subprocess.Popen(
            _curl("-H", auth, "--limit-rate", "500K", "-T", str(payload), url),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        for proc in (get, put):
            stack.callback(lambda p=proc: (p.poll() is None and p.kill(), p.communicate()))
        _wait_paired(c, 1)
        wait_for(lambda: out.exists() and out.stat().st_size > 100_000, 15, "bytes to flow")
        victim, victim_name, _ = busiest_node(c)
        victim.kill()
        killed = time.monotonic()
        get.communicate(timeout=30)
        first_answer, _ = put.communicate(timeout=30)
        # Both broke, visibly: curl 18/56 for the GET, no ok for the PUT
        # (HAProxy answers it 502, or the connection just ends).
        assert get.returncode in (18, 56), get.returncode
        assert b'"status":"ok"' not in first_answer
        had = out.stat().st_size
        assert 0 < had < size
        # Both clients retry as a user's would: the GET from what it has
        # (curl -C -), the PUT the whole file (the relay drops what the
        # destination already has).
        deadline = killed + 25
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = pool.submit(
                _retry_until_ok, ["-f", "-H", auth, "-C", "-", "-o", str(out), url], deadline
            )
            sent = pool.submit(
                _retry_until_ok, ["-f", "-H", auth, "-T", str(payload), url], deadline
            )
            get_rc, _, get_tries = got.result()
            put_rc, put_answer, put_tries = sent.result()
        finished = time.monotonic() - killed
        if get_rc or put_rc:
            print("victim", victim_name, victim.url, "had", had)
            for node in c.nodes:
                print(node.url, pathlib.Path(node.stderr_path).read_text()[-3000:])
        assert get_rc == 0 and put_rc == 0, (get_rc, put_rc, put_answer)
        assert _sha(out) == _sha(payload)
        assert json.loads(put_answer)["bytes"] == size
        print(
            f"\nresumable node loss: {victim_name} killed with {had} of {size} bytes delivered;"
            f" both clients finished {finished:.1f} s after the kill"
            f" (GET {get_tries} attempts, PUT {put_tries}), body intact"
        )


def test_a_fan_out_ticket_through_haproxy_reaches_one_node_for_all_receivers(
    tmp_path: pathlib.Path, payloads: dict[int, pathlib.Path]
) -> None:
    """The receivers of a fan-out ticket all ask for /relay/<ticket>, so
    HAProxy's path hash takes them to one node, wherever the ticket was
    minted; the ticket's options travel in it (signed)."""
    with cluster_of(tmp_path) as c:
        payload = payloads[max(SIZES)]
        size = payload.stat().st_size
        status, answer = mint(c.url, receivers=3, max_rate=64 * 1024 * 1024)
        assert status == 201, answer
        assert (answer["receivers"], answer["max_rate"]) == (3, 64 * 1024 * 1024)
        url, ticket = answer["upload_url"], answer["ticket"]
        auth = f"Authorization: Bearer {ticket}"
        outs = [tmp_path / f"fan-{i}.bin" for i in range(3)]
        gets = [
            subprocess.Popen(
                _curl("-f", "-H", auth, "-o", str(out), "-D", f"{out}.head", url),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for out in outs
        ]
        try:
            put = subprocess.run(
                _curl("-H", auth, "-T", str(payload), url), capture_output=True, timeout=60
            )
            for get in gets:
                get.communicate(timeout=60)
        finally:
            for get in gets:
                if get.poll() is None:
                    get.kill()
                    get.communicate()
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout) == {
            "bytes": size,
            "status": "ok",
            "receivers": 3,
            "delivered": 3,
        }
        nodes = set()
        for get, out in zip(gets, outs, strict=True):
            assert get.returncode == 0
            assert _sha(out) == _sha(payload)
            head = pathlib.Path(f"{out}.head").read_text(errors="replace").lower()
            nodes.update(
                line.split(":", 1)[1].strip()
                for line in head.splitlines()
                if line.startswith("x-fastrelay-node:")
            )
        assert len(nodes) == 1, nodes  # one node served all three
        node = c.node_by_name(nodes.pop())
        assert c.metric(node, 'fastrelay_relays_total{outcome="ok"}') == 1
        assert c.metric(node, "fastrelay_fanout_receiver_bytes_total") == 3 * size
