"""Network namespaces for a local network: one per node on a private bridge, with iptables partitions."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Every network lives in 10.213.<octet>.0/24; the octet is the network's identity and is part of every
# namespace and interface name, so concurrent runs on one machine never share a name or an address.
subnet_prefix = "10.213"
subnet_octet_first = 1
subnet_octet_last = 250
host_address_octet = 254
# Linux limits interface names to 15 bytes; "tonle250" is 8.
interface_name_bytes_max = 15
command_timeout_seconds = 20.0
allocation_lock_path = Path("/run/lock/tonle-netns.lock")
state_file_name = "chaos-network.json"
required_programs = ("ip", "iptables")


class NetworkError(RuntimeError):
    """A namespace, link or firewall command failed; the message carries the command and its output."""


def _run(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=command_timeout_seconds, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NetworkError(f"{' '.join(command)}: {error}") from None
    if completed.returncode != 0:
        raise NetworkError(f"{' '.join(command)} exited {completed.returncode}: {completed.stderr.strip()}")
    return completed.stdout


def unavailable_reason() -> str | None:
    """Why nodes cannot get namespaces on this machine (None when they can): checked by doing it once."""
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    missing = [program for program in required_programs if shutil.which(program) is None]
    if missing:
        return f"missing programs {missing} (apt-get install iproute2 iptables)"
    probe = f"tonle-probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"])
        finally:
            _run(["ip", "netns", "del", probe])
    except NetworkError as error:
        return str(error)
    return None


def _existing_namespaces() -> set[str]:
    return {line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()}


def _routed_octets() -> set[int]:
    """Octets of 10.213.x.0/24 that something on this machine already routes (ours or anyone's)."""
    octets = set()
    for line in _run(["ip", "-4", "route", "show"]).splitlines():
        destination = line.split()[0]
        if destination.startswith(subnet_prefix + "."):
            octets.add(int(destination.split(".")[2]))
    return octets


@dataclass(frozen=True, slots=True)
class NamespaceNetwork:
    """Nodes `names`, each in namespace `tonle<octet>-<name>` with address 10.213.<octet>.<n>, on a bridge
    in `tonle<octet>-hub`; this (root) namespace reaches them through interface `tonle<octet>` at .254."""

    octet: int
    names: tuple[str, ...]

    # Naming ---------------------------------------------------------------------------------------------

    @property
    def hub(self) -> str:
        return f"tonle{self.octet}-hub"

    @property
    def host_interface(self) -> str:
        return f"tonle{self.octet}"

    @property
    def host_address(self) -> str:
        return f"{subnet_prefix}.{self.octet}.{host_address_octet}"

    def namespace(self, name: str) -> str:
        return f"tonle{self.octet}-{name}"

    def address(self, name: str) -> str:
        return f"{subnet_prefix}.{self.octet}.{self.names.index(name) + 1}"

    def addresses(self) -> dict[str, str]:
        return {name: self.address(name) for name in self.names}

    def command_prefix(self, name: str) -> list[str]:
        """Run a command inside `name`'s namespace; `ip netns exec` execs, so the pid is the command's."""
        return ["ip", "netns", "exec", self.namespace(name)]

    # Life cycle -----------------------------------------------------------------------------------------

    @classmethod
    def create(cls, names: Iterable[str], directory: Path, *, octet: int | None = None) -> NamespaceNetwork:
        """Allocate a free subnet (or the given one, which must be free), build the namespaces and links, and
        record the layout in `directory` (kept after `destroy`, so the network can be rebuilt there)."""
        chosen = tuple(names)
        if len(chosen) >= host_address_octet:
            raise NetworkError(f"{len(chosen)} nodes do not fit in one /24 next to the host address")
        allocation_lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(allocation_lock_path, "w") as lock:  # serialises allocation between concurrent runs
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = _existing_namespaces()
            taken = _routed_octets() | {
                int(namespace[len("tonle") :].split("-")[0])
                for namespace in existing
                if namespace.startswith("tonle") and namespace[len("tonle") :].split("-")[0].isdigit()
            }
            free = [octet for octet in range(subnet_octet_first, subnet_octet_last + 1) if octet not in taken]
            if octet is not None and octet not in free:
                raise NetworkError(f"subnet {subnet_prefix}.{octet}.0/24 is in use: stop whatever holds it and retry")
            if not free:
                raise NetworkError("every 10.213.x.0/24 subnet is in use: remove stale tonle* namespaces")
            network = cls(octet if octet is not None else free[0], chosen)
            network._record(directory)
            try:
                network._build()
            except NetworkError:
                network.destroy()
                raise
        return network

    @classmethod
    def load(cls, directory: Path) -> NamespaceNetwork | None:
        path = directory / state_file_name
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        return cls(int(document["octet"]), tuple(document["names"]))

    def _record(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        document = {"octet": self.octet, "names": list(self.names), "addresses": self.addresses(), "hub": self.hub}
        (directory / state_file_name).write_text(json.dumps(document, indent=2) + "\n")

    def _build(self) -> None:
        if len(self.host_interface) > interface_name_bytes_max:
            raise NetworkError(f"interface name {self.host_interface} is longer than {interface_name_bytes_max} bytes")
        _run(["ip", "netns", "add", self.hub])
        _run(["ip", "-n", self.hub, "link", "add", "bridge0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "bridge0", "up"])
        for position, name in enumerate(self.names, start=1):
            namespace = self.namespace(name)
            port = f"node{position}"
            _run(["ip", "netns", "add", namespace])
            _run(["ip", "-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.hub])
            _run(["ip", "-n", self.hub, "link", "set", port, "master", "bridge0"])
            _run(["ip", "-n", self.hub, "link", "set", port, "up"])
            _run(["ip", "-n", namespace, "addr", "add", f"{self.address(name)}/24", "dev", "eth0"])
            _run(["ip", "-n", namespace, "link", "set", "eth0", "up"])
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
        _run(["ip", "link", "add", self.host_interface, "type", "veth", "peer", "name", "host", "netns", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", "host", "master", "bridge0"])
        _run(["ip", "-n", self.hub, "link", "set", "host", "up"])
        _run(["ip", "addr", "add", f"{self.host_address}/24", "dev", self.host_interface])
        _run(["ip", "link", "set", self.host_interface, "up"])

    def destroy(self) -> list[str]:
        """Remove every namespace and link of this network that still exists; return what failed."""
        failures = []
        existing = _existing_namespaces()
        if Path(f"/sys/class/net/{self.host_interface}").exists():
            try:
                _run(["ip", "link", "del", self.host_interface])
            except NetworkError as error:
                failures.append(str(error))
        for namespace in [*(self.namespace(name) for name in self.names), self.hub]:
            if namespace in existing:
                try:
                    _run(["ip", "netns", "del", namespace])
                except NetworkError as error:
                    failures.append(str(error))
        return failures

    # Partitions -----------------------------------------------------------------------------------------

    def block(self, source: str, destination: str) -> None:
        """Drop every packet from `source` to `destination` (one way), at both ends so neither leaks."""
        _run(["ip", "netns", "exec", self.namespace(source), "iptables", "-w", "-A", "OUTPUT",
              "-d", self.address(destination), "-j", "DROP"])
        _run(["ip", "netns", "exec", self.namespace(destination), "iptables", "-w", "-A", "INPUT",
              "-s", self.address(source), "-j", "DROP"])

    def heal(self) -> None:
        """Remove every rule: all nodes reach each other again (connections reopen on their own)."""
        for name in self.names:
            _run(["ip", "netns", "exec", self.namespace(name), "iptables", "-w", "-F"])

    def rules(self, name: str) -> list[str]:
        """The rules now in force in `name`'s namespace, as `iptables -S` prints them (for the report)."""
        output = _run(["ip", "netns", "exec", self.namespace(name), "iptables", "-w", "-S"])
        return [line for line in output.splitlines() if line.startswith("-A")]
