"""fastrelay cluster benchmark: 1 node vs 2 nodes behind HAProxy, side by side.

    python -m bench.cluster            # full run (16 x 64 MiB streams, 3000 relays; ~3 min)
    python -m bench.cluster --quick    # CI: 4 x 8 MiB, 100 relays, integrity checks only

One run measures every setup next to its floor, on the same machine:

- ``streams``: ``--streams`` concurrent ``--stream-size`` plain transfers (lean
  forked clients, `bench.load.stream_pairs`) directly to 1 node (the floor),
  through HAProxy (deploy/haproxy.cfg) to 1 node and to 2 nodes, and over
  plain loopback with no relay at all;
- ``small``: ``--fresh-pairs`` 4 KiB relays, ``--concurrency`` at a time,
  mint + PUT + GET each on a new connection (`bench.load._small_relays`),
  directly to 1 node, through HAProxy to 1 and 2 nodes, and to 2 nodes
  sharing a redis-server (``--redis-url``);
- ``tls``: the streams over TLS ended at HAProxy (plain HTTP to 1 node, which
  keeps its splice(2) path) vs fastrelay's own TLS (``--certfile`` on 1 node).

Nodes run in one-address mode: a ticket key file made at run time, HAProxy's
URL as ``--public-url`` (direct nodes: their own). CPU is user+sys of every
node, HAProxy and redis-server process (psutil) around each timed round, by
kind; "clients" is this process and its forked senders/receivers
(getrusage). Each setup does one verified round, then ``--rounds`` timed
rounds (median), as `bench.load.measure` does. Nothing here asserts a
timing; ``--quick`` fails (exit 1) only on a short or corrupted transfer or a
node that did not serve.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import resource
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import uvloop

from tests.cluster.processes import HAPROXY_CFG, HAProxy, Node, RedisServer, free_port

from . import servers
from .clients import Endpoint, random_file
from .load import (
    MIB,
    Env,
    _small_relays,
    direct_streams,
    environment,
    mbps,
    measure,
    stream_pairs,
)
from .record import IntegrityError


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _clients_cpu() -> float:
    """CPU of this process and its reaped children (the forked stream clients)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


class Tier(servers.Server):
    """The relay tier as one `servers.Server`: the address clients use, and the
    processes whose CPU counts, by kind.

    `cpu_s` (what `bench.load.measure` reads before and after each timed
    round) returns the tier's total and keeps every sample by kind, so a
    measurement yields the median per kind as well.
    """

    def __init__(
        self,
        name: str,
        endpoint: Endpoint,
        procs: dict[str, list[int]],
        haproxy: HAProxy | None = None,
        nodes: list[Node] | None = None,
    ) -> None:
        first = next(pid for pids in procs.values() for pid in pids)
        super().__init__(f"fastrelay-{name}", endpoint, first)
        self.label = name
        self.kinds = {k: [psutil.Process(p) for p in pids] for k, pids in procs.items()}
        self.haproxy = haproxy
        self.nodes = nodes or []
        self.samples: list[dict[str, float]] = []

    def by_kind(self) -> dict[str, float]:
        out = {k: sum(_cpu(p) for p in ps) for k, ps in self.kinds.items()}
        out["clients"] = _clients_cpu()
        return out

    def cpu_s(self) -> float:
        sample = self.by_kind()
        self.samples.append(sample)
        return sum(v for k, v in sample.items() if k != "clients")

    def relay_requests(self) -> list[int]:
        """Relay requests (PUT or GET) HAProxy sent to each node so far."""
        if self.haproxy is None:
            return []
        got = self.haproxy.server_sessions("relay")
        return [got.get(f"node{i}", 0) for i in range(1, len(self.nodes) + 1)]

    def check_alive(self) -> None:
        for proc in [*self.nodes, *([self.haproxy] if self.haproxy else [])]:
            if not proc.running:
                raise IntegrityError(f"{self.label}: {proc.name} exited ({proc.returncode})")


@dataclasses.dataclass
class Result:
    scenario: str  # streams, small, tls
    setup: str
    unit: str  # MB/s or relays/s
    rate: float
    per: str  # s/GiB or ms/relay
    cpu: dict[str, float]  # per kind (and "total" = relay tier, "clients") per unit of work
    split: list[int]  # relay requests per node (through HAProxy)
    note: str = ""


