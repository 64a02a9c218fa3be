"""A true link loss for tests: two network namespaces joined by a veth pair.

A `FaultProxy` breaks connections from the middle, but both peers still sit
on a working loopback. Here the packets really stop: side "a" and side "b"
are network namespaces, each holding one end of a veth pair (10.200.X.1/30
and 10.200.X.2/30, addresses that exist only inside the two namespaces), and
`NetnsPair.link_down` takes one end down, as a pulled cable does. Nothing
is sent either way (no FIN, no RST); TCP keeps retransmitting until the link
comes back (`NetnsPair.link_up`) or its own timers give up::

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with NetnsPair() as pair:
        server = pair.call("b", lambda: socket.create_server((pair.addr_b, 0)))
        client = pair.call("a", lambda: socket.create_connection((pair.addr_b, port)))
        relay = pair.popen("b", ["fastrelay", "serve", ...])   # or a process
        pair.link_down("b")
        ...
        pair.link_up("b")

It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; `skip_reason`
says why it cannot work here. Namespace names are unique per pair and carry
the creating process's id: `NetnsPair.close` (the context manager's exit) and
an ``atexit`` hook delete them, and `remove_stale` deletes those left by a
process that died without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import os
import random
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

Side = Literal["a", "b"]
T = TypeVar("T")

PREFIX = "frt"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]+-[ab]$")
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"
_IP_TIMEOUT = 30.0

# Pairs not yet closed, deleted at interpreter exit if a test forgot to.
_live: set[NetnsPair] = set()
_live_lock = threading.Lock()


class NetnsError(RuntimeError):
    """An ``ip`` command failed (its stderr is in the message)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "ip"
    proc = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list").stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Delete namespaces made by this module in processes that no longer run; return them."""
    removed = []
    for name in list_namespaces():
        match = _NAME_RE.match(name)
        if not match or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


@functools.cache
def skip_reason() -> str | None:
    """Why namespaces cannot be used here (a string for `pytest.skip`), or None if they can.

    Tries the real thing (two namespaces and a veth pair, then removes them):
    containers often let root add a namespace but not a veth, or neither.
    """
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    if euid != 0:
        return f"network namespaces need root (effective uid is {euid})"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if _libc_setns() is None:
        return "setns(2) is not available through libc"
    try:
        with NetnsPair():
            pass
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot create network namespaces with a veth pair here: {exc}"
    return None


