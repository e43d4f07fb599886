"""Tests for config/: genesis and node-config loading, environment overrides, limits, and the TOML writers."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from config import (
    Address,
    ConfigError,
    ConfigProblem,
    Currency,
    Institution,
    NodeConfig,
    NodeRole,
    NodeSpec,
    Role,
    StorageConfig,
    load_genesis,
    load_node_config,
    render_genesis,
    render_node_config,
)
from config import schema

examples_directory = Path(__file__).resolve().parents[2] / "config" / "examples"
not_a_curve_point_hex = "02" + "00" * 31
small_order_point_hex = "01" + "00" * 31  # the identity element: a valid encoding, but refused


# ------------------------------------------------------------------------------------------------ helpers


def new_public_key() -> str:
    return SigningKey.generate().verify_key.encode().hex()


def node_entry(name: str, number: int, institution: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name}
    if institution is not None:
        entry["institution"] = institution
    entry.update(
        {
            "raft_address": f"127.0.0.1:{7000 + number}",
            "client_address": f"127.0.0.1:{8000 + number}",
            "admin_address": f"127.0.0.1:{9000 + number}",
            "public_key": new_public_key(),
        }
    )
    return entry


def genesis_document() -> dict[str, Any]:
    return {
        "format_version": 1,
        "cluster_id": "tonle-test-1",
        "currencies": [{"code": "KHR", "decimals": 0}, {"code": "USD", "decimals": 2}],
        "institutions": [
            {"id": "nbc", "name": "National Bank of Cambodia", "role": "central_bank", "public_key": new_public_key()},
            {"id": "aba", "name": "ABA Bank", "role": "bank", "public_key": new_public_key()},
        ],
        "validators": [node_entry("v1", 1), node_entry("v2", 2)],
        "institution_nodes": [node_entry("aba-1", 101, institution="aba")],
    }


def node_document() -> dict[str, Any]:
    return {"node": {"name": "v1", "genesis_file": "genesis.toml", "data_dir": "data", "key_file": "node.key"}}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(type(value))


def toml_text(document: dict[str, Any]) -> str:
    """A test-side TOML writer, independent of config.render, for documents of scalars, tables and arrays."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in document.items():
        if isinstance(value, dict):
            tables.append((f"[{key}]", value))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            tables.extend((f"[[{key}]]", item) for item in value)
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for header, table in tables:
        lines += ["", header] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(document), encoding="utf-8")
    return path


def genesis_problems(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> tuple[Path, tuple[ConfigProblem, ...]]:
    document = genesis_document()
    change(document)
    path = write(tmp_path / "genesis.toml", document)
    with pytest.raises(ConfigError) as caught:
        load_genesis(path)
    return path, caught.value.problems


def node_problems(
    tmp_path: Path,
    change: Callable[[dict[str, Any]], None] = lambda document: None,
    environ: dict[str, str] | None = None,
) -> tuple[Path, tuple[ConfigProblem, ...]]:
    write(tmp_path / "genesis.toml", genesis_document())
    document = node_document()
    change(document)
    path = write(tmp_path / "node.toml", document)
    with pytest.raises(ConfigError) as caught:
        load_node_config(path, environ={} if environ is None else environ)
    return path, caught.value.problems


def load_node(tmp_path: Path, document: dict[str, Any], environ: dict[str, str] | None = None) -> NodeConfig:
    write(tmp_path / "genesis.toml", genesis_document())
    path = write(tmp_path / "node.toml", document)
    config, _ = load_node_config(path, environ={} if environ is None else environ)
    return config


def only_problem(problems: tuple[ConfigProblem, ...]) -> ConfigProblem:
    assert len(problems) == 1, problems
    return problems[0]


def set_in(section: str, key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document.setdefault(section, {})[key] = value

    return change


# ------------------------------------------------------------------------------------------------ genesis


def test_valid_genesis_loads_with_every_field_and_lookup(tmp_path: Path) -> None:
    document = genesis_document()
    genesis = load_genesis(write(tmp_path / "genesis.toml", document))
    assert genesis.cluster_id == "tonle-test-1"
    assert genesis.currencies == (Currency("KHR", 0), Currency("USD", 2))
    assert genesis.central_bank == Institution(
        "nbc", "National Bank of Cambodia", Role.CENTRAL_BANK, bytes.fromhex(document["institutions"][0]["public_key"])
    )
    assert [node.name for node in genesis.nodes] == ["v1", "v2", "aba-1"]
    assert genesis.node("v2").raft_address == Address("127.0.0.1", 7002)
    assert genesis.node("v1").role is NodeRole.VALIDATOR and genesis.node("v1").institution is None
    assert genesis.node("aba-1").role is NodeRole.INSTITUTION and genesis.node("aba-1").institution == "aba"
    assert genesis.institution("aba").role is Role.BANK
    assert genesis.currency("USD").decimals == 2
    for lookup, missing in ((genesis.node, "v9"), (genesis.institution, "xyz"), (genesis.currency, "EUR")):
        with pytest.raises(KeyError):
            lookup(missing)


def test_genesis_without_institution_nodes_loads_with_none(tmp_path: Path) -> None:
    document = genesis_document()
    del document["institution_nodes"]
    assert load_genesis(write(tmp_path / "genesis.toml", document)).institution_nodes == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1:70000", "port must be 1..65535, got 70000"),
        ("127.0.0.1:0", "port must be 1..65535, got 0"),
        ("127.0.0.1:9999999999", "port must be 1..65535"),
        ("127.0.0.1: 80", "port must be a decimal number"),
        ("127.0.0.1:+80", "port must be a decimal number"),
        ("127.0.0.1", "expected host:port"),
        ("::1:7001", "IPv6 host must be written in brackets"),
        ("[::1]", "expected [ipv6-address]:port"),
        ("[127.0.0.1]:7001", "is not an IPv6 address"),
        ("bad_host:7001", "must be an IPv4/IPv6 address or a hostname"),
        ("999.1.1.1:7001", "must be an IPv4/IPv6 address or a hostname"),
        ("-leading-hyphen:7001", "must be an IPv4/IPv6 address or a hostname"),
        (":7001", "must be an IPv4/IPv6 address or a hostname"),
        (("a" * 64) + ".example:7001", "must be an IPv4/IPv6 address or a hostname"),
        (("a." * 127) + "ab:7001", "must be an IPv4/IPv6 address or a hostname"),
    ],
)
def test_bad_address_is_refused_naming_key_and_file(tmp_path: Path, text: str, fragment: str) -> None:
    def change(document: dict[str, Any]) -> None:
        document["validators"][1]["raft_address"] = text

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "validators[1].raft_address")
    assert fragment in problem.message


