"""Writes Genesis and NodeConfig as TOML text that the loader reads back to equal dataclasses."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from config.schema import (
    ApiConfig,
    Genesis,
    LogConfig,
    NodeConfig,
    NodeSpec,
    ProposerConfig,
    RaftConfig,
    StorageConfig,
)

# TOML basic strings need these escaped; every other control character (and DEL) is written as \uXXXX.
_string_escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_delete_character = 0x7F
_control_characters_end = 0x20
_surrogates_first, _surrogates_last = 0xD800, 0xDFFF


def render_genesis(genesis: Genesis) -> str:
    lines = [f"format_version = {genesis.format_version}", f"cluster_id = {_string(genesis.cluster_id)}"]
    for currency in genesis.currencies:
        lines += ["", "[[currencies]]", f"code = {_string(currency.code)}", f"decimals = {currency.decimals}"]
    for institution in genesis.institutions:
        lines += [
            "",
            "[[institutions]]",
            f"id = {_string(institution.id)}",
            f"name = {_string(institution.name)}",
            f"role = {_string(institution.role.value)}",
            f"public_key = {_string(institution.public_key.hex())}",
        ]
    for node in genesis.validators:
        lines += ["", "[[validators]]", *_node_lines(node)]
    for node in genesis.institution_nodes:
        lines += ["", "[[institution_nodes]]", *_node_lines(node)]
    if genesis.cross_border_currency:
        # A top-level key: it must come before the first table, so it is inserted after cluster_id.
        lines.insert(2, f"cross_border_currency = {_string(genesis.cross_border_currency)}")
    return "\n".join(lines) + "\n"


def render_node_config(config: NodeConfig, relative_to: Path) -> str:
    """Renders `config` for a file in directory `relative_to`; its paths are written relative to it."""
    directory = relative_to.resolve()
    lines = [
        "[node]",
        f"name = {_string(config.name)}",
        f"genesis_file = {_string(_relative_path(config.genesis_file, directory))}",
        f"data_dir = {_string(_relative_path(config.data_dir, directory))}",
        f"key_file = {_string(_relative_path(config.key_file, directory))}",
    ]
    sections: tuple[tuple[str, StorageConfig | RaftConfig | ProposerConfig | ApiConfig | LogConfig], ...] = (
        ("storage", config.storage),
        ("raft", config.raft),
        ("proposer", config.proposer),
        ("api", config.api),
        ("log", config.log),
    )
    for name, section in sections:
        lines += ["", f"[{name}]"]
        lines += [f"{field.name} = {_value(getattr(section, field.name))}" for field in dataclasses.fields(section)]
    if config.join.requested:
        lines += ["", "[join]"]
        lines += [f"{field.name} = {_value(getattr(config.join, field.name))}" for field in dataclasses.fields(config.join)]
    if config.open_api.enabled:
        lines += ["", "[open_api]", f"listen_address = {_string(config.open_api.listen_address)}"]
        if config.open_api.tokens_file is not None:
            lines.append(f"tokens_file = {_string(_relative_path(config.open_api.tokens_file, directory))}")
    return "\n".join(lines) + "\n"


def _node_lines(node: NodeSpec) -> list[str]:
    lines = [f"name = {_string(node.name)}"]
    if node.institution is not None:
        lines.append(f"institution = {_string(node.institution)}")
    return [
        *lines,
        f"raft_address = {_string(str(node.raft_address))}",
        f"client_address = {_string(str(node.client_address))}",
        f"admin_address = {_string(str(node.admin_address))}",
        f"public_key = {_string(node.public_key.hex())}",
    ]


def _relative_path(path: Path, directory: Path) -> str:
    return Path(os.path.relpath(path, directory)).as_posix()


def _value(value: object) -> str:
    # bool first: it is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def _string(text: str) -> str:
    characters = []
    for character in text:
        code = ord(character)
        if character in _string_escapes:
            characters.append(_string_escapes[character])
        elif code < _control_characters_end or code == _delete_character:
            characters.append(f"\\u{code:04X}")
        elif _surrogates_first <= code <= _surrogates_last:
            # A lone surrogate (e.g. an undecodable file name) is not a Unicode scalar value; TOML cannot hold it.
            raise ValueError(f"cannot write {text!r} as TOML: it contains a lone surrogate")
        else:
            characters.append(character)
    return '"' + "".join(characters) + '"'
