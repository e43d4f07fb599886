"""Local networks on one machine: generate a genesis, start each node as its own process, drive and stop them.

`tonle cluster ...` and the tests use this same code. Every node is a real `tonle node start` process on
127.0.0.1 with ports chosen through port 0, its own data directory and log file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from config.keys import generate_key_file, load_signing_key, write_secret_file
from config.render import render_genesis, render_node_config
from config.schema import (
    Address,
    ApiConfig,
    Currency,
    Genesis,
    Institution,
    JoinConfig,
    LogConfig,
    NodeConfig,
    NodeRole,
    NodeSpec,
    OpenApiConfig,
    ProposerConfig,
    RaftConfig,
    Role,
    StorageConfig,
    partial_batches_in_flight_max_default,
)
from consensus.entries import Body, Issue, OpenAccount, Transfer, sign_entry
from node.client import Client, new_transfer_id
from node.memory_limit import MemoryCgroup
from node.open_api import new_token, token_digest
from storage.records import settlement_account

# One deadline for every wait in the harness; each wait still fails loudly with the node logs.
wait_seconds_default = 60.0
poll_seconds = 0.1
stop_seconds = 10.0
log_tail_bytes = 20_000

# Test and demo networks: fast elections on loopback, small LMDB maps.
local_map_size_bytes = 1 << 30
local_raft = RaftConfig(
    election_timeout_min_ms=800,
    election_timeout_max_ms=1600,
    heartbeat_interval_ms=100,
    connection_timeout_ms=3000,
    connection_retry_ms=200,
    leader_fallback_timeout_ms=2500,
    log_compaction_entries=5000,
    log_compaction_interval_seconds=3600,
)

_institution_catalogue = (
    ("aba", "ABA Bank", Role.BANK),
    ("acleda", "ACLEDA Bank", Role.BANK),
    ("wing", "Wing Bank", Role.BANK),
    ("amk", "AMK Microfinance", Role.MFI),
    ("pipay", "Pi Pay", Role.PSP),
    ("canadia", "Canadia Bank", Role.BANK),
)
_currencies = (Currency("KHR", 0), Currency("USD", 2))
# Entries per request while opening and funding accounts (a network may have many thousands).
setup_request_entries_max = 2000
# Funding for each customer account of a local network, in minor units.
customer_funding = {"KHR": 400_000_000, "USD": 10_000_000}


class ClusterError(RuntimeError):
    """A local network did not reach the state a command waited for; carries the node logs."""


@dataclass(slots=True)
class NodeProcess:
    """One node of a local network as recorded in cluster.json."""

    name: str
    role: str
    institution: str | None
    directory: Path
    config: Path
    log: Path
    data_dir: Path
    raft_address: str
    client_address: str
    admin_address: str
    pid: int | None = None
    open_api_address: str = ""

    def document(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "institution": self.institution,
            "pid": self.pid,
            "raft_address": self.raft_address,
            "client_address": self.client_address,
            "admin_address": self.admin_address,
            "open_api_address": self.open_api_address,
            "data_dir": str(self.data_dir),
            "config": str(self.config),
            "log": str(self.log),
        }


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out for port 0, all held open until every one is chosen so none repeats."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


def _institution_specs(count: int) -> list[tuple[str, str, Role]]:
    chosen = list(_institution_catalogue[:count])
    for extra in range(len(chosen), count):
        chosen.append((f"bank{extra + 1}", f"Bank {extra + 1}", Role.BANK))
    return chosen


class LocalCluster:
    """A local network described by `DIR/cluster.json`. Also a context manager that stops every node."""

    def __init__(self, directory: Path, description: dict[str, Any]) -> None:
        self.directory = directory
        self.description = description
        self.nodes = {
            item["name"]: NodeProcess(
                name=item["name"],
                role=item["role"],
                institution=item["institution"],
                directory=Path(item["config"]).parent,
                config=Path(item["config"]),
                log=Path(item["log"]),
                data_dir=Path(item["data_dir"]),
                raft_address=item["raft_address"],
                client_address=item["client_address"],
                admin_address=item["admin_address"],
                pid=item["pid"],
                open_api_address=item.get("open_api_address", ""),
            )
            for item in description["nodes"]
        }
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    # Creation -----------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        validators: int = 3,
        institutions: int = 2,
        institution_nodes: bool = True,
        accounts_per_currency: int = 4,
        raft: RaftConfig = local_raft,
        storage: StorageConfig | None = None,
        proposer: ProposerConfig | None = None,
        api: ApiConfig | None = None,
        log_format: str = "text",
        cross_border_currency: str = "KHR",
    ) -> LocalCluster:
        """Write keys, genesis, node configs and cluster.json for a new network (nothing is started).

        Each of `institutions` gets customer accounts and, unless `institution_nodes` is false, a node.
        """
        if validators < 1:
            raise ValueError("a network needs at least one validator")
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / "cluster.json").exists():
            raise FileExistsError(f"{directory / 'cluster.json'} exists: this directory already holds a network")
        keys_directory = directory / "keys"
        keys_directory.mkdir(exist_ok=True)
        cluster_id = f"tonle-local-{secrets.token_hex(4)}"

        institution_rows = [("nbc", "National Bank of Cambodia", Role.CENTRAL_BANK), *_institution_specs(institutions)]
        institution_records = []
        for institution_id, display_name, role in institution_rows:
            key_file = keys_directory / f"{institution_id}.key"
            public_key = generate_key_file(key_file)
            institution_records.append(Institution(institution_id, display_name, role, public_key))

        node_rows = [(f"v{number}", NodeRole.VALIDATOR, None) for number in range(1, validators + 1)]
        if institution_nodes:
            node_rows += [(f"{row[0]}-1", NodeRole.INSTITUTION, row[0]) for row in _institution_specs(institutions)]
        ports = _free_ports(4 * len(node_rows))
        specs = []
        open_api_ports: dict[str, int] = {}
        for position, (name, role, institution) in enumerate(node_rows):
            node_directory = directory / name
            node_directory.mkdir(exist_ok=True)
            public_key = generate_key_file(node_directory / "node.key")
            raft_port, client_port, admin_port, open_api_port = ports[4 * position : 4 * position + 4]
            open_api_ports[name] = open_api_port
            specs.append(
                NodeSpec(
                    name=name,
                    role=role,
                    institution=institution,
                    raft_address=Address("127.0.0.1", raft_port),
                    client_address=Address("127.0.0.1", client_port),
                    admin_address=Address("127.0.0.1", admin_port),
                    public_key=public_key,
                )
            )
        genesis = Genesis(
            format_version=1,
            cluster_id=cluster_id,
            currencies=_currencies,
            institutions=tuple(institution_records),
            validators=tuple(spec for spec in specs if spec.role is NodeRole.VALIDATOR),
            institution_nodes=tuple(spec for spec in specs if spec.role is NodeRole.INSTITUTION),
            cross_border_currency=cross_border_currency,
        )
        genesis_path = directory / "genesis.toml"
        genesis_path.write_text(render_genesis(genesis))
        # Every node serves the Open API; each institution gets one bearer token, kept beside its key.
        tokens_file = directory / "open-api-tokens.toml"
        token_lines = []
        for record in institution_records:
            token = new_token()
            token_file = keys_directory / f"{record.id}.open-api-token"
            write_secret_file(token_file, token.encode("ascii") + b"\n")
            token_lines.append(f'[[tokens]]\ninstitution = "{record.id}"\nsha256 = "{token_digest(token).hex()}"\n')
        tokens_file.write_text("\n".join(token_lines))

        nodes = []
        for spec in specs:
            node_directory = directory / spec.name
            config = NodeConfig(
                name=spec.name,
                genesis_file=genesis_path,
                data_dir=node_directory / "data",
                key_file=node_directory / "node.key",
                storage=storage or StorageConfig(map_size_bytes=local_map_size_bytes, sync=True),
                raft=raft,
                proposer=proposer or ProposerConfig(
                    batch_bytes_max=49152, batch_delay_microseconds=1000, queue_entries_max=20000,
                    partial_batches_in_flight_max=partial_batches_in_flight_max_default,
                ),
                api=api or ApiConfig(frame_bytes_max=1 << 20, connections_max=512, request_timeout_ms=10000),
                log=LogConfig(level="info", format=log_format),
                open_api=OpenApiConfig(f"127.0.0.1:{open_api_ports[spec.name]}", tokens_file),
                source=node_directory / "node.toml",
            )
            config_path = node_directory / "node.toml"
            config_path.write_text(render_node_config(config, relative_to=node_directory))
            nodes.append(
                NodeProcess(
                    name=spec.name,
                    role=str(spec.role),
                    institution=spec.institution,
                    directory=node_directory,
                    config=config_path,
                    log=node_directory / "node.log",
                    data_dir=node_directory / "data",
                    raft_address=str(spec.raft_address),
                    client_address=str(spec.client_address),
                    admin_address=str(spec.admin_address),
                    open_api_address=f"127.0.0.1:{open_api_ports[spec.name]}",
                )
            )
        customer_accounts = {
            institution_id: [
                {"account": f"c{number}.{currency.code.lower()}@{institution_id}", "currency": currency.code}
                for currency in _currencies
                for number in range(1, accounts_per_currency + 1)
            ]
            for institution_id, _name, _role in _institution_specs(institutions)
        }
        description = {
            "cluster_id": cluster_id,
            "genesis": str(genesis_path),
            "nodes": [node.document() for node in nodes],
            "institutions": [
                {
                    "id": record.id,
                    "name": record.name,
                    "role": str(record.role),
                    "key_file": str(keys_directory / f"{record.id}.key"),
                    "open_api_token_file": str(keys_directory / f"{record.id}.open-api-token"),
                    "accounts": customer_accounts.get(record.id, []),
                }
                for record in institution_records
            ],
        }
        cluster = cls(directory, description)
        cluster.save()
        return cluster

    @classmethod
    def load(cls, directory: Path) -> LocalCluster:
        path = directory.resolve() / "cluster.json"
        try:
            description = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"{path} not found: run `tonle cluster up --dir {directory}` first") from None
        return cls(directory.resolve(), description)

    def save(self) -> None:
        self.description["nodes"] = [node.document() for node in self.nodes.values()]
        temporary = self.directory / "cluster.json.tmp"
        temporary.write_text(json.dumps(self.description, indent=2) + "\n")
        os.replace(temporary, self.directory / "cluster.json")

    def add_institution_node(self, institution: str, *, via: str | None = None) -> str:
        """Create, admit (an AdmitNode entry signed by the central bank) and start a new read-only node for
        `institution` while the network runs. Returns its name."""
        from dataclasses import replace

        from config.loader import load_node_config
        from consensus.entries import AdmitNode

        number = 1 + sum(1 for node in self.nodes.values() if node.institution == institution)
        name = f"{institution}-{number}"
        while name in self.nodes:
            number += 1
            name = f"{institution}-{number}"
        template_node = next(node for node in self.nodes.values() if node.role == "validator")
        template, _genesis = load_node_config(template_node.config, environ={})
        directory = self.directory / name
        directory.mkdir()
        public_key = generate_key_file(directory / "node.key")
        raft_port, client_port, admin_port, open_api_port = _free_ports(4)
        join = JoinConfig(institution, f"127.0.0.1:{raft_port}", f"127.0.0.1:{client_port}", f"127.0.0.1:{admin_port}")
        config = replace(
            template, name=name, data_dir=directory / "data", key_file=directory / "node.key",
            source=directory / "node.toml", join=join,
            open_api=replace(template.open_api, listen_address=f"127.0.0.1:{open_api_port}"),
        )
        config_path = directory / "node.toml"
        config_path.write_text(render_node_config(config, relative_to=directory))
        admit = AdmitNode(name, institution, public_key, join.raft_address, join.client_address, join.admin_address)
        with self.client(via or self.wait_for_leader()) as client:
            (result,) = client.submit([self.sign(admit, self.central_bank())])
        if result["result"] not in ("ok", "exists"):
            raise ClusterError(f"admitting node {name} failed: {result}")
        self.nodes[name] = NodeProcess(
            name=name, role="institution", institution=institution, directory=directory, config=config_path,
            log=directory / "node.log", data_dir=directory / "data", raft_address=join.raft_address,
            client_address=join.client_address, admin_address=join.admin_address,
            open_api_address=f"127.0.0.1:{open_api_port}",
        )
        self.start([name])
        return name

    # Identity helpers ---------------------------------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return self.description["cluster_id"]

    def validators(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.role == "validator"]

    def institution_key(self, institution: str) -> SigningKey:
        for record in self.description["institutions"]:
            if record["id"] == institution:
                return load_signing_key(Path(record["key_file"]))
        raise KeyError(f"no institution {institution!r} in this network")

    def new_institution_key(self, institution: str, name: str, role: str) -> Path:
        """A key file for an institution about to be admitted, recorded in cluster.json."""
        key_file = self.directory / "keys" / f"{institution}.key"
        if not any(record["id"] == institution for record in self.description["institutions"]):
            generate_key_file(key_file)
            self.description["institutions"].append(
                {"id": institution, "name": name, "role": role, "key_file": str(key_file), "accounts": []}
            )
            self.save()
        return key_file

    def next_institution_key(self, institution: str) -> Path:
        """A fresh key file for a rotation; it becomes the institution's key once the rotation applies."""
        self.institution_key(institution)  # the institution must exist
        key_file = self.directory / "keys" / f"{institution}.key.next-{secrets.token_hex(4)}"
        generate_key_file(key_file)
        return key_file

    def adopt_institution_key(self, institution: str, key_file: Path) -> None:
        for record in self.description["institutions"]:
            if record["id"] == institution:
                record.setdefault("retired_key_files", []).append(record["key_file"])
                record["key_file"] = str(key_file)
        self.save()

    def central_bank(self) -> str:
        return next(record["id"] for record in self.description["institutions"] if record["role"] == "central_bank")

    def customer_accounts(self) -> list[dict[str, str]]:
        return [account for record in self.description["institutions"] for account in record["accounts"]]

    def sign(self, body: Body, signer: str) -> bytes:
        return sign_entry(body, cluster_id=self.cluster_id, signer=signer, signing_key=self.institution_key(signer))

    def transfer(self, debit: str, credit: str, amount: int, currency: str, transfer_id: bytes | None = None) -> bytes:
        """A transfer signed by the institution that owns the debit account."""
        body = Transfer(transfer_id or new_transfer_id(), debit, credit, amount, currency)
        return self.sign(body, debit.rpartition("@")[2])

    # Processes ----------------------------------------------------------------------------------------

    def start(
        self,
        names: Iterable[str] | None = None,
        *,
        environment: dict[str, str] | None = None,
        memory_cgroups: dict[str, MemoryCgroup] | None = None,
    ) -> None:
        """Start nodes (all by default) as background processes in their own sessions; a node named in
        `memory_cgroups` starts inside that cgroup, confined to its memory limit."""
        for name in list(names) if names is not None else list(self.nodes):
            node = self.nodes[name]
            if self.is_running(name):
                continue
            command = [sys.executable, "-m", "node", "node", "start", "--config", str(node.config)]
            if memory_cgroups is not None and name in memory_cgroups:
                command = memory_cgroups[name].command(command)
            log = open(node.log, "ab")  # noqa: SIM115 - handed to the child, closed below
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
                )
            finally:
                log.close()
            node.pid = process.pid
            self._processes[name] = process
        self.save()

    def is_running(self, name: str) -> bool:
        node = self.nodes[name]
        if node.pid is None:
            return False
        process = self._processes.get(name)
        if process is not None:
            return process.poll() is None
        return _is_our_process(node.pid, node.config)

    def _signal(self, name: str, signal_number: int) -> None:
        node = self.nodes[name]
        if node.pid is not None and self.is_running(name):
            try:
                os.kill(node.pid, signal_number)
            except ProcessLookupError:
                pass

    def stop(self, names: Iterable[str] | None = None, *, timeout_seconds: float = stop_seconds) -> None:
        """SIGTERM, then SIGKILL for any node still running after the timeout."""
        chosen = list(names) if names is not None else list(self.nodes)
        for name in chosen:
            self._signal(name, signal.SIGCONT)  # a paused node cannot handle SIGTERM
            self._signal(name, signal.SIGTERM)
        deadline = time.monotonic() + timeout_seconds
        for name in chosen:
            while self.is_running(name) and time.monotonic() < deadline:
                time.sleep(poll_seconds)
            if self.is_running(name):
                self._signal(name, signal.SIGKILL)
            self._reap(name)
        self.save()

    def kill(self, names: Iterable[str] | None = None) -> None:
        """SIGKILL: the node gets no chance to flush or close anything."""
        chosen = list(names) if names is not None else list(self.nodes)
        for name in chosen:
            self._signal(name, signal.SIGKILL)
        for name in chosen:
            self._reap(name)
        self.save()

    def _reap(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is not None:
            try:
                process.wait(timeout=stop_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        else:
            deadline = time.monotonic() + stop_seconds
            while self.is_running(name) and time.monotonic() < deadline:
                time.sleep(poll_seconds)
        self.nodes[name].pid = None

    def pause(self, names: Iterable[str]) -> None:
        for name in names:
            self._signal(name, signal.SIGSTOP)

    def resume(self, names: Iterable[str]) -> None:
        for name in names:
            self._signal(name, signal.SIGCONT)

    def restart(self, names: Iterable[str] | None = None) -> None:
        chosen = list(names) if names is not None else list(self.nodes)
        self.stop(chosen)
        self.start(chosen)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exception: object) -> None:
        self.kill()

    # Observation --------------------------------------------------------------------------------------

    def client(self, name: str, *, timeout_seconds: float = 30.0) -> Client:
        return Client(self.nodes[name].client_address, timeout_seconds=timeout_seconds)

    def admin_get(self, name: str, path: str, *, timeout_seconds: float = 2.0) -> tuple[int, str]:
        url = f"http://{self.nodes[name].admin_address}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_seconds) as response:  # noqa: S310 - local http
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def status(self, name: str) -> dict[str, Any] | None:
        """A node's /status, or None if it does not answer."""
        try:
            code, body = self.admin_get(name, "/status")
        except (OSError, urllib.error.URLError):
            return None
        return json.loads(body) if code == 200 else None

    def statuses(self) -> dict[str, dict[str, Any] | None]:
        return {name: self.status(name) for name in self.nodes}

    def logs(self, names: Iterable[str] | None = None, tail_bytes: int = log_tail_bytes) -> str:
        parts = []
        for name in list(names) if names is not None else list(self.nodes):
            path = self.nodes[name].log
            try:
                with open(path, "rb") as source:
                    source.seek(max(0, path.stat().st_size - tail_bytes))
                    text = source.read().decode(errors="replace")
            except FileNotFoundError:
                text = "(no log)"
            parts.append(f"----- {name} ({path}) -----\n{text}")
        return "\n".join(parts)

    def _fail(self, message: str) -> ClusterError:
        return ClusterError(f"{message}\n{self.logs()}")

    def wait_for_leader(self, *, timeout_seconds: float = wait_seconds_default, among: Iterable[str] | None = None) -> str:
        """Wait until the validators agree on one leader that says it is the leader; return its name."""
        candidates = list(among) if among is not None else [v for v in self.validators() if self.is_running(v)]
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            seen = {name: self.status(name) for name in candidates}
            leaders = {status["leader"] for status in seen.values() if status is not None}
            if len(leaders) == 1:
                leader = next(iter(leaders))
                if leader is not None and seen.get(leader) is not None and seen[leader]["role"] == "leader":
                    return leader
            time.sleep(poll_seconds)
        raise self._fail(f"no leader among {candidates} within {timeout_seconds} s")

    def wait_ready(self, names: Iterable[str] | None = None, *, timeout_seconds: float = wait_seconds_default) -> None:
        chosen = list(names) if names is not None else list(self.nodes)
        deadline = time.monotonic() + timeout_seconds
        pending = set(chosen)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                try:
                    code, _ = self.admin_get(name, "/readyz")
                except (OSError, urllib.error.URLError):
                    continue
                if code == 200:
                    pending.discard(name)
            if pending:
                time.sleep(poll_seconds)
        if pending:
            raise self._fail(f"nodes {sorted(pending)} not ready within {timeout_seconds} s")

    def wait_converged(self, names: Iterable[str] | None = None, *, timeout_seconds: float = wait_seconds_default) -> dict[str, dict[str, Any]]:
        """Wait until the nodes report the same applied index and state hash; return their statuses."""
        chosen = list(names) if names is not None else list(self.nodes)
        deadline = time.monotonic() + timeout_seconds
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            seen = {name: self.status(name) for name in chosen}
            if all(status is not None for status in seen.values()):
                positions = {(status["applied_index"], status["state_hash"]) for status in seen.values()}
                commits = {status["commit_index"] for status in seen.values()}
                if len(positions) == 1 and max(commits) <= next(iter(positions))[0]:
                    return seen
            time.sleep(poll_seconds)
        summary = {
            name: None if status is None else (status["applied_index"], status["state_hash"][:16])
            for name, status in seen.items()
        }
        raise self._fail(f"nodes did not converge within {timeout_seconds} s: {summary}")

    # Set-up of accounts -------------------------------------------------------------------------------

    def open_and_fund_accounts(self, *, via: str | None = None) -> None:
        """Open every customer account of cluster.json and fund it: issue to settlement, then pay out."""
        target = via or self.wait_for_leader()
        central_bank = self.central_bank()
        entries: list[bytes] = []
        issues: list[bytes] = []
        payouts: list[bytes] = []
        for record in self.description["institutions"]:
            institution = record["id"]
            needed: dict[str, int] = {}
            for account in record["accounts"]:
                entries.append(self.sign(OpenAccount(account["account"], account["currency"], tier="full"), institution))
                amount = customer_funding[account["currency"]]
                needed[account["currency"]] = needed.get(account["currency"], 0) + amount
                payouts.append(
                    self.transfer(settlement_account(institution, account["currency"]), account["account"], amount, account["currency"])
                )
            for currency, amount in needed.items():
                issue = Issue(new_transfer_id(), settlement_account(institution, currency), amount, currency)
                issues.append(self.sign(issue, central_bank))
        with self.client(target) as client:
            for stage in (entries, issues, payouts):
                for start in range(0, len(stage), setup_request_entries_max):
                    results = client.submit(stage[start : start + setup_request_entries_max], deadline_seconds=wait_seconds_default)
                    failed = [result for result in results if result["result"] not in ("ok", "exists")]
                    if failed:
                        raise self._fail(f"setting up accounts failed: {failed[:5]}")


def _is_our_process(pid: int, config: Path) -> bool:
    """True if `pid` is a live `tonle node start` of this node (a recycled pid must not be signalled)."""
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    if status.rpartition(")")[2].split()[0] == "Z":
        return False
    return str(config).encode() in command_line