def test_address_error_reads_as_in_the_spec(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["validators"][1]["raft_address"] = "127.0.0.1:70000"

    path, problems = genesis_problems(tmp_path, change)
    assert str(only_problem(problems)) == f"{path}: validators[1].raft_address: port must be 1..65535, got 70000"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7001", Address("127.0.0.1", 7001)),
        ("localhost:1", Address("localhost", 1)),
        ("node-1.tonle.example:65535", Address("node-1.tonle.example", 65535)),
        ("[::1]:7001", Address("::1", 7001)),
        ("[fd00::7]:8001", Address("fd00::7", 8001)),
    ],
)
def test_address_parses_and_prints_back(text: str, address: Address) -> None:
    assert Address.parse(text) == address
    assert str(address) == text


def test_duplicate_address_across_nodes_and_kinds_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institution_nodes"][0]["admin_address"] = document["validators"][0]["raft_address"]

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "institution_nodes[0].admin_address")
    assert "duplicate address" in problem.message and "validators[0].raft_address" in problem.message


def test_two_spellings_of_one_ipv6_address_are_duplicates(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["validators"][0]["raft_address"] = "[::1]:7001"
        document["validators"][1]["raft_address"] = "[0:0:0:0:0:0:0:1]:7001"

    _, problems = genesis_problems(tmp_path, change)
    assert only_problem(problems).key == "validators[1].raft_address"


def test_duplicate_node_name_across_validators_and_institution_nodes_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institution_nodes"][0]["name"] = "v1"

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "institution_nodes[0].name")
    assert "duplicate node name" in problem.message


def test_institution_node_naming_an_unknown_institution_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institution_nodes"][0]["institution"] = "acleda"

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "institution_nodes[0].institution")
    assert "no institution with id 'acleda'" in problem.message


def test_two_central_banks_are_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institutions"][1]["role"] = "central_bank"

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "institutions[1].role")
    assert "exactly one institution may have role central_bank" in problem.message


def test_genesis_without_a_central_bank_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institutions"][0]["role"] = "bank"

    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "institutions")
    assert "found none" in problem.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (not_a_curve_point_hex, "not a valid Ed25519 public key"),
        (small_order_point_hex, "not a valid Ed25519 public key"),
        ("ab" * 31, "must be 64 hex characters"),
        ("ab" * 33, "must be 64 hex characters"),
        ("zz" * 32, "must be 64 hex characters"),
        (" " + "ab" * 31 + "a", "must be 64 hex characters"),
    ],
)
def test_invalid_public_key_is_refused(tmp_path: Path, value: str, fragment: str) -> None:
    def change(document: dict[str, Any]) -> None:
        document["validators"][0]["public_key"] = value
        document["institutions"][1]["public_key"] = value

    path, problems = genesis_problems(tmp_path, change)
    assert {(problem.source, problem.key) for problem in problems} == {
        (str(path), "validators[0].public_key"),
        (str(path), "institutions[1].public_key"),
    }
    assert all(fragment in problem.message for problem in problems)


def test_duplicate_node_public_key_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institution_nodes"][0]["public_key"] = document["validators"][1]["public_key"]

    _, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert problem.key == "institution_nodes[0].public_key" and "duplicate node public key" in problem.message


def test_node_key_equal_to_an_institution_key_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["validators"][0]["public_key"] = document["institutions"][0]["public_key"]

    _, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert problem.key == "validators[0].public_key" and "institutions[0]" in problem.message


def test_two_institutions_with_one_signing_key_are_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["institutions"][1]["public_key"] = document["institutions"][0]["public_key"]

    _, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert problem.key == "institutions[1].public_key" and "duplicate institution public key" in problem.message


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


