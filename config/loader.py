"""Reads genesis and node configuration files (plus TONLE_ environment overrides) into validated dataclasses."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nacl.bindings

from config import schema
from config.schema import (
    Address,
    ApiConfig,
    ConfigError,
    ConfigProblem,
    Currency,
    Genesis,
    Institution,
    JoinConfig,
    LogConfig,
    NodeConfig,
    OpenApiConfig,
    NodeRole,
    NodeSpec,
    ProposerConfig,
    RaftConfig,
    Role,
    StorageConfig,
)

environment_prefix = "TONLE_"
environment_separator = "__"
# Decimal digits with an optional minus: int() alone would also accept " 12", "+12" and "1_2".
environment_integer_pattern = re.compile(r"-?[0-9]+")
# Longest decimal text of a signed 64-bit integer; longer text is out of range without calling int() on it.
integer_text_characters_max = len(str(schema.integer_value_min))


def load_genesis(path: Path) -> Genesis:
    """Reads and validates a genesis file; raises ConfigError listing every problem."""
    problems: list[ConfigProblem] = []
    genesis = _read_genesis(path, problems)
    if genesis is None:
        raise ConfigError(tuple(problems))
    return genesis


def load_node_config(path: Path, environ: Mapping[str, str] | None = None) -> tuple[NodeConfig, Genesis]:
    """Reads a node config file, applies TONLE_<SECTION>__<KEY> overrides, and loads the genesis it names.

    Precedence: defaults < file < environment. Raises ConfigError listing every problem.
    """
    if environ is None:
        environ = os.environ
    problems: list[ConfigProblem] = []
    values = _collect_node_values(path, environ, problems)
    settings = _check_node_values(values, str(path), problems)
    genesis = _load_named_genesis(settings, problems)
    # A genesis that failed to load has always added its problems; ConfigError refuses an empty tuple.
    if problems or genesis is None:
        raise ConfigError(tuple(problems))
    return _node_config(settings, path.resolve()), genesis


# ---------------------------------------------------------------------------------------------- shared


def _read_toml(path: Path, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        problems.append(ConfigProblem(str(path), "", f"cannot read file: {error.strerror or error}"))
    except UnicodeDecodeError:
        problems.append(ConfigProblem(str(path), "", "file is not valid UTF-8"))
    except tomllib.TOMLDecodeError as error:
        problems.append(ConfigProblem(str(path), "", f"invalid TOML: {error}"))
    return None


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _range_message(value: int, minimum: int | None, maximum: int | None) -> str | None:
    low = schema.integer_value_min if minimum is None else minimum
    high = schema.integer_value_max if maximum is None else maximum
    if low <= value <= high:
        return None
    if maximum is None and value < low:
        return f"must be >= {low}, got {value}"
    return f"must be {low}..{high}, got {value}"


# --------------------------------------------------------------------------------------------- genesis


@dataclass(slots=True)
class _TableReader:
    """Reads typed fields out of one TOML table, recording a problem (source + dotted key) for each bad one."""

    source: str
    prefix: str
    table: dict[str, Any]
    problems: list[ConfigProblem]

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.source, self.key(name), message))

    def check_keys(self, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        for name in self.table:
            if name not in required and name not in optional:
                self.problem(name, "unknown key")
        for name in required:
            if name not in self.table:
                self.problem(name, "missing required key")

    def integer(self, name: str, minimum: int, maximum: int) -> int | None:
        if name not in self.table:
            return None
        value = self.table[name]
        # bool is a subclass of int, but `true` is not 1 in a config file.
        if type(value) is not int:
            self.problem(name, f"expected an integer, got {_describe(value)}")
            return None
        message = _range_message(value, minimum, maximum)
        if message is not None:
            self.problem(name, message)
            return None
        return value

    def string(self, name: str) -> str | None:
        if name not in self.table:
            return None
        value = self.table[name]
        if not isinstance(value, str):
            self.problem(name, f"expected a string, got {_describe(value)}")
            return None
        return value

    def matching(self, name: str, pattern: re.Pattern[str]) -> str | None:
        value = self.string(name)
        if value is not None and not pattern.fullmatch(value):
            self.problem(name, f"must match {pattern.pattern}, got {value!r}")
            return None
        return value

    def display_name(self, name: str) -> str | None:
        value = self.string(name)
        if value is None:
            return None
        low, high = schema.institution_name_characters_min, schema.institution_name_characters_max
        if not low <= len(value) <= high:
            self.problem(name, f"must be {low}..{high} characters, got {len(value)}")
            return None
        if not value.isprintable():
            self.problem(name, f"must contain printable characters only, got {value!r}")
            return None
        return value

    def role(self, name: str) -> Role | None:
        value = self.string(name)
        if value is None:
            return None
        try:
            return Role(value)
        except ValueError:
            choices = " | ".join(role.value for role in Role)
            self.problem(name, f"must be one of {choices}, got {value!r}")
            return None

    def public_key(self, name: str) -> bytes | None:
        value = self.string(name)
        if value is None:
            return None
        if not schema.public_key_hex_pattern.fullmatch(value):
            self.problem(name, f"must be {2 * schema.public_key_bytes} hex characters, got {value!r}")
            return None
        key = bytes.fromhex(value)
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
            self.problem(name, f"is not a valid Ed25519 public key (not a usable curve point): {value}")
            return None
        return key

    def address(self, name: str) -> Address | None:
        value = self.string(name)
        if value is None:
            return None
        try:
            return Address.parse(value)
        except ValueError as error:
            self.problem(name, str(error))
            return None

    def tables(self, name: str, count_min: int = 0) -> list[_TableReader]:
        if name not in self.table:
            return []
        value = self.table[name]
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problem(name, f"expected an array of tables ([[{name}]]), got {_describe(value)}")
            return []
        if len(value) < count_min:
            self.problem(name, f"at least {count_min} entry is required, got {len(value)}")
        return [
            _TableReader(self.source, f"{self.key(name)}[{index}]", item, self.problems)
            for index, item in enumerate(value)
        ]


_genesis_keys = ("format_version", "cluster_id", "currencies", "institutions", "validators")
_genesis_keys_optional = ("institution_nodes", "cross_border_currency")
_currency_keys = ("code", "decimals")
_institution_keys = ("id", "name", "role", "public_key")
_validator_keys = ("name", "raft_address", "client_address", "admin_address", "public_key")
_institution_node_keys = ("name", "institution", *_validator_keys[1:])
_address_keys = ("raft_address", "client_address", "admin_address")


def _read_genesis(path: Path, problems: list[ConfigProblem]) -> Genesis | None:
    document = _read_toml(path, problems)
    if document is None:
        return None
    problems_before = len(problems)
    reader = _TableReader(str(path), "", document, problems)
    reader.check_keys(_genesis_keys, _genesis_keys_optional)
    format_version = _format_version(reader)
    cluster_id = reader.matching("cluster_id", schema.cluster_id_pattern)
    currencies = _currencies(reader)
    institutions, institution_ids = _institutions(reader)
    validators = _nodes(reader, "validators", NodeRole.VALIDATOR)
    institution_nodes = _nodes(reader, "institution_nodes", NodeRole.INSTITUTION)
    _check_nodes(reader, institutions, institution_ids, validators + institution_nodes)
    cross_border_currency = _cross_border_currency(reader, currencies)
    if len(problems) > problems_before or format_version is None or cluster_id is None:
        return None
    return Genesis(
        format_version=format_version,
        cluster_id=cluster_id,
        currencies=tuple(currency for _, currency in currencies),
        institutions=tuple(institution for _, institution in institutions),
        validators=tuple(node for _, node in validators),
        institution_nodes=tuple(node for _, node in institution_nodes),
        cross_border_currency=cross_border_currency,
    )


def _cross_border_currency(reader: _TableReader, currencies: list[tuple[str, Currency]]) -> str:
    """Optional: the currency customers pay foreign switches from (Bakong: KHR); one of the genesis currencies."""
    code = reader.matching("cross_border_currency", schema.currency_code_pattern)
    if code is None:
        return ""
    if code not in {currency.code for _, currency in currencies}:
        reader.problem("cross_border_currency", f"{code} is not one of the genesis currencies")
    return code


def _format_version(reader: _TableReader) -> int | None:
    if "format_version" not in reader.table:
        return None
    value = reader.table["format_version"]
    if type(value) is not int or value != schema.genesis_format_version:
        reader.problem(
            "format_version", f"unsupported; this node reads {schema.genesis_format_version}, got {_describe(value)}"
        )
        return None
    return value


def _currencies(reader: _TableReader) -> list[tuple[str, Currency]]:
    currencies: list[tuple[str, Currency]] = []
    for item in reader.tables("currencies", schema.currencies_count_min):
        item.check_keys(_currency_keys)
        code = item.matching("code", schema.currency_code_pattern)
        decimals = item.integer("decimals", schema.currency_decimals_min, schema.currency_decimals_max)
        if code is not None and decimals is not None:
            currencies.append((item.prefix, Currency(code, decimals)))
    _refuse_duplicates(reader, [(key, currency.code, "code") for key, currency in currencies], "currency code")
    return currencies


def _institutions(reader: _TableReader) -> tuple[list[tuple[str, Institution]], set[str]]:
    """The valid institutions, and every well-formed id (so one bad field does not also orphan its nodes)."""
    institutions: list[tuple[str, Institution]] = []
    institution_ids: set[str] = set()
    central_banks: list[str] = []
    items = reader.tables("institutions", schema.central_banks_count)
    for item in items:
        item.check_keys(_institution_keys)
        institution_id = item.matching("id", schema.institution_id_pattern)
        name = item.display_name("name")
        role = item.role("role")
        public_key = item.public_key("public_key")
        if institution_id is not None:
            institution_ids.add(institution_id)
        if role is Role.CENTRAL_BANK:
            central_banks.append(item.prefix)
        if institution_id is not None and name is not None and role is not None and public_key is not None:
            institutions.append((item.prefix, Institution(institution_id, name, role, public_key)))
    _refuse_duplicates(reader, [(key, institution.id, "id") for key, institution in institutions], "institution id")
    # A signature must identify exactly one institution.
    _refuse_duplicates(
        reader,
        [(key, institution.public_key, "public_key") for key, institution in institutions],
        "institution public key",
    )
    if items:
        _check_central_banks(reader, central_banks)
    return institutions, institution_ids


def _check_central_banks(reader: _TableReader, central_banks: list[str]) -> None:
    if not central_banks:
        reader.problem("institutions", f"exactly one institution must have role {Role.CENTRAL_BANK}, found none")
    for key in central_banks[schema.central_banks_count :]:
        reader.problems.append(
            ConfigProblem(
                reader.source,
                f"{key}.role",
                f"exactly one institution may have role {Role.CENTRAL_BANK}; {central_banks[0]} already has it",
            )
        )


def _nodes(reader: _TableReader, name: str, role: NodeRole) -> list[tuple[str, NodeSpec]]:
    nodes: list[tuple[str, NodeSpec]] = []
    count_min = schema.validators_count_min if role is NodeRole.VALIDATOR else 0
    for item in reader.tables(name, count_min):
        if role is NodeRole.VALIDATOR:
            item.check_keys(_validator_keys)
            institution = None
        else:
            item.check_keys(_institution_node_keys)
            institution = item.matching("institution", schema.institution_id_pattern)
        node_name = item.matching("name", schema.node_name_pattern)
        raft_address, client_address, admin_address = (item.address(key) for key in _address_keys)
        public_key = item.public_key("public_key")
        if (
            node_name is not None
            and raft_address is not None
            and client_address is not None
            and admin_address is not None
            and public_key is not None
            and (role is NodeRole.VALIDATOR or institution is not None)
        ):
            nodes.append(
                (
                    item.prefix,
                    NodeSpec(node_name, role, institution, raft_address, client_address, admin_address, public_key),
                )
            )
    return nodes


def _check_nodes(
    reader: _TableReader,
    institutions: list[tuple[str, Institution]],
    institution_ids: set[str],
    nodes: list[tuple[str, NodeSpec]],
) -> None:
    _refuse_duplicates(reader, [(key, node.name, "name") for key, node in nodes], "node name")
    _refuse_duplicates(
        reader,
        [(key, _address_identity(getattr(node, field)), field) for key, node in nodes for field in _address_keys],
        "address",
    )
    _refuse_duplicates(reader, [(key, node.public_key, "public_key") for key, node in nodes], "node public key")
    institution_keys = {institution.public_key: key for key, institution in institutions}
    for key, node in nodes:
        if node.institution is not None and node.institution not in institution_ids:
            reader.problems.append(
                ConfigProblem(reader.source, f"{key}.institution", f"no institution with id {node.institution!r}")
            )
        if node.public_key in institution_keys:
            # A node key authenticates transport connections; it must never double as a signing authority.
            reader.problems.append(
                ConfigProblem(
                    reader.source,
                    f"{key}.public_key",
                    f"equals the signing key of {institution_keys[node.public_key]}; node keys must be distinct",
                )
            )


def _address_identity(address: Address) -> tuple[str, int]:
    # "::1" and "0:0:0:0:0:0:0:1" are the same socket, and hostnames are case-insensitive.
    try:
        host = str(ipaddress.ip_address(address.host))
    except ValueError:
        host = address.host.lower()
    return (host, address.port)


def _refuse_duplicates(reader: _TableReader, entries: list[tuple[str, object, str]], what: str) -> None:
    first_seen: dict[object, str] = {}
    for prefix, value, field in entries:
        key = f"{prefix}.{field}"
        if value in first_seen:
            message = f"duplicate {what}; {first_seen[value]} has it too"
            reader.problems.append(ConfigProblem(reader.source, key, message))
        else:
            first_seen[value] = key


# ----------------------------------------------------------------------------------------- node config


@dataclass(frozen=True, slots=True)
class _Setting:
    """What one node-config key accepts. default None means the key is required."""

    kind: type
    default: int | bool | str | None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()  # for a bool: the strings it also accepts


_settings: dict[str, dict[str, _Setting]] = {
    "node": {
        "name": _Setting(str, None),
        "genesis_file": _Setting(Path, None),
        "data_dir": _Setting(Path, None),
        "key_file": _Setting(Path, None),
    },
    "storage": {
        "map_size_bytes": _Setting(int, schema.map_size_bytes_default, minimum=schema.map_size_bytes_min),
        "sync": _Setting(bool, schema.sync_default),
        "page_aging_interval_ms": _Setting(
            int, schema.page_aging_interval_ms_default, minimum=0, maximum=schema.page_aging_interval_ms_max
        ),
        "read_ahead": _Setting(bool, schema.read_ahead_default),
        "drop_dead_copies": _Setting(bool, schema.drop_dead_copies_default, choices=(schema.drop_dead_copies_auto,)),
    },
    "raft": {
        "election_timeout_min_ms": _Setting(
            int, schema.election_timeout_min_ms_default, minimum=schema.election_timeout_min_ms_min
        ),
        "election_timeout_max_ms": _Setting(int, schema.election_timeout_max_ms_default),
        "heartbeat_interval_ms": _Setting(
            int, schema.heartbeat_interval_ms_default, minimum=schema.heartbeat_interval_ms_min
        ),
        "connection_timeout_ms": _Setting(int, schema.connection_timeout_ms_default),
        "connection_retry_ms": _Setting(
            int, schema.connection_retry_ms_default, minimum=schema.connection_retry_ms_min
        ),
        "leader_fallback_timeout_ms": _Setting(int, schema.leader_fallback_timeout_ms_default),
        "log_compaction_entries": _Setting(
            int, schema.log_compaction_entries_default, minimum=schema.log_compaction_entries_min
        ),
        "log_compaction_interval_seconds": _Setting(
            int, schema.log_compaction_interval_seconds_default, minimum=schema.log_compaction_interval_seconds_min
        ),
    },
    "proposer": {
        "batch_bytes_max": _Setting(
            int, schema.batch_bytes_max_default, minimum=schema.batch_bytes_max_min, maximum=schema.batch_bytes_max_max
        ),
        "batch_delay_microseconds": _Setting(
            int,
            schema.batch_delay_microseconds_default,
            minimum=schema.batch_delay_microseconds_min,
            maximum=schema.batch_delay_microseconds_max,
        ),
        "queue_entries_max": _Setting(int, schema.queue_entries_max_default, minimum=schema.queue_entries_max_min),
        "partial_batches_in_flight_max": _Setting(
            int,
            schema.partial_batches_in_flight_max_default,
            minimum=schema.partial_batches_in_flight_max_min,
            maximum=schema.partial_batches_in_flight_max_max,
        ),
    },
    "api": {
        "frame_bytes_max": _Setting(
            int, schema.frame_bytes_max_default, minimum=schema.frame_bytes_max_min, maximum=schema.frame_bytes_max_max
        ),
        "connections_max": _Setting(int, schema.connections_max_default, minimum=schema.connections_max_min),
        "request_timeout_ms": _Setting(int, schema.request_timeout_ms_default, minimum=schema.request_timeout_ms_min),
    },
    "log": {
        "level": _Setting(str, schema.log_level_default, choices=schema.log_levels),
        "format": _Setting(str, schema.log_format_default, choices=schema.log_formats),
    },
    # The Bakong-style Open API (node/open_api.py): off unless listen_address is set, which needs tokens_file.
    "open_api": {
        "listen_address": _Setting(str, ""),
        "tokens_file": _Setting(Path, ""),
    },
    # Only for an institution node admitted after genesis; all four keys or none.
    "join": {
        "institution": _Setting(str, ""),
        "raft_address": _Setting(str, ""),
        "client_address": _Setting(str, ""),
        "admin_address": _Setting(str, ""),
    },
}

_default_source = "default"


@dataclass(frozen=True, slots=True)
class _Unparsable:
    """An environment value that does not parse as its key's type."""

    message: str