def per_round(tier: Tier) -> dict[str, float]:
    """Median CPU seconds per timed round, by kind and in total (relay tier)."""
    s = tier.samples
    if not s or len(s) % 2:
        raise RuntimeError(f"unexpected CPU samples ({len(s)}): bench.load.measure changed?")
    rounds = [{k: b[k] - a[k] for k in b} for a, b in zip(s[::2], s[1::2], strict=True)]
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["total"] = statistics.median(sum(v for k, v in r.items() if k != "clients") for r in rounds)
    return out


# --- the setups --------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    nodes: int
    haproxy: bool
    redis: bool = False
    haproxy_tls: bool = False
    node_tls: bool = False
    haproxy_splice: bool = False  # the --haproxy-splice variant of the configuration

    @property
    def label(self) -> str:
        if not self.haproxy:
            return f"direct, {self.nodes} node" + (", node TLS" if self.node_tls else "")
        s = f"HAProxy, {self.nodes} node{'s' if self.nodes > 1 else ''}"
        s += " + Redis" if self.redis else ""
        s += ", HAProxy splice" if self.haproxy_splice else ""
        return s + (", TLS at HAProxy" if self.haproxy_tls else "")


@contextlib.contextmanager
def tier(env: Env, keyfile: str, pem: str, setup: Setup) -> Iterator[Tier]:
    """Start redis-server, the nodes and HAProxy for ``setup``; stop them all."""
    a = env.args
    with contextlib.ExitStack() as stack:
        procs: dict[str, list[int]] = {}
        hport = free_port()
        common = [
            "--ticket-key-file", keyfile,
            "--max-per-workspace", "100000",
            "--max-pending", "100000",
            "--log-level", "WARNING",
            "--loop", a.loop,
            *a.server_arg,
        ]  # fmt: skip
        if setup.redis:
            redis = stack.enter_context(RedisServer())
            common += ["--redis-url", redis.url]
            procs["redis"] = [redis.pid]
        if setup.haproxy:
            common += ["--public-url", f"http://127.0.0.1:{hport}"]
        if setup.node_tls:
            common += ["--certfile", env.cert[0], "--keyfile", env.cert[1]]
        nodes = [
            stack.enter_context(Node(common, secret=servers.SECRET)) for _ in range(setup.nodes)
        ]
        procs["nodes"] = [n.pid for n in nodes]
        proxy = None
        if setup.haproxy:
            proxy = stack.enter_context(
                HAProxy(
                    [n.address for n in nodes],
                    port=hport,
                    check_inter="1s",
                    tls_pem=pem if setup.haproxy_tls else None,
                    config=a.splice_config if setup.haproxy_splice else a.haproxy_config,
                )
            )
            proxy.wait_all_up(timeout=15)
            procs["haproxy"] = [proxy.pid]
            port = proxy.tls_port if setup.haproxy_tls else proxy.port
            assert port is not None
        else:
            port = nodes[0].port
        tls = setup.haproxy_tls or setup.node_tls
        ep = Endpoint("127.0.0.1", port, env.client_ssl if tls else None)
        yield Tier(setup.label, ep, procs, proxy, nodes)


def tls_cipher(ep: Endpoint) -> str:
    with ep.connect() as sock:
        cipher = sock.cipher()  # type: ignore[attr-defined]
        return f"{sock.version()} {cipher[0] if cipher else '?'}"  # type: ignore[attr-defined]


def run_streams(
    env: Env, keyfile: str, pem: str, setup: Setup, scenario: str, path: str, sha: str
) -> Result:
    a = env.args
    n, size = a.streams, a.stream_size
    with tier(env, keyfile, pem, setup) as t:
        note = tls_cipher(t.endpoint) if t.endpoint.ssl is not None else ""
        r0 = t.relay_requests()
        secs, _ = measure(t, a.rounds, lambda v: stream_pairs(t, path, size, sha, n, verify=v))
        split = [x - y for x, y in zip(t.relay_requests(), r0, strict=True)]
        t.check_alive()
        cpu = per_round(t)
    gib = n * size / 2**30
    return Result(
        scenario,
        setup.label,
        "MB/s",
        mbps(n * size, secs),
        "s/GiB",
        {k: v / gib for k, v in cpu.items()},
        split,
        note,
    )