def _delete(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return change


def _without_institution_nodes(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """For changes that remove institution "aba", which would also orphan its node (a second, true problem)."""

    def both(document: dict[str, Any]) -> None:
        change(document)
        del document["institution_nodes"]

    return both


@pytest.mark.parametrize(
    ("change", "key", "fragment"),
    [
        (_set(("format_version",), 2), "format_version", "unsupported; this node reads 1, got integer 2"),
        (_set(("format_version",), True), "format_version", "got boolean true"),
        (_set(("cluster_id",), "ab"), "cluster_id", "must match"),
        (_set(("cluster_id",), "-tonle"), "cluster_id", "must match"),
        (_set(("cluster_id",), "a" * 65), "cluster_id", "must match"),
        (_set(("cluster_id",), "tonle\n"), "cluster_id", "must match"),
        (_set(("currencies",), []), "currencies", "at least 1 entry is required"),
        (_set(("currencies", 0, "code"), "khr"), "currencies[0].code", "must match"),
        (_set(("currencies", 1, "code"), "KHR"), "currencies[1].code", "duplicate currency code"),
        (_set(("currencies", 0, "decimals"), 9), "currencies[0].decimals", "must be 0..8, got 9"),
        (_set(("currencies", 0, "decimals"), -1), "currencies[0].decimals", "must be 0..8, got -1"),
        (_set(("currencies", 0, "decimals"), 2.0), "currencies[0].decimals", "expected an integer, got float 2.0"),
        (_set(("currencies", 0, "decimals"), True), "currencies[0].decimals", "expected an integer, got boolean"),
        (_without_institution_nodes(_set(("institutions",), [])), "institutions", "at least 1 entry is required"),
        (_without_institution_nodes(_set(("institutions", 1, "id"), "a")), "institutions[1].id", "must match"),
        (_without_institution_nodes(_set(("institutions", 1, "id"), "a" * 17)), "institutions[1].id", "must match"),
        (
            _without_institution_nodes(_set(("institutions", 1, "id"), "nbc")),
            "institutions[1].id",
            "duplicate institution id",
        ),
        (_set(("institutions", 1, "name"), ""), "institutions[1].name", "must be 1..80 characters, got 0"),
        (_set(("institutions", 1, "name"), "x" * 81), "institutions[1].name", "must be 1..80 characters, got 81"),
        (_set(("institutions", 1, "name"), "ABA\nBank"), "institutions[1].name", "printable"),
        (_set(("institutions", 1, "role"), "treasury"), "institutions[1].role", "must be one of central_bank"),
        (_set(("institutions", 1, "role"), 3), "institutions[1].role", "expected a string, got integer 3"),
        (_set(("validators",), []), "validators", "at least 1 entry is required"),
        (_set(("validators",), "v1"), "validators", "expected an array of tables"),
        (_set(("validators", 0, "name"), "V1"), "validators[0].name", "must match"),
        (_set(("validators", 0, "name"), "v" * 33), "validators[0].name", "must match"),
        (_set(("validators", 0, "institution"), "nbc"), "validators[0].institution", "unknown key"),
        (_set(("institution_nodes", 0, "institution"), "A"), "institution_nodes[0].institution", "must match"),
        (_delete(("validators", 0, "admin_address")), "validators[0].admin_address", "missing required key"),
        (_delete(("cluster_id",)), "cluster_id", "missing required key"),
        (_set(("treasury",), "yes"), "treasury", "unknown key"),
        (_set(("currencies", 0, "symbol"), "៛"), "currencies[0].symbol", "unknown key"),
    ],
)
def test_genesis_rule_violation_names_key_and_file(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], key: str, fragment: str
) -> None:
    path, problems = genesis_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), key)
    assert fragment in problem.message