@dataclass(frozen=True, slots=True)
class _Value:
    """A raw value for one key, where it came from, and the directory its relative paths start from."""

    value: object
    source: str
    base_directory: Path


_Values = dict[tuple[str, str], _Value]


def _collect_node_values(path: Path, environ: Mapping[str, str], problems: list[ConfigProblem]) -> _Values:
    values: _Values = {}
    document = _read_toml(path, problems)
    if document is not None:
        _collect_file_values(document, str(path), path.resolve().parent, values, problems)
    _collect_environment_values(environ, values, problems)
    return values


def _collect_file_values(
    document: dict[str, Any], source: str, directory: Path, values: _Values, problems: list[ConfigProblem]
) -> None:
    for section_name, section in document.items():
        if section_name not in _settings:
            problems.append(ConfigProblem(source, section_name, "unknown section"))
        elif not isinstance(section, dict):
            problems.append(ConfigProblem(source, section_name, f"expected a table, got {_describe(section)}"))
        else:
            for key, value in section.items():
                if key in _settings[section_name]:
                    values[(section_name, key)] = _Value(value, source, directory)
                else:
                    problems.append(ConfigProblem(source, f"{section_name}.{key}", "unknown key"))


def _collect_environment_values(environ: Mapping[str, str], values: _Values, problems: list[ConfigProblem]) -> None:
    working_directory = Path.cwd()
    for variable in sorted(environ):
        name = variable.removeprefix(environment_prefix)
        if name == variable or environment_separator not in name:
            continue  # not an override (e.g. TONLE_FAILPOINTS)
        section_part, _, key_part = name.partition(environment_separator)
        section_name, key = section_part.lower(), key_part.lower()
        source = f"environment variable {variable}"
        setting = _settings.get(section_name, {}).get(key)
        # Upper case only: TONLE_log__FORMAT is a typo, not another spelling of TONLE_LOG__FORMAT.
        if setting is None or section_part != section_name.upper() or key_part != key.upper():
            problems.append(ConfigProblem(source, f"{section_name}.{key}", "unknown configuration key"))
        else:
            parsed = _parse_environment_value(environ[variable], setting)
            values[(section_name, key)] = _Value(parsed, source, working_directory)


