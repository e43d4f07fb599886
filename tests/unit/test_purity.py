"""The pure core stays pure: no sockets, event loops, clocks, threads or pysyncobj below node/ and raft/."""

import ast
import subprocess
import sys
from pathlib import Path

repository = Path(__file__).resolve().parents[2]
pure_modules = [
    "config.schema", "config.loader", "config.render", "config.keys",
    "consensus.codec", "consensus.entries", "consensus.batch", "consensus.proposer",
    "storage.state", "storage.records", "storage.rules", "storage.queries", "storage.tree",
    "consensus.merkle", "consensus.receipts",
]
# Loading any of these means the module does IO of a kind the pure core must not do, or is not
# deterministic (the apply must give the same result on every node).
forbidden_runtime_modules = ["pysyncobj", "uvloop", "socket", "asyncio", "threading", "selectors"]
forbidden_imports = {"time", "datetime", "random", "socket", "asyncio", "threading", "uvloop", "pysyncobj", "node"}


def test_importing_the_pure_modules_loads_no_io_runtime():
    script = (
        "import sys\n"
        f"for name in {pure_modules!r}: __import__(name)\n"
        f"print(sorted(m for m in {forbidden_runtime_modules!r} if m in sys.modules))\n"
    )
    output = subprocess.run([sys.executable, "-c", script], cwd=repository, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"


def test_pure_modules_do_not_import_clocks_randomness_or_the_shell():
    offenders = []
    for module in pure_modules:
        path = repository / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [(module, name) for name in names if name.split(".")[0] in forbidden_imports]
    assert offenders == []