def test_every_genesis_problem_is_reported_at_once(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["cluster_id"] = "X"
        document["currencies"][0]["decimals"] = 99
        document["validators"][1]["client_address"] = "nowhere"
        document["institution_nodes"][0]["institution"] = "unknown"

    path, problems = genesis_problems(tmp_path, change)
    assert [problem.key for problem in problems] == [
        "cluster_id",
        "currencies[0].decimals",
        "validators[1].client_address",
        "institution_nodes[0].institution",
    ]
    assert all(problem.source == str(path) for problem in problems)


def test_config_error_lists_one_problem_per_line_and_survives_pickling() -> None:
    problems = (ConfigProblem("a.toml", "x.y", "bad"), ConfigProblem("environment variable TONLE_A__B", "a.b", "worse"))
    error = ConfigError(problems)
    assert str(error).splitlines() == ["a.toml: x.y: bad", "environment variable TONLE_A__B: a.b: worse"]
    assert pickle.loads(pickle.dumps(error)).problems == problems


def test_config_error_without_problems_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ConfigError(())


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "cannot read file"), (b"cluster_id = ", "invalid TOML"), (b"cluster_id = '\xff'", "not valid UTF-8")],
)
def test_unreadable_or_malformed_genesis_is_a_config_error_naming_the_file(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / "genesis.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_genesis(path)
    problem = only_problem(caught.value.problems)
    assert problem.source == str(path) and fragment in problem.message


def test_directory_in_place_of_genesis_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_genesis(tmp_path)
    assert only_problem(caught.value.problems).source == str(tmp_path)


def test_digest_ignores_formatting_but_not_values(tmp_path: Path) -> None:
    document = genesis_document()
    plain = load_genesis(write(tmp_path / "plain.toml", document))
    reformatted_text = "# a comment\n\n" + toml_text(document).replace(" = ", "   =   ").replace(
        document["institutions"][0]["public_key"], document["institutions"][0]["public_key"].upper()
    )
    (tmp_path / "reformatted.toml").write_text(reformatted_text, encoding="utf-8")
    reformatted = load_genesis(tmp_path / "reformatted.toml")
    changed_document = copy.deepcopy(document)
    changed_document["currencies"][1]["decimals"] = 3
    changed = load_genesis(write(tmp_path / "changed.toml", changed_document))
    assert reformatted.digest == plain.digest
    assert changed.digest != plain.digest
    assert len(plain.digest) == 32


# -------------------------------------------------------------------------------------------- node config


def test_defaults_apply_when_only_the_node_section_is_given(tmp_path: Path) -> None:
    config = load_node(tmp_path, node_document())
    assert config.storage == StorageConfig(schema.map_size_bytes_default, True)
    assert config.storage.map_size_bytes == 4 * 2**30
    assert (config.raft.election_timeout_min_ms, config.raft.election_timeout_max_ms) == (1000, 2500)
    assert (config.raft.heartbeat_interval_ms, config.raft.connection_timeout_ms) == (100, 5000)
    assert (config.raft.connection_retry_ms, config.raft.leader_fallback_timeout_ms) == (500, 4000)
    assert (config.raft.log_compaction_entries, config.raft.log_compaction_interval_seconds) == (20000, 3600)
    assert (config.proposer.batch_bytes_max, config.proposer.batch_delay_microseconds) == (49152, 1000)
    assert (config.proposer.queue_entries_max, config.proposer.partial_batches_in_flight_max) == (20000, 1)
    assert (config.api.frame_bytes_max, config.api.connections_max, config.api.request_timeout_ms) == (
        2**20,
        512,
        10000,
    )
    assert (config.log.level, config.log.format) == ("info", "text")


def test_relative_paths_resolve_against_the_config_file_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "cluster" / "genesis.toml", genesis_document())
    document = node_document()
    document["node"]["genesis_file"] = "../genesis.toml"
    document["node"]["key_file"] = str(tmp_path / "elsewhere" / "v1.key")
    path = write(tmp_path / "cluster" / "v1" / "node.toml", document)
    monkeypatch.chdir(tmp_path / "cluster")
    config, genesis = load_node_config(Path("v1/node.toml"), environ={})
    assert config.genesis_file == tmp_path.resolve() / "cluster" / "genesis.toml"
    assert config.data_dir == tmp_path.resolve() / "cluster" / "v1" / "data"
    assert config.key_file == tmp_path.resolve() / "elsewhere" / "v1.key"
    assert config.source == path.resolve()
    assert genesis.node(config.name).role is NodeRole.VALIDATOR


def test_float_where_integer_expected_is_refused(tmp_path: Path) -> None:
    path, problems = node_problems(tmp_path, set_in("storage", "map_size_bytes", 1.0e9))
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "storage.map_size_bytes")
    assert problem.message == "expected an integer, got float 1000000000.0"


def test_bool_where_integer_expected_is_refused(tmp_path: Path) -> None:
    path, problems = node_problems(tmp_path, set_in("api", "connections_max", True))
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "api.connections_max")
    assert problem.message == "expected an integer, got boolean true"


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("storage", "sync", 1, "expected a boolean, got integer 1"),
        ("storage", "sync", "true", "expected a boolean, got string 'true'"),
        ("node", "name", 1, "expected a string, got integer 1"),
        ("node", "data_dir", "", "must not be empty"),
        ("log", "level", "verbose", "must be one of debug | info | warning | error"),
        ("log", "format", "xml", "must be one of text | json"),
    ],
)
def test_wrong_type_or_choice_is_refused(tmp_path: Path, section: str, key: str, value: object, fragment: str) -> None:
    path, problems = node_problems(tmp_path, set_in(section, key, value))
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), f"{section}.{key}")
    assert fragment in problem.message


def test_unknown_key_in_node_config_is_refused(tmp_path: Path) -> None:
    path, problems = node_problems(tmp_path, set_in("storage", "map_size", 2**30))
    problem = only_problem(problems)
    assert (problem.source, problem.key, problem.message) == (str(path), "storage.map_size", "unknown key")


def test_unknown_section_in_node_config_is_refused(tmp_path: Path) -> None:
    path, problems = node_problems(tmp_path, set_in("metrics", "port", 9100))
    problem = only_problem(problems)
    assert (problem.source, problem.key, problem.message) == (str(path), "metrics", "unknown section")


