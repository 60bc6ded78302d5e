"""A device on its own network link: a network namespace, a veth pair, and faults on that link.

``DeviceLink`` creates ``ip netns`` + a veth pair with a private /30 from 10.213.0.0/16 (picked
free), and removes both in ``close()`` whatever happened. Faults:

- ``cut()`` / ``restore()``: the host end of the veth goes down / up (the device is unreachable);
- ``shape(loss_pct, delay_ms)``: with ``tc netem`` where the kernel has it; where it has not (this
  project's CI kernel ships no ``sch_netem``), loss is dropped by nftables ``numgen random`` in
  both directions and the delay is added by ``DelayRelay``, the TCP relay through which the device
  reaches its broker, so the shape holds either way.

``skip_unless_netns()`` skips loudly where namespaces cannot be created (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

BASE_NET = ipaddress.ip_network("10.213.0.0/16")


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def skip_unless_netns() -> None:
    """Skip (loudly) unless this machine lets us create a network namespace with a veth pair."""
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"NETWORK NAMESPACE TESTS SKIPPED: {', '.join(missing)} not installed "
            "(apt-get install iproute2 nftables)"
        )
    probe = f"edprobe{uuid.uuid4().hex[:6]}"
    done = _run(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        pytest.skip(f"NETWORK NAMESPACE TESTS SKIPPED: 'ip netns add' is refused here: {done.stderr.strip()}")
    _run(["ip", "netns", "del", probe], check=False)


def _used_networks() -> set[ipaddress.IPv4Network]:
    text = _run(["ip", "-4", "-o", "addr", "show"]).stdout
    used = set()
    for line in text.splitlines():
        parts = line.split()
        if "inet" in parts:
            used.add(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)  # "ip -4": IPv4 only
    return used


def _netem_available() -> bool:
    probe = f"edq{uuid.uuid4().hex[:6]}"
    if _run(["ip", "netns", "add", probe], check=False).returncode != 0:
        return False
    try:
        done = _run(
            [
                "ip",
                "netns",
                "exec",
                probe,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
            check=False,
        )
        return done.returncode == 0
    finally:
        _run(["ip", "netns", "del", probe], check=False)


class DeviceLink:
    """A namespace ``name`` whose only way out is a veth pair: ``host_ip`` here, ``device_ip`` there."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"edns{tag}"
        self.host_dev = f"edh{tag}"
        self.device_dev = f"edd{tag}"
        used = _used_networks()
        subnet = next(n for n in BASE_NET.subnets(new_prefix=30) if not any(n.overlaps(u) for u in used))
        self.host_ip, self.device_ip = (str(a) for a in subnet.hosts())
        self.subnet = str(subnet)
        self.netem = _netem_available()
        self.relay: DelayRelay | None = None
        self._nft = False
        self._tbf = False
        try:
            _run(["ip", "netns", "add", self.name])
            _run(["ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.device_dev])
            _run(["ip", "link", "set", self.device_dev, "netns", self.name])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev])
            _run(["ip", "link", "set", self.host_dev, "up"])
            # While the link is cut its route is gone: without this, the host would send what it
            # meant for the device to its default gateway (which may answer) instead of losing it.
            _run(["ip", "route", "replace", "blackhole", self.subnet, "metric", "4000"])
            self.exec(["ip", "addr", "add", f"{self.device_ip}/30", "dev", self.device_dev])
            self.exec(["ip", "link", "set", self.device_dev, "up"])
            self.exec(["ip", "link", "set", "lo", "up"])
        except Exception:
            self.close()
            raise

    def exec(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (raises when it fails)."""
        return _run(["ip", "netns", "exec", self.name, *argv])

    def prefix(self) -> list[str]:
        """The argv prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """Take the link down: nothing passes until ``restore()``."""
        _run(["ip", "link", "set", self.host_dev, "down"])

    def restore(self) -> None:
        """Bring the link back up."""
        _run(["ip", "link", "set", self.host_dev, "up"])

    def shape(self, loss_pct: float = 0.0, delay_ms: float = 0.0, rate_kbit: int | None = None) -> str:
        """Impose loss, delay and (optionally) a rate limit on the link, both directions; returns how
        ("netem", or "nft+relay" with "+tbf" when rate-limited)."""
        self.unshape()
        if self.netem:
            args = ["delay", f"{delay_ms:g}ms", "loss", f"{loss_pct:g}%"]
            if rate_kbit is not None:
                args += ["rate", f"{rate_kbit}kbit"]
            self.exec(["tc", "qdisc", "add", "dev", self.device_dev, "root", "netem", *args])
            _run(["tc", "qdisc", "add", "dev", self.host_dev, "root", "netem", *args])
            return "netem"
        how = "nft+relay"
        if rate_kbit is not None:
            tbf = ["root", "tbf", "rate", f"{rate_kbit}kbit", "burst", "16kb", "latency", "500ms"]
            self.exec(["tc", "qdisc", "add", "dev", self.device_dev, *tbf])
            _run(["tc", "qdisc", "add", "dev", self.host_dev, *tbf])
            self._tbf = True
            how += "+tbf"
        if loss_pct > 0:
            percent = round(loss_pct)
            rule = f"numgen random mod 100 < {percent} drop"
            script = (  # nft needs a ';' or a newline before a chain's closing brace
                "table inet edfault {\n"
                f' chain out {{ type filter hook output priority 0; oifname != "lo" {rule};\n }}\n'
                f' chain in {{ type filter hook input priority 0; iifname != "lo" {rule};\n }}\n'
                "}\n"
            )
            done = subprocess.run(
                [*self.prefix(), "nft", "-f", "-"], input=script, text=True, check=False, capture_output=True
            )
            if done.returncode != 0:
                raise RuntimeError(f"nft refused the loss rules: {done.stderr.strip()}\n{script}")
            self._nft = True
        if self.relay is not None:
            self.relay.delay_s = delay_ms / 1000 / 2  # one way each direction: the round trip gets delay_ms
        return how

    def unshape(self) -> None:
        """Remove loss, delay and rate limit."""
        if self.netem or self._tbf:
            self.exec(["sh", "-c", f"tc qdisc del dev {self.device_dev} root 2>/dev/null || true"])
            _run(["tc", "qdisc", "del", "dev", self.host_dev, "root"], check=False)
            self._tbf = False
        if self._nft:
            _run(["ip", "netns", "exec", self.name, "nft", "delete", "table", "inet", "edfault"], check=False)
            self._nft = False
        if self.relay is not None:
            self.relay.delay_s = 0.0

    def host_bytes(self) -> tuple[int, int]:
        """``(sent to the device, received from it)``: the host end's interface counters, in bytes."""
        stats = Path("/sys/class/net") / self.host_dev / "statistics"
        return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())

    def close(self) -> None:
        """Remove the namespace and the veth pair (idempotent)."""
        if self.relay is not None:
            self.relay.close()
        _run(["ip", "netns", "del", self.name], check=False)  # takes the device end, hence the pair
        _run(["ip", "link", "del", self.host_dev], check=False)
        _run(["ip", "route", "del", "blackhole", self.subnet, "metric", "4000"], check=False)


@dataclass
class _Chunk:
    due: float
    data: bytes


class DelayRelay:
    """A TCP relay ``listen_host:port`` → ``target``, delaying each direction by ``delay_s``.

    It runs on its own event loop in a thread, so the test's loop never slows it down.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.listen_host = listen_host
        self.target = target
        self.delay_s = 0.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._serve, name="delay-relay", daemon=True)
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError(f"the delay relay on {listen_host} did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._connection, self.listen_host, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._started.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[_Chunk | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while (chunk := await queue.get()) is not None:
                wait = chunk.due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk.data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                await queue.put(_Chunk(loop.time() + self.delay_s, data))
            await queue.put(None)
            await sender
        finally:
            sender.cancel()

    def close(self) -> None:
        """Stop relaying and end the thread."""

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        if self._loop.is_running():
            self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)
