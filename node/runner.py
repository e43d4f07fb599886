"""`tonle node start`: load the configuration, then run one node on uvloop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from config.loader import load_node_config
from config.schema import Address, ConfigError
from node.admin import AdminServer
from node.api import ApiServer
from node.logs import configure_logging
from node.failpoints import FailpointError
from node.open_api import OpenApiConfigError, OpenApiServer, start_open_api
from node.server import LedgerNode, StartupError

logger = logging.getLogger("tonle.node")

# sysexits.h: EX_CONFIG. A supervisor should not restart a node that refuses its configuration.
exit_code_configuration = 78
# How often the leader checks for due pending-transfer expiries and idle checkpoints.
housekeeping_interval_seconds = 0.2


def run_node(config_path: Path) -> int:
    try:
        config, genesis = load_node_config(config_path)
    except ConfigError as error:
        print(f"tonle: refusing to start: invalid configuration\n{error}", file=sys.stderr)
        return exit_code_configuration
    holder: dict[str, LedgerNode] = {}

    def context() -> dict[str, int | None]:
        node = holder.get("node")
        if node is None or node.raft is None:
            return {"term": None, "index": None}
        status = node.raft.status
        return {"term": status.term, "index": status.raft_applied_index}

    configure_logging(config.name, config.log.level, config.log.format, context)
    try:
        node = LedgerNode(config, genesis)
    except (StartupError, ConfigError, FailpointError) as error:
        logger.error("refusing to start: %s", error)
        return exit_code_configuration
    holder["node"] = node
    try:
        uvloop.run(_serve(node))
    except StartupError as error:
        logger.error("refusing to start: %s", error)
        return exit_code_configuration
    finally:
        node.close()
    return 0


async def _serve(node: LedgerNode) -> None:
    loop = asyncio.get_running_loop()
    node.loop = loop
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    node.start_raft()
    api = ApiServer(node)
    admin = AdminServer(node)
    spec = node.spec
    open_api: OpenApiServer | None = None
    try:
        await api.start(spec.client_address.host, spec.client_address.port)
        await admin.start(spec.admin_address.host, spec.admin_address.port)
        if node.config.open_api.enabled:
            address = Address.parse(node.config.open_api.listen_address)
            open_api = await start_open_api(node, address.host, address.port)
    except OSError as error:
        raise StartupError(f"cannot listen: {error}") from None
    except OpenApiConfigError as error:
        raise StartupError(f"open API: {error}") from None
    logger.info(
        "node %s (%s) serving: raft %s, client API %s, admin %s",
        spec.name,
        spec.role,
        spec.raft_address,
        spec.client_address,
        spec.admin_address,
    )
    housekeeping = loop.create_task(_housekeeping(node, stop))
    await stop.wait()
    housekeeping.cancel()
    logger.info("stopping on signal")
    await api.close()
    await admin.close()
    if open_api is not None:
        await open_api.close()


async def _housekeeping(node: LedgerNode, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(housekeeping_interval_seconds)
        node.propose_housekeeping()
        node.clear_stale_readers()