def run_small(env: Env, keyfile: str, pem: str, setup: Setup) -> Result:
    a = env.args
    pairs = a.fresh_pairs

    def once(t: Tier) -> float:
        rate = float(uvloop.run(_small_relays(t, pairs, a.concurrency, fresh_mint=True)))
        return pairs / rate

    with tier(env, keyfile, pem, setup) as t:
        r0 = t.relay_requests()
        secs, _ = measure(t, a.rounds, lambda _v: once(t))
        split = [x - y for x, y in zip(t.relay_requests(), r0, strict=True)]
        t.check_alive()
        if len(split) > 1 and min(split) == 0:
            raise IntegrityError(f"{setup.label}: a node served no relay request ({split})")
        cpu = per_round(t)
    return Result(
        "small",
        setup.label,
        "relays/s",
        pairs / secs,
        "ms/relay",
        {k: v * 1000 / pairs for k, v in cpu.items()},
        split,
    )


def run_loopback(env: Env, path: str, sha: str) -> Result:
    """The floor under every relay: ``n`` plain loopback connections, no relay."""
    a = env.args
    n, size = a.streams, a.stream_size
    direct_streams(path, size, sha, n, verify=True)
    c0 = _clients_cpu()
    secs = statistics.median(direct_streams(path, size, sha, n, False) for _ in range(a.rounds))
    gib = n * size / 2**30
    clients = (_clients_cpu() - c0) / a.rounds / gib
    return Result(
        "streams",
        "loopback, no relay",
        "MB/s",
        mbps(n * size, secs),
        "s/GiB",
        {"clients": clients},
        [],
        "sender + receiver threads in this process",
    )


def splice_variant(config: str, workdir: pathlib.Path) -> str:
    """A copy of ``config`` whose defaults add `option splice-request` and
    `option splice-response`: HAProxy then forwards bodies with splice(2)
    (`option splice-auto` alone did not, with HAProxy 2.6 and these clients)."""
    text = pathlib.Path(config).read_text()
    if text.count("\ndefaults\n") != 1:
        raise RuntimeError(f"{config}: no single `defaults` section to add splicing to")
    out = workdir / "haproxy-splice.cfg"
    out.write_text(
        text.replace(
            "\ndefaults\n", "\ndefaults\n    option splice-request\n    option splice-response\n"
        )
    )
    return str(out)


# --- driver --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI)")
    p.add_argument("--streams", type=int, help="concurrent transfers (16; quick 4)")
    p.add_argument("--stream-size", type=int, help="bytes per transfer (64 MiB; quick 8 MiB)")
    p.add_argument("--fresh-pairs", type=int, help="small relays per round (3000; quick 100)")
    p.add_argument("--concurrency", type=int, default=32, help="small relays at a time")
    p.add_argument("--rounds", type=int, help="timed rounds per setup, median kept (3; quick 1)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra argument for every `fastrelay serve` (repeatable)",
    )
    p.add_argument(
        "--haproxy-config",
        default=str(HAPROXY_CFG),
        help="HAProxy configuration to run (default deploy/haproxy.cfg; e.g. a variant)",
    )
    p.add_argument(
        "--haproxy-splice",
        action="store_true",
        help="also run the plain streams through a copy of that configuration with "
        "`option splice-request` and `option splice-response` (HAProxy moves bodies "
        "with splice(2) instead of recv/send)",
    )
    p.add_argument("--only", help="comma-separated: streams, small, tls")
    p.add_argument("--json", default="bench/results/cluster.json", help="where to write results")
    a = p.parse_args(argv)
    q = a.quick
    a.streams = a.streams or (4 if q else 16)
    a.stream_size = a.stream_size or (8 * MIB if q else 64 * MIB)
    a.fresh_pairs = a.fresh_pairs or (100 if q else 3000)
    a.rounds = a.rounds or (1 if q else 3)
    a.haproxy_config = str(pathlib.Path(a.haproxy_config).resolve())  # HAProxy runs elsewhere
    return a


