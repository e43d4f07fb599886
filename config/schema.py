"""Configuration and genesis types shared by every package, with their defaults, limits and errors."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

# Genesis limits. Patterns are applied with re.fullmatch (never re.match: "$" would accept a trailing "\n").
genesis_format_version = 1
cluster_id_pattern = re.compile(r"[a-z0-9][a-z0-9-]{2,63}")
currency_code_pattern = re.compile(r"[A-Z]{3}")
currency_decimals_min = 0
currency_decimals_max = 8
currencies_count_min = 1
institution_id_pattern = re.compile(r"[a-z][a-z0-9_]{1,15}")
institution_name_characters_min = 1
institution_name_characters_max = 80
central_banks_count = 1
validators_count_min = 1
node_name_pattern = re.compile(r"[a-z][a-z0-9-]{0,31}")
public_key_bytes = 32
public_key_hex_pattern = re.compile(r"[0-9a-fA-F]{64}")
port_min = 1
port_max = 65535
hostname_characters_max = 253
# RFC 1123 labels; a final all-numeric label is refused so that "999.1.1.1" is not taken for a hostname.
hostname_label_pattern = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
numeric_label_pattern = re.compile(r"[0-9]+")

# Node configuration defaults and limits: <field>_default, <field>_min, <field>_max.
# TOML integers are signed 64-bit; the same range applies to values from the environment.
integer_value_min = -(2**63)
integer_value_max = 2**63 - 1

map_size_bytes_default = 4 * 2**30
map_size_bytes_min = 16 * 2**20
sync_default = True
# How often a node marks its mapped state pages cold (node/page_aging.py); 0 turns it off.
page_aging_interval_ms_default = 2000
page_aging_interval_ms_max = 60_000
# Whether a node reads the accounts entries name into memory ahead of the apply (node/verifier.py).
read_ahead_default = True
# Whether a node drops the pages each apply commit freed from memory (node/page_aging.py, DeadCopyDropper):
# true, false, or "auto": only while the node runs under a memory limit (node/memory_limit.py). Without one,
# the kernel takes page cache back from whatever needs memory, and dropping costs CPU for nothing.
drop_dead_copies_auto = "auto"
drop_dead_copies_default: bool | str = drop_dead_copies_auto

election_timeout_min_ms_default = 1000
election_timeout_min_ms_min = 100
election_timeout_max_ms_default = 2500
heartbeat_interval_ms_default = 100
heartbeat_interval_ms_min = 10
# election_timeout_min_ms must exceed this many heartbeat intervals, so a follower hears from a live leader
# several times before it starts an election.
election_timeout_heartbeats_min = 3
connection_timeout_ms_default = 5000
connection_retry_ms_default = 500
connection_retry_ms_min = 50
leader_fallback_timeout_ms_default = 4000
log_compaction_entries_default = 20000
log_compaction_entries_min = 100
log_compaction_interval_seconds_default = 3600
log_compaction_interval_seconds_min = 10

batch_bytes_max_default = 49152
batch_bytes_max_min = 1024
# pysyncobj splits messages above 64 KiB into chunks; a batch plus its envelope must stay below that.
batch_bytes_max_max = 57344
batch_delay_microseconds_default = 1000
batch_delay_microseconds_min = 0
batch_delay_microseconds_max = 100000
queue_entries_max_default = 20000
queue_entries_max_min = 1
# Group commit: how many proposals may be awaiting their apply on the leader when it proposes a batch that is
# not full (node/server.py, partial_batch_may_go). The best value depends on where the machine's time goes
# (README, Performance: latency): 1 where the load leaves the CPU short, as on the 2-core machine the bench and
# CI run on (measured there side by side against 3: lower p50 in every round at 150-550 transfers/s, p99 at
# about half of peak 116 against 186 ms, 7 % less CPU per transfer); more where CPU is to spare. The maximum
# is the node's bound on proposals in flight.
partial_batches_in_flight_max_default = 1
partial_batches_in_flight_max_min = 1
partial_batches_in_flight_max_max = 32

frame_bytes_max_default = 2**20
frame_bytes_max_min = 1024
frame_bytes_max_max = 64 * 2**20
connections_max_default = 512
connections_max_min = 1
request_timeout_ms_default = 10000
request_timeout_ms_min = 100

log_levels = ("debug", "info", "warning", "error")
log_level_default = "info"
log_formats = ("text", "json")
log_format_default = "text"

# Domain separation: a genesis digest can never collide with another kind of Tonle hash.
genesis_digest_prefix = b"tonle-genesis-digest-v1\x00"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One invalid value: where it came from, which key, and what is wrong with it."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.source}: {self.key}: {self.message}"
        return f"{self.source}: {self.message}"


class ConfigError(Exception):
    """Every problem found in a configuration, reported together (one per line in str())."""

    def __init__(self, problems: tuple[ConfigProblem, ...]) -> None:
        if not problems:
            raise ValueError("ConfigError needs at least one ConfigProblem")
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[ConfigProblem, ...]]]:
        # Exception pickling would rebuild from the joined text; keep the typed problems across processes.
        return (ConfigError, (self.problems,))


class Role(StrEnum):
    CENTRAL_BANK = "central_bank"
    BANK = "bank"
    MFI = "mfi"
    PSP = "psp"
    # A foreign payment switch on a cross-border link (PromptPay, NAPAS, DuitNow...): settlement accounts only.
    FOREIGN_SWITCH = "foreign_switch"


class NodeRole(StrEnum):
    VALIDATOR = "validator"
    INSTITUTION = "institution"


@dataclass(frozen=True, slots=True)
class Address:
    """A host (IPv4/IPv6 literal or hostname, IPv6 without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parses "host:port" or "[ipv6]:port"; raises ValueError naming what is wrong."""
        if text.startswith("["):
            host, separator, port_text = text[1:].partition("]:")
            if not separator:
                raise ValueError(f"expected [ipv6-address]:port, got {text!r}")
            if not _is_ip_literal(host, version=6):
                raise ValueError(f"{host!r} is not an IPv6 address")
        else:
            host, separator, port_text = text.rpartition(":")
            if not separator:
                raise ValueError(f"expected host:port, got {text!r}")
            if ":" in host:
                raise ValueError(f"an IPv6 host must be written in brackets ([host]:port), got {text!r}")
            if not (_is_ip_literal(host, version=4) or _is_hostname(host)):
                raise ValueError(f"host must be an IPv4/IPv6 address or a hostname, got {host!r}")
        return cls(host, _parse_port(port_text))


def _parse_port(text: str) -> int:
    # Digits only: int() would also accept " 80", "+80" and "8_0". More than five digits is out of range
    # whatever they are, and checking the length first keeps int() away from huge strings.
    if not numeric_label_pattern.fullmatch(text):
        raise ValueError(f"port must be a decimal number, got {text!r}")
    if len(text) > len(str(port_max)) or not port_min <= int(text) <= port_max:
        raise ValueError(f"port must be {port_min}..{port_max}, got {text}")
    return int(text)


def _is_ip_literal(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _is_hostname(text: str) -> bool:
    labels = text.split(".")
    return (
        len(text) <= hostname_characters_max
        and all(hostname_label_pattern.fullmatch(label) for label in labels)
        and not numeric_label_pattern.fullmatch(labels[-1])
    )


@dataclass(frozen=True, slots=True)
class Currency:
    code: str
    decimals: int


@dataclass(frozen=True, slots=True)
class Institution:
    id: str
    name: str
    role: Role
    public_key: bytes


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    role: NodeRole
    institution: str | None  # None for validators
    raft_address: Address
    client_address: Address
    admin_address: Address
    public_key: bytes


@dataclass(frozen=True, slots=True)
class Genesis:
    format_version: int
    cluster_id: str
    currencies: tuple[Currency, ...]
    institutions: tuple[Institution, ...]
    validators: tuple[NodeSpec, ...]
    institution_nodes: tuple[NodeSpec, ...]
    # Bakong's riel policy: customers pay foreign switches only from accounts in this currency ("": no rule).
    cross_border_currency: str = ""

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """Validators first, then institution nodes."""
        return self.validators + self.institution_nodes

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def institution(self, id: str) -> Institution:
        for institution in self.institutions:
            if institution.id == id:
                return institution
        raise KeyError(id)

    def currency(self, code: str) -> Currency:
        for currency in self.currencies:
            if currency.code == code:
                return currency
        raise KeyError(code)

    @property
    def central_bank(self) -> Institution:
        for institution in self.institutions:
            if institution.role is Role.CENTRAL_BANK:
                return institution
        raise KeyError(Role.CENTRAL_BANK.value)

    @property
    def digest(self) -> bytes:
        """sha256 of a canonical encoding of every field, independent of the file's formatting."""
        document = {
            "format_version": self.format_version,
            "cluster_id": self.cluster_id,
            "currencies": [{"code": item.code, "decimals": item.decimals} for item in self.currencies],
            "institutions": [
                {"id": item.id, "name": item.name, "role": item.role.value, "public_key": item.public_key.hex()}
                for item in self.institutions
            ],
            "validators": [_node_document(node) for node in self.validators],
            "institution_nodes": [_node_document(node) for node in self.institution_nodes],
        }
        # Only when set, so every genesis written before the rule existed keeps its digest.
        if self.cross_border_currency:
            document["cross_border_currency"] = self.cross_border_currency
        encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(genesis_digest_prefix + encoded.encode("ascii")).digest()


def _node_document(node: NodeSpec) -> dict[str, str | None]:
    return {
        "name": node.name,
        "role": node.role.value,
        "institution": node.institution,
        "raft_address": str(node.raft_address),
        "client_address": str(node.client_address),
        "admin_address": str(node.admin_address),
        "public_key": node.public_key.hex(),
    }


@dataclass(frozen=True, slots=True)
class StorageConfig:
    map_size_bytes: int
    sync: bool
    page_aging_interval_ms: int = page_aging_interval_ms_default
    read_ahead: bool = read_ahead_default
    drop_dead_copies: bool | str = drop_dead_copies_default


@dataclass(frozen=True, slots=True)
class RaftConfig:
    election_timeout_min_ms: int
    election_timeout_max_ms: int
    heartbeat_interval_ms: int
    connection_timeout_ms: int
    connection_retry_ms: int
    leader_fallback_timeout_ms: int
    log_compaction_entries: int
    log_compaction_interval_seconds: int


@dataclass(frozen=True, slots=True)
class ProposerConfig:
    batch_bytes_max: int
    batch_delay_microseconds: int
    queue_entries_max: int
    partial_batches_in_flight_max: int


@dataclass(frozen=True, slots=True)
class ApiConfig:
    frame_bytes_max: int
    connections_max: int
    request_timeout_ms: int


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class JoinConfig:
    """How a node that is not in the genesis describes itself: an institution node admitted later by a
    replicated AdmitNode entry. All empty for genesis nodes."""

    institution: str = ""
    raft_address: str = ""
    client_address: str = ""
    admin_address: str = ""

    @property
    def requested(self) -> bool:
        return bool(self.institution)


@dataclass(frozen=True, slots=True)
class OpenApiConfig:
    """The Bakong-style HTTP Open API (node/open_api.py): off while listen_address is empty."""

    listen_address: str = ""
    tokens_file: Path | None = None  # absolute, resolved; SHA-256 hashes of the bearer tokens

    @property
    def enabled(self) -> bool:
        return bool(self.listen_address)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    genesis_file: Path  # absolute, resolved
    data_dir: Path  # absolute, resolved
    key_file: Path  # absolute, resolved
    storage: StorageConfig
    raft: RaftConfig
    proposer: ProposerConfig
    api: ApiConfig
    log: LogConfig
    source: Path  # the node config file, absolute and resolved
    join: JoinConfig = JoinConfig()
    open_api: OpenApiConfig = OpenApiConfig()