def test_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    write(tmp_path / "genesis.toml", genesis_document())
    path.write_text(toml_text(node_document()).replace("[node]", "storage = 5\n\n[node]"), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_node_config(path, environ={})
    problem = only_problem(caught.value.problems)
    assert (problem.key, problem.message) == ("storage", "expected a table, got integer 5")


def test_missing_required_node_keys_are_each_reported(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        del document["node"]["data_dir"]
        del document["node"]["key_file"]

    path, problems = node_problems(tmp_path, change)
    assert [(problem.source, problem.key, problem.message) for problem in problems] == [
        (str(path), "node.data_dir", "missing required key"),
        (str(path), "node.key_file", "missing required key"),
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("storage", "map_size_bytes", schema.map_size_bytes_min - 1, "must be >= 16777216, got 16777215"),
        ("storage", "map_size_bytes", schema.integer_value_max + 1, "must be 16777216..9223372036854775807"),
        ("storage", "page_aging_interval_ms", -1, "must be 0..60000, got -1"),
        ("storage", "page_aging_interval_ms", schema.page_aging_interval_ms_max + 1, "must be 0..60000, got 60001"),
        ("raft", "election_timeout_min_ms", schema.election_timeout_min_ms_min - 1, "must be >= 100, got 99"),
        ("raft", "heartbeat_interval_ms", schema.heartbeat_interval_ms_min - 1, "must be >= 10, got 9"),
        ("raft", "connection_retry_ms", schema.connection_retry_ms_min - 1, "must be >= 50, got 49"),
        ("raft", "log_compaction_entries", schema.log_compaction_entries_min - 1, "must be >= 100, got 99"),
        ("raft", "log_compaction_interval_seconds", schema.log_compaction_interval_seconds_min - 1, "must be >= 10"),
        ("raft", "connection_timeout_ms", schema.integer_value_max + 1, "must be -9223372036854775808..9223372036"),
        ("raft", "leader_fallback_timeout_ms", schema.integer_value_min - 1, "must be >= -9223372036854775808"),
        ("proposer", "batch_bytes_max", schema.batch_bytes_max_min - 1, "must be 1024..57344, got 1023"),
        ("proposer", "batch_bytes_max", schema.batch_bytes_max_max + 1, "must be 1024..57344, got 57345"),
        ("proposer", "batch_delay_microseconds", schema.batch_delay_microseconds_min - 1, "must be 0..100000, got -1"),
        ("proposer", "batch_delay_microseconds", schema.batch_delay_microseconds_max + 1, "must be 0..100000"),
        ("proposer", "queue_entries_max", schema.queue_entries_max_min - 1, "must be >= 1, got 0"),
        ("proposer", "partial_batches_in_flight_max", schema.partial_batches_in_flight_max_min - 1, "must be 1..32, got 0"),
        ("proposer", "partial_batches_in_flight_max", schema.partial_batches_in_flight_max_max + 1, "must be 1..32, got 33"),
        ("api", "frame_bytes_max", schema.frame_bytes_max_min - 1, "must be 1024..67108864, got 1023"),
        ("api", "frame_bytes_max", schema.frame_bytes_max_max + 1, "must be 1024..67108864, got 67108865"),
        ("api", "connections_max", schema.connections_max_min - 1, "must be >= 1, got 0"),
        ("api", "request_timeout_ms", schema.request_timeout_ms_min - 1, "must be >= 100, got 99"),
    ],
)
def test_node_config_limit_exceeded_is_refused(
    tmp_path: Path, section: str, key: str, value: int, fragment: str
) -> None:
    path, problems = node_problems(tmp_path, set_in(section, key, value))
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), f"{section}.{key}")
    assert fragment in problem.message


def test_every_limit_value_itself_is_accepted(tmp_path: Path) -> None:
    document = node_document()
    document["storage"] = {"map_size_bytes": schema.map_size_bytes_min}
    document["raft"] = {
        "election_timeout_min_ms": schema.election_timeout_min_ms_min,
        "election_timeout_max_ms": schema.election_timeout_min_ms_min + 1,
        "heartbeat_interval_ms": schema.heartbeat_interval_ms_min,
        "connection_timeout_ms": schema.election_timeout_min_ms_min + 1,
        "connection_retry_ms": schema.connection_retry_ms_min,
        "leader_fallback_timeout_ms": schema.heartbeat_interval_ms_min + 1,
        "log_compaction_entries": schema.log_compaction_entries_min,
        "log_compaction_interval_seconds": schema.log_compaction_interval_seconds_min,
    }
    document["proposer"] = {
        "batch_bytes_max": schema.batch_bytes_max_max,
        "batch_delay_microseconds": schema.batch_delay_microseconds_min,
        "queue_entries_max": schema.queue_entries_max_min,
        "partial_batches_in_flight_max": schema.partial_batches_in_flight_max_min,
    }
    document["api"] = {
        "frame_bytes_max": schema.frame_bytes_max_max,
        "connections_max": schema.connections_max_min,
        "request_timeout_ms": schema.request_timeout_ms_min,
    }
    config = load_node(tmp_path, document)
    assert config.raft.heartbeat_interval_ms == 10 and config.proposer.batch_bytes_max == 57344
    assert config.proposer.partial_batches_in_flight_max == 1
    document["proposer"]["batch_bytes_max"] = schema.batch_bytes_max_min
    document["api"]["frame_bytes_max"] = schema.frame_bytes_max_min
    document["proposer"]["batch_delay_microseconds"] = schema.batch_delay_microseconds_max
    document["proposer"]["partial_batches_in_flight_max"] = schema.partial_batches_in_flight_max_max
    config = load_node(tmp_path, document)
    assert config.api.frame_bytes_max == 1024 and config.proposer.batch_delay_microseconds == 100000
    assert config.proposer.partial_batches_in_flight_max == 32


