"""Node configuration and genesis: frozen dataclasses, the TOML loader and writers, and key files."""

from config.keys import generate_key_file, load_signing_key, public_key_hex
from config.loader import load_genesis, load_node_config
from config.render import render_genesis, render_node_config
from config.schema import (
    Address,
    ApiConfig,
    ConfigError,
    ConfigProblem,
    Currency,
    Genesis,
    Institution,
    LogConfig,
    NodeConfig,
    NodeRole,
    NodeSpec,
    ProposerConfig,
    RaftConfig,
    Role,
    StorageConfig,
)

__all__ = [
    "Address",
    "ApiConfig",
    "ConfigError",
    "ConfigProblem",
    "Currency",
    "Genesis",
    "Institution",
    "LogConfig",
    "NodeConfig",
    "NodeRole",
    "NodeSpec",
    "ProposerConfig",
    "RaftConfig",
    "Role",
    "StorageConfig",
    "generate_key_file",
    "load_genesis",
    "load_node_config",
    "load_signing_key",
    "public_key_hex",
    "render_genesis",
    "render_node_config",
]