def _parse_environment_value(text: str, setting: _Setting) -> object:
    kind = setting.kind
    if kind is int:
        if not environment_integer_pattern.fullmatch(text):
            return _Unparsable(f"expected an integer (optional '-' then decimal digits), got {text!r}")
        if len(text) > integer_text_characters_max:
            return _Unparsable(f"must be {schema.integer_value_min}..{schema.integer_value_max}, got {text}")
        return int(text)
    if kind is bool:
        if text in setting.choices:
            return text
        if text not in ("true", "false"):
            return _Unparsable(f"expected {' or '.join(('true', 'false', *setting.choices))}, got {text!r}")
        return text == "true"
    return text


@dataclass(frozen=True, slots=True)
class _Checked:
    """Validated node-config values (a missing or invalid key is absent) and where each came from."""

    values: dict[tuple[str, str], object]
    sources: dict[tuple[str, str], str]


def _check_node_values(values: _Values, file_source: str, problems: list[ConfigProblem]) -> _Checked:
    checked = _Checked({}, {})
    for section_name, section in _settings.items():
        for key, setting in section.items():
            value = values.get((section_name, key))
            if value is None:
                if setting.default is None:
                    problems.append(ConfigProblem(file_source, f"{section_name}.{key}", "missing required key"))
                else:
                    checked.values[(section_name, key)] = setting.default
                    checked.sources[(section_name, key)] = _default_source
                continue
            message = _setting_message(value.value, setting)
            if message is not None:
                problems.append(ConfigProblem(value.source, f"{section_name}.{key}", message))
                continue
            if setting.kind is Path:
                checked.values[(section_name, key)] = (value.base_directory / str(value.value)).resolve()
            else:
                checked.values[(section_name, key)] = value.value
            checked.sources[(section_name, key)] = value.source
    _check_raft_relations(checked, problems)
    _check_open_api(checked, problems)
    return checked