@pytest.mark.parametrize(
    ("values", "key", "fragment"),
    [
        (
            {"election_timeout_max_ms": 1000},
            "raft.election_timeout_max_ms",
            "election_timeout_max_ms (1000) must be greater than election_timeout_min_ms (1000)",
        ),
        (
            {"heartbeat_interval_ms": 334},
            "raft.heartbeat_interval_ms",
            "election_timeout_min_ms (1000) must be greater than 3 * heartbeat_interval_ms (334)",
        ),
        (
            {"election_timeout_min_ms": 300},
            "raft.election_timeout_min_ms",
            "election_timeout_min_ms (300) must be greater than 3 * heartbeat_interval_ms (100)",
        ),
        (
            {"connection_timeout_ms": 2499},
            "raft.connection_timeout_ms",
            "connection_timeout_ms (2499) must be >= election_timeout_max_ms (2500)",
        ),
        (
            {"leader_fallback_timeout_ms": 100},
            "raft.leader_fallback_timeout_ms",
            "leader_fallback_timeout_ms (100) must be greater than heartbeat_interval_ms (100)",
        ),
    ],
)
def test_raft_timing_relation_violated_is_refused(
    tmp_path: Path, values: dict[str, int], key: str, fragment: str
) -> None:
    def change(document: dict[str, Any]) -> None:
        document["raft"] = values

    path, problems = node_problems(tmp_path, change)
    problem = only_problem(problems)
    assert (problem.source, problem.key, problem.message) == (str(path), key, fragment)


def test_node_name_missing_from_genesis_is_refused(tmp_path: Path) -> None:
    path, problems = node_problems(tmp_path, set_in("node", "name", "v9"))
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (str(path), "node.name")
    assert "'v9' is neither a validator nor an institution node" in problem.message


def test_institution_node_name_is_accepted(tmp_path: Path) -> None:
    document = node_document()
    document["node"]["name"] = "aba-1"
    assert load_node(tmp_path, document).name == "aba-1"


def test_genesis_problems_are_reported_with_the_node_config_problems(tmp_path: Path) -> None:
    genesis = genesis_document()
    genesis["cluster_id"] = "X"
    genesis_path = write(tmp_path / "genesis.toml", genesis)
    document = node_document()
    document["log"] = {"level": "loud"}
    path = write(tmp_path / "node.toml", document)
    with pytest.raises(ConfigError) as caught:
        load_node_config(path, environ={})
    assert [(problem.source, problem.key) for problem in caught.value.problems] == [
        (str(path), "log.level"),
        (str(genesis_path.resolve()), "cluster_id"),
    ]


