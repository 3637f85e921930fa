"""Separate "hosts" for the multi-node tests: one Linux network namespace per node, each joined by
a veth pair to a bridge in the test's own namespace (needs root and `ip`). What runs in a node's
namespace reaches the others only through the bridge, so a node can be cut off (partition) by
taking its link down. Where namespaces cannot be made, tests fall back to loopback addresses.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def can_make() -> bool:
    """Whether this process may create network namespaces (root, with `ip` installed);
    KVSTORE_TEST_NO_NETNS=1 says no (to run the loopback fallback)."""
    if os.environ.get("KVSTORE_TEST_NO_NETNS") or os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"kvsp{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.SubprocessError, OSError):
        return False
    _ip("netns", "del", probe)
    return True


@dataclass
class Hosts:
    """Named nodes, each a namespace with one address on a private /24; the bridge's address
    (.1) is this namespace's, where shared services (Valkey) listen."""

    names: tuple[str, ...] = ("a", "b")
    # Interface names are at most 15 characters: a short tag unique to this process and run.
    tag: str = field(default_factory=lambda: f"kv{os.getpid() % 10000}{random.randrange(100)}")
    subnet: str = field(default_factory=lambda: f"10.{random.randrange(200, 250)}."
                                                f"{random.randrange(256)}")
    is_up: bool = False

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    def ip_of(self, name: str) -> str:
        return f"{self.subnet}.{2 + self.names.index(name)}"

    def wrap(self, name: str) -> list[str]:
        """The command prefix that runs a process on node name."""
        return ["ip", "netns", "exec", self._ns(name)]

    def start(self) -> Hosts:
        bridge = f"{self.tag}br"
        try:
            _ip("link", "add", bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_ip}/24", "dev", bridge)
            _ip("link", "set", bridge, "up")
            for name in self.names:
                ns, outer, inner = self._ns(name), f"{self.tag}{name}0", f"{self.tag}{name}1"
                _ip("netns", "add", ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.ip_of(name)}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
            self.is_up = True
        except BaseException:
            self.stop()
            raise
        return self

    def cut(self, name: str) -> None:
        """Partition node name from everyone (its link to the bridge goes down)."""
        _ip("link", "set", f"{self.tag}{name}0", "down")

    def heal(self, name: str) -> None:
        """End the partition of node name (its link to the bridge comes back up)."""
        _ip("link", "set", f"{self.tag}{name}0", "up")

    def slow(self, name: str, rate: str = "80mbit") -> None:
        """Limit what reaches node name to rate (a token bucket on its link's bridge end), so a
        transfer to it lasts long enough to be cut in the middle."""
        subprocess.run(["tc", "qdisc", "add", "dev", f"{self.tag}{name}0", "root", "tbf", "rate",
                        rate, "burst", "256kb", "latency", "5s"], check=True, capture_output=True,
                       timeout=10)

    def stop(self) -> None:
        for name in self.names:
            # The veth first: a namespace outlives its name while sockets in it linger (a cut
            # link's retransmissions), and its end of the pair with it.
            subprocess.run(["ip", "link", "del", f"{self.tag}{name}0"], capture_output=True,
                           timeout=10)
            subprocess.run(["ip", "netns", "del", self._ns(name)], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True, timeout=10)
        self.is_up = False

    def _ns(self, name: str) -> str:
        return f"{self.tag}{name}"
