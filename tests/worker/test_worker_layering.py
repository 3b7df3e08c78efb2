"""The worker's layering: protocol modules depend on the WorkerPort interface, never on the Worker class.

Read from the source (imports at any level, TYPE_CHECKING blocks included), so
that a shortcut through the Worker object cannot creep back in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKER_DIR = Path(__file__).resolve().parents[2] / "shardswitch" / "worker"
#: The worker itself may know the Worker class; nothing else in worker/ may (its datapath included).
WORKER_SIDE = {"worker.py", "__init__.py"}
PROTOCOL_MODULES = sorted(str(p.relative_to(WORKER_DIR)) for p in WORKER_DIR.rglob("*.py") if p.name not in WORKER_SIDE
                          or p.parent != WORKER_DIR)
#: TCP's modules other than its core, which know the core only through tcp/internal.py.
TCP_PARTS = sorted(p.name for p in (WORKER_DIR / "tcp").glob("*.py") if p.name not in ("flows.py", "__init__.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any level of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_protocol_modules_are_listed() -> None:
    """The check below covers the protocol modules and the flow layer."""
    assert {"ping.py", "udp.py", "tcp/flows.py", "tcp/forward.py", "tcp/vu.py", "tcp/buf.py", "tcp/timers.py",
            "tcp/internal.py", "flow.py", "fwd.py", "port.py"} <= set(PROTOCOL_MODULES)
    assert {"buf.py", "vu.py", "timers.py", "forward.py", "internal.py", "migrate.py"} <= set(TCP_PARTS)


@pytest.mark.parametrize("name", PROTOCOL_MODULES)
def test_no_protocol_module_imports_the_worker(name: str) -> None:
    """No module but the worker's own imports shardswitch.worker.worker (or its datapath), even under TYPE_CHECKING."""
    imports = imported_modules(WORKER_DIR / name)
    assert not {m for m in imports if m == "shardswitch.worker.worker" or m.startswith("shardswitch.worker.worker.")}
    assert "shardswitch.worker.datapath" not in imports


@pytest.mark.parametrize("name", TCP_PARTS)
def test_tcp_parts_know_the_core_only_through_its_contract(name: str) -> None:
    """The frame writers, timers, acceptor and migration never import the TCP core (flows.py) or the package
    (whose __init__ imports the core), even under TYPE_CHECKING: only tcp/internal.py.  No import cycle."""
    imports = imported_modules(WORKER_DIR / "tcp" / name)
    assert not {m for m in imports if m.startswith("shardswitch.worker.tcp.flows")}
    assert "shardswitch.worker.tcp" not in imports
    assert not {m for m in imports if m.startswith("shardswitch.worker.tcp.") and m.count(".") == 3
                and m.rsplit(".", 1)[1] in ("EDGE", "TcpFlow", "TcpFlows")}