def test_missing_genesis_file_is_reported_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "node.toml", node_document())
    with pytest.raises(ConfigError) as caught:
        load_node_config(path, environ={})
    problem = only_problem(caught.value.problems)
    assert problem.source == str(tmp_path.resolve() / "genesis.toml") and "cannot read file" in problem.message


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read file"), (b"[node", "invalid TOML")])
def test_missing_or_invalid_node_config_file_is_a_config_error_naming_it(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    path = tmp_path / "node.toml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_node_config(path, environ={})
    assert any(problem.source == str(path) and fragment in problem.message for problem in caught.value.problems)


# -------------------------------------------------------------------------------------------- environment


def test_environment_overrides_file_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = node_document()
    document["storage"] = {"map_size_bytes": 2**30, "sync": True}
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    environ = {
        "TONLE_STORAGE__MAP_SIZE_BYTES": "8589934592",
        "TONLE_STORAGE__SYNC": "false",
        "TONLE_LOG__FORMAT": "json",
        "TONLE_NODE__DATA_DIR": "relative/data",
        "TONLE_NODE__NAME": "v2",
        "TONLE_FAILPOINTS": "journal.append=crash",
        "HOME": "/root",
    }
    config = load_node(tmp_path, document, environ)
    assert config.storage == StorageConfig(8589934592, False)
    assert config.log.format == "json" and config.log.level == "info"
    assert config.name == "v2"
    # Paths from the environment are relative to the working directory, not to the file.
    assert config.data_dir == tmp_path.resolve() / "work" / "relative" / "data"
    assert config.key_file == tmp_path.resolve() / "node.key"


def test_environment_is_read_only_from_the_given_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TONLE_LOG__LEVEL", "debug")
    assert load_node(tmp_path, node_document(), environ={}).log.level == "info"
    write(tmp_path / "genesis.toml", genesis_document())
    config, _ = load_node_config(write(tmp_path / "node.toml", node_document()))
    assert config.log.level == "debug"


@pytest.mark.parametrize("text", ["1.5", "1e3", " 12", "12 ", "", "+12", "0x10", "1_000", "\uff11\uff12", "-"])
def test_environment_integer_that_is_not_plain_decimal_is_refused(tmp_path: Path, text: str) -> None:
    _, problems = node_problems(tmp_path, environ={"TONLE_API__CONNECTIONS_MAX": text})
    problem = only_problem(problems)
    assert (problem.source, problem.key) == ("environment variable TONLE_API__CONNECTIONS_MAX", "api.connections_max")
    assert "expected an integer" in problem.message


def test_environment_integer_outside_64_bits_is_refused(tmp_path: Path) -> None:
    _, problems = node_problems(tmp_path, environ={"TONLE_STORAGE__MAP_SIZE_BYTES": "9" * 5000})
    problem = only_problem(problems)
    assert problem.key == "storage.map_size_bytes" and "-9223372036854775808..9223372036854775807" in problem.message


def test_environment_integer_below_its_limit_is_refused_naming_the_variable(tmp_path: Path) -> None:
    _, problems = node_problems(tmp_path, environ={"TONLE_RAFT__HEARTBEAT_INTERVAL_MS": "-5"})
    problem = only_problem(problems)
    assert str(problem) == (
        "environment variable TONLE_RAFT__HEARTBEAT_INTERVAL_MS: raft.heartbeat_interval_ms: must be >= 10, got -5"
    )


def test_environment_relation_violation_blames_the_variable_that_was_set(tmp_path: Path) -> None:
    _, problems = node_problems(tmp_path, environ={"TONLE_RAFT__ELECTION_TIMEOUT_MIN_MS": "3000"})
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (
        "environment variable TONLE_RAFT__ELECTION_TIMEOUT_MIN_MS",
        "raft.election_timeout_min_ms",
    )


@pytest.mark.parametrize("text", ["True", "1", "yes", "FALSE", ""])
def test_environment_boolean_other_than_true_or_false_is_refused(tmp_path: Path, text: str) -> None:
    _, problems = node_problems(tmp_path, environ={"TONLE_STORAGE__SYNC": text})
    problem = only_problem(problems)
    assert (problem.source, problem.key) == ("environment variable TONLE_STORAGE__SYNC", "storage.sync")


@pytest.mark.parametrize(
    ("variable", "key"),
    [
        ("TONLE_STORAGE__MAP_SIZE", "storage.map_size"),
        ("TONLE_METRICS__PORT", "metrics.port"),
        ("TONLE_log__format", "log.format"),
        ("TONLE_LOG__FORMAT__X", "log.format__x"),
    ],
)
def test_unknown_environment_key_is_refused(tmp_path: Path, variable: str, key: str) -> None:
    _, problems = node_problems(tmp_path, environ={variable: "json"})
    problem = only_problem(problems)
    assert (problem.source, problem.key) == (f"environment variable {variable}", key)
    assert "unknown" in problem.message


def test_environment_variables_without_double_underscore_are_ignored(tmp_path: Path) -> None:
    environ = {"TONLE_FAILPOINTS": "x", "TONLE_LOG_FORMAT": "bogus", "OTHER__VALUE": "1", "tonle_log__format": "x"}
    assert load_node(tmp_path, node_document(), environ).log.format == "text"


# ---------------------------------------------------------------------------------------- examples, render


def test_example_files_load() -> None:
    config, genesis = load_node_config(examples_directory / "node.toml", environ={})
    assert config.name == "v1" and genesis.node("v1").role is NodeRole.VALIDATOR
    assert config.genesis_file == examples_directory / "genesis.toml"
    assert load_genesis(examples_directory / "genesis.toml") == genesis
    assert genesis.central_bank.id == "nbc"
    assert len({node.public_key for node in genesis.nodes} | {i.public_key for i in genesis.institutions}) == len(
        genesis.nodes
    ) + len(genesis.institutions)


def test_rendered_genesis_loads_back_equal_including_awkward_names(tmp_path: Path) -> None:
    document = genesis_document()
    genesis = load_genesis(write(tmp_path / "source.toml", document))
    awkward = Institution(
        id="odd",
        name='Bank "Quoted" \\ Back\\slash ធនាគារ 銀行 \u00e9\U0001f3e6 #not-a-comment',
        role=Role.PSP,
        public_key=bytes.fromhex(new_public_key()),
    )
    ipv6_validator = NodeSpec(
        name="v6",
        role=NodeRole.VALIDATOR,
        institution=None,
        raft_address=Address("::1", 7006),
        client_address=Address("node6.example", 8006),
        admin_address=Address("10.0.0.6", 9006),
        public_key=bytes.fromhex(new_public_key()),
    )
    genesis = dataclasses.replace(
        genesis,
        institutions=(*genesis.institutions, awkward),
        validators=(*genesis.validators, ipv6_validator),
    )
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(render_genesis(genesis), encoding="utf-8")
    loaded = load_genesis(rendered)
    assert loaded == genesis
    assert loaded.digest == genesis.digest


def test_rendered_genesis_without_institution_nodes_loads_back_equal(tmp_path: Path) -> None:
    document = genesis_document()
    del document["institution_nodes"]
    genesis = load_genesis(write(tmp_path / "source.toml", document))
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(render_genesis(genesis), encoding="utf-8")
    assert load_genesis(rendered) == genesis


def test_rendered_node_config_loads_back_equal(tmp_path: Path) -> None:
    document = node_document()
    document["node"]["genesis_file"] = "../shared/genesis.toml"
    document["node"]["data_dir"] = str(tmp_path / 'data with space "q" \\ ü')
    document["storage"] = {"map_size_bytes": 2**31, "sync": False}
    document["raft"] = {"heartbeat_interval_ms": 50, "leader_fallback_timeout_ms": 999}
    document["log"] = {"level": "debug", "format": "json"}
    write(tmp_path / "shared" / "genesis.toml", genesis_document())
    original_path = write(tmp_path / "nodes" / "node.toml", document)
    original, _ = load_node_config(original_path, environ={})
    target_directory = tmp_path / "elsewhere" / "deeper"
    target_directory.mkdir(parents=True)
    target = target_directory / "node.toml"
    target.write_text(render_node_config(original, target_directory), encoding="utf-8")
    loaded, _ = load_node_config(target, environ={})
    assert loaded == dataclasses.replace(original, source=target.resolve())
    assert 'genesis_file = "../../shared/genesis.toml"' in target.read_text(encoding="utf-8")


def test_render_refuses_a_path_that_toml_cannot_hold(tmp_path: Path) -> None:
    write(tmp_path / "genesis.toml", genesis_document())
    config, _ = load_node_config(write(tmp_path / "node.toml", node_document()), environ={})
    broken = dataclasses.replace(config, data_dir=tmp_path / "bad\udcffname")
    with pytest.raises(ValueError, match="lone surrogate"):
        render_node_config(broken, tmp_path)


def test_render_refuses_a_value_of_a_type_toml_output_does_not_support(tmp_path: Path) -> None:
    write(tmp_path / "genesis.toml", genesis_document())
    config, _ = load_node_config(write(tmp_path / "node.toml", node_document()), environ={})
    broken = dataclasses.replace(config, storage=StorageConfig(1.5, True))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        render_node_config(broken, tmp_path)


def test_render_escapes_control_characters(tmp_path: Path) -> None:
    document = genesis_document()
    genesis = load_genesis(write(tmp_path / "source.toml", document))
    # The loader refuses unprintable names; the writer must still produce TOML that parses to the same text.
    central_bank = dataclasses.replace(genesis.institutions[0], name="tab\there\x7f\x01\nline")
    named = dataclasses.replace(genesis, institutions=(central_bank,), institution_nodes=())
    parsed = tomllib.loads(render_genesis(named))
    assert parsed["institutions"][0]["name"] == "tab\there\x7f\x01\nline"


# ------------------------------------------------------------------------------------------------- [join]

_join = {
    "institution": "aba",
    "raft_address": "127.0.0.1:7301",
    "client_address": "127.0.0.1:8301",
    "admin_address": "127.0.0.1:9301",
}


def test_a_node_admitted_after_genesis_loads_from_its_join_section(tmp_path: Path) -> None:
    document = node_document()
    document["node"]["name"] = "aba-2"
    document["join"] = dict(_join)
    config = load_node(tmp_path, document)
    assert config.join.requested and config.join.institution == "aba"
    assert "[join]" in render_node_config(config, tmp_path)


def test_a_node_neither_in_genesis_nor_joining_is_refused(tmp_path: Path) -> None:
    _, problems = node_problems(tmp_path, set_in("node", "name", "stranger"))
    assert "[join] is not set" in only_problem(problems).message


def test_a_genesis_node_with_a_join_section_is_refused(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["join"] = dict(_join)

    _, problems = node_problems(tmp_path, change)
    assert only_problem(problems).key == "join"


def test_a_joining_node_needs_every_join_key_and_valid_addresses(tmp_path: Path) -> None:
    def change(document: dict[str, Any]) -> None:
        document["node"]["name"] = "aba-2"
        document["join"] = {**_join, "admin_address": "nowhere"}
        del document["join"]["client_address"]

    _, problems = node_problems(tmp_path, change)
    assert sorted(problem.key for problem in problems) == ["join.admin_address", "join.client_address"]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (True, True), (False, False)])
def test_drop_dead_copies_takes_auto_or_a_boolean_from_the_file(tmp_path: Path, value: object, expected: object) -> None:
    document = node_document()
    document["storage"] = {"drop_dead_copies": value}
    assert load_node(tmp_path, document).storage.drop_dead_copies == expected


@pytest.mark.parametrize(("text", "expected"), [("auto", "auto"), ("true", True), ("false", False)])
def test_drop_dead_copies_takes_auto_or_a_boolean_from_the_environment(tmp_path: Path, text: str, expected: object) -> None:
    config = load_node(tmp_path, node_document(), {"TONLE_STORAGE__DROP_DEAD_COPIES": text})
    assert config.storage.drop_dead_copies == expected


def test_drop_dead_copies_refuses_other_strings_naming_what_it_takes(tmp_path: Path) -> None:
    _, problems = node_problems(tmp_path, set_in("storage", "drop_dead_copies", "sometimes"))
    assert only_problem(problems).message == "expected a boolean or 'auto', got string 'sometimes'"
    _, problems = node_problems(tmp_path, environ={"TONLE_STORAGE__DROP_DEAD_COPIES": "Auto"})
    assert only_problem(problems).message == "expected true or false or auto, got 'Auto'"
    _, problems = node_problems(tmp_path, environ={"TONLE_STORAGE__SYNC": "auto"})
    assert only_problem(problems).message == "expected true or false, got 'auto'"