def _setting_message(value: object, setting: _Setting) -> str | None:
    if isinstance(value, _Unparsable):
        return value.message
    if setting.kind is int:
        # bool is a subclass of int, but `true` is not 1 in a config file.
        if type(value) is not int:
            return f"expected an integer, got {_describe(value)}"
        return _range_message(value, setting.minimum, setting.maximum)
    if setting.kind is bool:
        if isinstance(value, bool) or (isinstance(value, str) and value in setting.choices):
            return None
        alternatives = "".join(f" or {choice!r}" for choice in setting.choices)
        return f"expected a boolean{alternatives}, got {_describe(value)}"
    if not isinstance(value, str):
        return f"expected a string, got {_describe(value)}"
    if setting.choices and value not in setting.choices:
        return f"must be one of {' | '.join(setting.choices)}, got {value!r}"
    if value == "":
        return "must not be empty"
    return None


@dataclass(frozen=True, slots=True)
class _Relation:
    """A rule between two raft keys, reported on `key` unless only `other` was set explicitly."""

    key: str
    other: str
    holds: Callable[[int, int], bool]
    message: str


_raft_relations = (
    _Relation(
        "election_timeout_max_ms",
        "election_timeout_min_ms",
        lambda maximum, minimum: maximum > minimum,
        "election_timeout_max_ms ({0}) must be greater than election_timeout_min_ms ({1})",
    ),
    _Relation(
        "heartbeat_interval_ms",
        "election_timeout_min_ms",
        lambda heartbeat, minimum: minimum > schema.election_timeout_heartbeats_min * heartbeat,
        f"election_timeout_min_ms ({{1}}) must be greater than {schema.election_timeout_heartbeats_min}"
        " * heartbeat_interval_ms ({0})",
    ),
    _Relation(
        "connection_timeout_ms",
        "election_timeout_max_ms",
        lambda connection, maximum: connection >= maximum,
        "connection_timeout_ms ({0}) must be >= election_timeout_max_ms ({1})",
    ),
    _Relation(
        "leader_fallback_timeout_ms",
        "heartbeat_interval_ms",
        lambda fallback, heartbeat: fallback > heartbeat,
        "leader_fallback_timeout_ms ({0}) must be greater than heartbeat_interval_ms ({1})",
    ),
)