@functools.cache
def _libc_setns() -> Callable[[int, int], int] | None:
    # os.setns arrived in Python 3.12; on 3.11 go through libc.
    setns = getattr(os, "setns", None)
    if setns is not None:

        def call(fd: int, nstype: int) -> int:
            setns(fd, nstype)
            return 0

        return call
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path, use_errno=True)
    if not hasattr(libc, "setns"):
        return None
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int

    def call_libc(fd: int, nstype: int) -> int:
        if fn(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")
        return 0

    return call_libc


class NetnsPair:
    """Two network namespaces ("a" and "b") joined by a veth pair; a context manager.

    ``addr_a``/``addr_b``: each side's IPv4 address on the link (a /30 in
    10.200.0.0/16, visible only inside the namespaces). Loopback is up in
    both. Processes started with `popen` are killed on `close`.
    """

    def __init__(self, subnet: int | None = None) -> None:
        token = secrets.token_hex(3)
        self.ns_a = f"{PREFIX}-{os.getpid()}-{token}-a"
        self.ns_b = f"{PREFIX}-{os.getpid()}-{token}-b"
        # Interface names are limited to 15 characters.
        self.veth_a = f"{PREFIX}{token}a"
        self.veth_b = f"{PREFIX}{token}b"
        # Any /30 would do (the addresses never leave the namespaces); a random
        # one makes a clash between two pairs visible as nothing at all.
        third = random.randrange(256) if subnet is None else subnet
        self.addr_a = f"10.200.{third}.1"
        self.addr_b = f"10.200.{third}.2"
        self.prefixlen = 30
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        with _live_lock:
            _live.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        _ip("netns", "add", self.ns_a)
        _ip("netns", "add", self.ns_b)
        # Create both ends directly inside their namespaces: the veth never
        # exists in the host's namespace, so nothing can be left behind there.
        _ip(
            "link", "add", self.veth_a, "netns", self.ns_a, "type", "veth",
            "peer", "name", self.veth_b, "netns", self.ns_b,
        )  # fmt: skip
        for ns, dev, addr in ((self.ns_a, self.veth_a, self.addr_a), (self.ns_b, self.veth_b, self.addr_b)):  # fmt: skip
            _ip("-n", ns, "addr", "add", f"{addr}/{self.prefixlen}", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def namespace(self, side: Side) -> str:
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', not {side!r}")
        return self.ns_a if side == "a" else self.ns_b

    def device(self, side: Side) -> str:
        return self.veth_a if self.namespace(side) == self.ns_a else self.veth_b

    def address(self, side: Side) -> str:
        return self.addr_a if self.namespace(side) == self.ns_a else self.addr_b

    def command(self, side: Side, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace (``ip netns exec NAME ...``)."""
        ip = shutil.which("ip") or "ip"
        return [ip, "netns", "exec", self.namespace(side), *argv]

    def run(
        self, side: Side, argv: Sequence[str], *, timeout: float = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace to completion (``check=True`` by default)."""
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.command(side, argv), timeout=timeout, **kwargs)

    def popen(self, side: Side, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; `close` kills it if it still runs."""
        proc = subprocess.Popen(self.command(side, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def call(self, side: Side, fn: Callable[[], T]) -> T:
        """Run ``fn`` in this process, inside the namespace, and return its result.

        It runs on a fresh thread that joins the namespace (setns affects only
        the calling thread) and then ends, so the caller's thread never
        changes namespace. Sockets ``fn`` creates stay in the namespace for
        their whole life: ``pair.call("a", lambda: socket.create_connection(...))``
        gives the test a client socket on side "a". Sockets created later by
        other threads (a connection pool's, say) are *not* in it.
        """
        setns = _libc_setns()
        if setns is None:
            raise OSError("setns(2) is not available")
        path = os.path.join(_NETNS_DIR, self.namespace(side))
        outcome: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd, _CLONE_NEWNET)
                finally:
                    os.close(fd)
                outcome["value"] = fn()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=body, name=f"netns:{self.namespace(side)}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def link_down(self, side: Side = "b") -> None:
        """Take one end of the link down; the other end loses its carrier too.

        Downing side "b" looks to side "a" like a cable pulled at the far end:
        "a" keeps its address and route, and what it sends is silently lost.
        (Downing an end also removes that end's own connected route, so new
        connections *from* that side fail at once with "network unreachable".)
        """
        _ip("-n", self.namespace(side), "link", "set", self.device(side), "down")

    def link_up(self, side: Side = "b") -> None:
        _ip("-n", self.namespace(side), "link", "set", self.device(side), "up")

    def link_state(self, side: Side) -> str:
        """The end's operational state as the kernel reports it ("UP" or "DOWN").

        With one end down, the other end is "DOWN" too (no carrier), though
        still administratively up.
        """
        out = _ip("-n", self.namespace(side), "-o", "link", "show", self.device(side)).stdout
        match = re.search(r"\bstate (\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def close(self) -> None:
        """Kill processes started by `popen`, delete both namespaces (and with them the veth pair)."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        # Deleting a namespace destroys the veth end inside it, and a veth
        # end takes its peer with it.
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "del", ns, check=False)
        with _live_lock:
            _live.discard(self)


@atexit.register
def _close_all() -> None:
    with _live_lock:
        pairs = list(_live)
    for pair in pairs:
        with contextlib.suppress(Exception):
            pair.close()
