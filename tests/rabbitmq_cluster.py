"""A 3-node RabbitMQ cluster (Debian's rabbitmq-server 3.10, MQTT plugin) on loopback, for tests.

Each node has its own name (``edge<random>-<n>@localhost``), data and log folders, AMQP, MQTT and
distribution ports (free loopback ports), and the plugin enabled through its own
``enabled_plugins`` file; all share one Erlang cookie (a private ``HOME`` for the nodes and
``rabbitmqctl``). Nodes 2 and 3 ``join_cluster`` node 1. ``kill(i)`` SIGKILLs a node and
``restart(i)`` starts it again on the same ports and data, where it rejoins the cluster.
``ServiceUnavailable`` says why when a node cannot start.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cloud.broker_rabbitmq import NODE_SETTINGS
from tests.services import HOST, ServiceUnavailable, fixed_port, log_tail

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
START_S = 120.0
CTL_S = 120.0


class RabbitNode:
    """One node: its ports, folders and process."""

    def __init__(self, root: Path, name: str, home: Path) -> None:
        self.name = name
        self.dir = root / name.split("@")[0]
        self.home = home
        # Below the ephemeral range: a restarted node must get its ports back (see fixed_port).
        self.amqp_port = fixed_port()
        self.mqtt_port = fixed_port()
        self.dist_port = fixed_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.dir.mkdir(parents=True)
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = {HOST}:{self.amqp_port}",
                    f"mqtt.listeners.tcp.1 = {HOST}:{self.mqtt_port}",
                    "mqtt.allow_anonymous = false",
                    "loopback_users = none",
                    "log.console = false",
                    "log.file.level = info",
                    *NODE_SETTINGS,
                ]
            )
            + "\n"
        )
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")

    @property
    def mqtt_url(self) -> str:
        """``mqtt://127.0.0.1:<MQTT port>``."""
        return f"mqtt://{HOST}:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
        }

    def start(self) -> None:
        """Start the node's process (returns at once; ``await_startup`` waits for it)."""
        self.process = subprocess.Popen(
            [str(SERVER)],
            env=self.env(),
            stdout=(self.dir / "stdout.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.dir,  # an Erlang crash dump lands with the node's files
        )

    def ctl(self, *args: str, timeout_s: float = CTL_S) -> str:
        """``rabbitmqctl -n <node> ARGS``; ServiceUnavailable with its output when it fails."""
        try:
            done = subprocess.run(
                [str(CTL), "-n", self.name, "-q", *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"rabbitmqctl {' '.join(args)} on {self.name}: no answer") from None
        if done.returncode != 0:
            raise ServiceUnavailable(
                f"rabbitmqctl {' '.join(args)} on {self.name} failed: {(done.stderr or done.stdout).strip()}"
            )
        return done.stdout

    def await_startup(self) -> None:
        """Wait until the node runs (ServiceUnavailable with its log's tail when it died or hung)."""
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceUnavailable(
                    f"rabbitmq node {self.name} exited with {self.process.returncode}: "
                    f"{log_tail(self.dir / 'stdout.log')}"
                )
            try:
                self.ctl("await_startup", timeout_s=30)
                return
            except ServiceUnavailable:
                time.sleep(0.5)
        raise ServiceUnavailable(f"rabbitmq node {self.name} did not start within {START_S:.0f} s")

    def kill(self) -> None:
        """SIGKILL the node (its whole process group: the Erlang VM and its helpers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """Stop the node if it runs (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


class RabbitCluster:
    """Three clustered nodes; ``nodes[0]`` is the one the others joined."""

    def __init__(self, root: Path, size: int = 3) -> None:
        if not SERVER.is_file() or not CTL.is_file():
            raise ServiceUnavailable("rabbitmq-server not installed: apt-get install rabbitmq-server")
        home = root / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        prefix = f"edge{uuid.uuid4().hex[:6]}"
        self.nodes = [RabbitNode(root, f"{prefix}-{i + 1}@localhost", home) for i in range(size)]

    @property
    def mqtt_urls(self) -> list[str]:
        """Every node's MQTT URL, in node order."""
        return [n.mqtt_url for n in self.nodes]

    def start(self) -> None:
        """Start every node, then join nodes 2.. to node 1."""
        for node in self.nodes:
            node.start()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(RabbitNode.await_startup, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
        running = first.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(len(self.nodes)):
            raise ServiceUnavailable(f"rabbitmq cluster: {running} of {len(self.nodes)} nodes running")

    def restart(self, index: int) -> None:
        """Start a killed node again (same name, ports and data): it rejoins the cluster."""
        node = self.nodes[index]
        node.start()
        node.await_startup()

    def running_nodes(self) -> int:
        """How many nodes the first live node sees running."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                return int(node.ctl("eval", "length(rabbit_nodes:all_running()).").strip())
        return 0

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