def _check_raft_relations(checked: _Checked, problems: list[ConfigProblem]) -> None:
    for relation in _raft_relations:
        key, other = ("raft", relation.key), ("raft", relation.other)
        if key not in checked.values or other not in checked.values:
            continue  # one side is already reported as invalid
        value, other_value = cast(int, checked.values[key]), cast(int, checked.values[other])
        if relation.holds(value, other_value):
            continue
        blamed = other if checked.sources[key] == _default_source else key
        problems.append(
            ConfigProblem(checked.sources[blamed], f"raft.{blamed[1]}", relation.message.format(value, other_value))
        )


def _check_open_api(checked: _Checked, problems: list[ConfigProblem]) -> None:
    listen_address = checked.values.get(("open_api", "listen_address"), "")
    if not listen_address:
        return
    source = checked.sources[("open_api", "listen_address")]
    try:
        Address.parse(cast(str, listen_address))
    except ValueError as error:
        problems.append(ConfigProblem(source, "open_api.listen_address", str(error)))
    if checked.values.get(("open_api", "tokens_file")) == "":
        problems.append(ConfigProblem(source, "open_api.tokens_file", "required when open_api.listen_address is set"))


def _load_named_genesis(checked: _Checked, problems: list[ConfigProblem]) -> Genesis | None:
    genesis_path = checked.values.get(("node", "genesis_file"))
    if not isinstance(genesis_path, Path):
        return None
    genesis = _read_genesis(genesis_path, problems)
    name = checked.values.get(("node", "name"))
    join = {key: checked.values.get(("join", key), "") for key in _settings["join"]}
    joining = any(join.values())
    if genesis is None or not isinstance(name, str):
        return genesis
    in_genesis = name in {node.name for node in genesis.nodes}
    if in_genesis and joining:
        problems.append(ConfigProblem(checked.sources[("node", "name")], "join", f"{name!r} is in the genesis: remove [join]"))
    elif not in_genesis and not joining:
        problems.append(
            ConfigProblem(
                checked.sources[("node", "name")],
                "node.name",
                f"{name!r} is neither a validator nor an institution node in {genesis_path}, and [join] is not set",
            )
        )
    elif joining:
        for key, value in join.items():
            source = checked.sources.get(("join", key), _default_source)
            if not value:
                problems.append(ConfigProblem(source, f"join.{key}", "required when joining"))
            elif key.endswith("_address"):
                try:
                    Address.parse(value)
                except ValueError as error:
                    problems.append(ConfigProblem(source, f"join.{key}", str(error)))
    return genesis


def _node_config(checked: _Checked, source: Path) -> NodeConfig:
    def section(name: str) -> dict[str, Any]:
        return {key: checked.values[(name, key)] for key in _settings[name]}

    return NodeConfig(
        **section("node"),
        storage=StorageConfig(**section("storage")),
        raft=RaftConfig(**section("raft")),
        proposer=ProposerConfig(**section("proposer")),
        api=ApiConfig(**section("api")),
        log=LogConfig(**section("log")),
        source=source,
        join=JoinConfig(**section("join")),
        open_api=OpenApiConfig(
            listen_address=checked.values[("open_api", "listen_address")],
            tokens_file=checked.values[("open_api", "tokens_file")] or None,
        ),
    )