def run(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    only = set(args.only.split(",")) if args.only else {"streams", "small", "tls"}
    results: list[Result] = []
    started = time.perf_counter()
    with environment(args) as env:
        keyfile = str(env.workdir / "ticket-keys")
        pathlib.Path(keyfile).write_text(base64.b64encode(secrets.token_bytes(32)).decode())
        os.chmod(keyfile, 0o600)
        pem = str(env.workdir / "haproxy.pem")
        pathlib.Path(pem).write_text(
            pathlib.Path(env.cert[0]).read_text() + pathlib.Path(env.cert[1]).read_text()
        )
        args.splice_config = splice_variant(args.haproxy_config, env.workdir)
        size = args.stream_size
        path = str(env.workdir / f"payload-{size}.bin")
        sha = random_file(path, size)

        def step(fn: Callable[[], Result]) -> None:
            t0 = time.perf_counter()
            r = fn()
            results.append(r)
            print(
                f"  {r.scenario:7} {r.setup:34} {r.rate:9.1f} {r.unit:8} "
                f"tier {r.cpu.get('total', 0):.3f} {r.per} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

        if "streams" in only:
            setups = [Setup(1, False), Setup(1, True), Setup(2, True)]
            if args.haproxy_splice:
                setups += [Setup(1, True, haproxy_splice=True), Setup(2, True, haproxy_splice=True)]
            for s in setups:
                step(lambda s=s: run_streams(env, keyfile, pem, s, "streams", path, sha))
            step(lambda: run_loopback(env, path, sha))
        if "small" in only:
            for s in (Setup(1, False), Setup(1, True), Setup(2, True), Setup(2, True, redis=True)):
                step(lambda s=s: run_small(env, keyfile, pem, s))
        if "tls" in only:
            for s in (Setup(1, True, haproxy_tls=True), Setup(1, False, node_tls=True)):
                step(lambda s=s: run_streams(env, keyfile, pem, s, "tls", path, sha))
    report(results, args, time.perf_counter() - started)
    return results


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(results: list[Result], scenario: str, title: str) -> list[str]:
    rows = [r for r in results if r.scenario == scenario]
    if not rows:
        return []
    base = rows[0]
    per = base.per
    out = [
        f"### {title}",
        "",
        f"| setup | {base.unit} | vs {base.setup} | CPU {per}: nodes | HAProxy | redis | "
        f"relay tier total | clients | cores busy | tier capacity per core | relay requests per node | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r.cpu.get("total")
        if total:
            cap = f"{1 / total:.2f} GiB/s" if per == "s/GiB" else f"{1000 / total:.0f} relays/s"
        else:
            cap = "-"
        work_per_s = r.rate * 1e6 / 2**30 if per == "s/GiB" else r.rate / 1000
        busy = ((total or 0.0) + r.cpu.get("clients", 0.0)) * work_per_s
        out.append(
            f"| {r.setup} | {r.rate:.0f} | {r.rate / base.rate:.2f}x | "
            f"{_fmt(r.cpu.get('nodes'))} | {_fmt(r.cpu.get('haproxy'))} | "
            f"{_fmt(r.cpu.get('redis'))} | {_fmt(total)} | "
            f"{_fmt(r.cpu.get('clients'))} | {busy:.2f} | {cap} | "
            f"{'/'.join(map(str, r.split)) or '-'} | {r.note or '-'} |"
        )
    return [*out, ""]


def report(results: list[Result], args: argparse.Namespace, seconds: float) -> None:
    n, size = args.streams, args.stream_size
    lines = [
        *table(
            results,
            "streams",
            f"{n} concurrent {size // MIB} MiB transfers, plain (median of {args.rounds})",
        ),
        *table(
            results,
            "small",
            f"{args.fresh_pairs} x 4 KiB relays, {args.concurrency} at a time, mint + PUT + GET "
            f"each on a new connection (median of {args.rounds})",
        ),
        *table(
            results,
            "tls",
            f"{n} concurrent {size // MIB} MiB transfers, TLS (median of {args.rounds})",
        ),
    ]
    print("\n".join(lines))
    machine = (
        f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total // 2**30} GiB, Python {platform.python_version()}, "
        f"loop {args.loop}"
    )
    print(f"machine: {machine}; run took {seconds:.0f} s")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "machine": machine,
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [dataclasses.asdict(r) for r in results],
    }
    out.write_text(json.dumps(doc, indent=2))


def main() -> int:
    try:
        run(sys.argv[1:])
    except IntegrityError as exc:
        print(f"bench: INTEGRITY FAILURE: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
