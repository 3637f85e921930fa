"""Import direction (STYLE.md): pure modules stay pure, and connectors never reach the daemon."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvstore"

# module -> the kvstore modules it may import (None: not checked here)
ALLOWED: dict[str, set[str]] = {
    "keys": set(),
    "errors": set(),
    "units": set(),
    "index": {"keys"},
    "slabs": {"keys"},
    "policy": {"keys", "index"},
    "clients": {"keys", "index"},
    "room": {"keys", "index", "slabs"},
    "hottest": {"keys", "index"},
    "outcomes": {"keys", "index"},
    "writes": {"keys", "index", "policy", "slabs", "clients", "room", "outcomes", "pool"},
    # The Store owns the bytes: index, policy, slabs and the pool meet here and nowhere else.
    "store": {"keys", "index", "policy", "slabs", "clients", "room", "hottest", "outcomes",
              "writes", "pool"},
    "pool": set(),
    "messages": {"keys"},
    "protocol": {"keys", "errors", "messages"},
    "calls": {"protocol", "errors", "ipc"},
    "client": {"calls", "protocol", "keys", "errors", "pool", "ipc", "bulk", "hashfiles"},
    # A same-host LOOKUP's hashes through a file: both ends, no cache logic.
    "hashfiles": {"errors", "keys", "pool", "protocol"},
    # A TCP GET's payload on a side stream (issue 12): plain sockets, no kvstore parts.
    "bulk": set(),
    "ipc": set(),
    "gcpolicy": set(),
    "releases": set(),
    "tenants": {"keys"},
    "gate": {"protocol", "keys", "errors", "tenants"},
    "metrics": {"store", "protocol", "keys", "index", "policy", "slabs", "clients"},
    "config": {"policy", "units", "ipc", "pool", "tiers", "directory"},
    # The seam below the pool: knows keys only; the server puts what it returns into the Store.
    "tiers": {"keys"},
    # The cluster tier (issue 12): the directory knows keys only (and Valkey); the tier pulls
    # from peers with the daemon's own client, never touching the Store.
    "directory": {"keys"},
    "cluster": {"client", "directory", "keys", "tiers"},
    # The loop decodes, calls the Store, encodes and sends: none of the Store's parts.
    "handlers": {"listeners", "protocol", "connections", "errors", "gate", "keys", "metrics",
                 "pool", "store", "tiers", "bulk", "hashfiles"},
    "server": {"ipc", "listeners", "protocol", "config", "connections", "errors", "gate", "inbox",
               "malloc", "metrics", "pool", "store", "gcpolicy", "releases", "tiers", "handlers", "cluster",
               "bulk", "hashfiles"},
    "cli": {"config", "errors", "ipc", "keys", "units", "malloc", "pool", "server", "tenants",
            "client", "gcpolicy"},
}
# What server.py may not reach through its Store or its pool (issue 11: the Store owns the bytes).
STORE_INTERNALS = {"index", "slabs", "policy", "clients", "pool", "lease_entries", "read", "pin"}
POOL_BYTES = {"buffer", "view"}
NEVER_FROM_CONNECTORS = {"server", "store", "index"}


def kvstore_imports(path: Path, package: str) -> set[str]:
    """The kvstore modules a file imports anywhere (top level, functions, TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from kvstore import protocol` imports a module; `from kvstore.x import y` imports x.
            names = [f"{module}.{a.name}" if module == "kvstore" else module for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "kvstore" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_checked_module_exists() -> None:
    """The rules name real modules, so a rename cannot silently skip a check."""
    missing = [name for name in ALLOWED if not (PACKAGE / f"{name}.py").exists()]
    assert not missing


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_what_the_layering_allows(module: str) -> None:
    """keys <- index, policy, slabs <- store; protocol only keys/errors; client no server side."""
    imported = kvstore_imports(PACKAGE / f"{module}.py", "kvstore") - {module}
    extra = sorted(imported - ALLOWED[module])
    assert not extra, f"kvstore.{module} imports {extra}"


def store_reaches(path: Path) -> list[str]:
    """Every `<x>.store.<internal>` and `<x>.pool.<bytes>` in a file, and any private attribute
    of a store (`<x>.store._y`)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute) or not isinstance(node.value, ast.Attribute):
            continue
        owner, attr = node.value.attr, node.attr
        if (owner == "store" and (attr in STORE_INTERNALS or attr.startswith("_"))) or (
                owner == "pool" and attr in POOL_BYTES):
            found.append((node.lineno, f"line {node.lineno}: {owner}.{attr}"))
    return [text for _, text in sorted(found)]


def test_server_touches_no_store_internals() -> None:
    """server.py and its handlers call the Store's methods; its index, slabs, policy, clients and
    the pool's bytes are the Store's alone (leases, pins and copies into slots happen there)."""
    assert store_reaches(PACKAGE / "server.py") == []
    assert store_reaches(PACKAGE / "handlers.py") == []


def test_store_reach_checker_sees_internals(tmp_path: Path) -> None:
    """The checker is live: it flags each kind of reach it forbids, and not a method call."""
    source = tmp_path / "probe.py"
    source.write_text("self.store.index.pin(x)\nself.pool.buffer[0:1] = b'x'\n"
                      "self.store._held(ns)\nself.store.reserve(ns, rows)\n")
    assert store_reaches(source) == ["line 1: store.index", "line 2: pool.buffer",
                                     "line 3: store._held"]


def test_connectors_never_import_the_daemon_side() -> None:
    """connectors/ use the client, protocol and keys, never server, store or index."""
    offenders = {}
    for path in sorted((ROOT / "connectors").rglob("*.py")):
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        bad = kvstore_imports(path, package) & NEVER_FROM_CONNECTORS
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders


def test_connectors_share_code_through_common_only() -> None:
    """Neither connector imports the other: what both need lives in connectors/common.py."""
    offenders = {}
    for name, other in (("lmcache", "vllm_v1"), ("vllm_v1", "lmcache")):
        for path in sorted((ROOT / "connectors" / name).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                        for a in n.names}
            bad = sorted(m for m in modules if m.startswith(f"connectors.{other}"))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders


def test_bench_never_imports_the_tests() -> None:
    """bench/ is shipped and run without tests/: what both need lives in bench/ or kvstore/."""
    offenders = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if any(m == "tests" or m.startswith("tests.") for m in modules):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_import_checker_sees_every_import_form(tmp_path: Path) -> None:
    """The checker catches plain, from, aliased, nested and relative imports."""
    source = tmp_path / "probe.py"
    source.write_text(
        "import kvstore.index\n"
        "import kvstore.slabs as s\n"
        "from kvstore import store, keys as k\n"
        "from kvstore.server import Server\n"
        "from .pool import Pool\n"
        "def f():\n    from kvstore.client import Client\n")
    assert kvstore_imports(source, "kvstore") == {
        "index", "slabs", "store", "keys", "server", "pool", "client"}


def test_pure_modules_load_neither_zmq_nor_torch() -> None:
    """Importing the pure core (index, policy, protocol, store, keys) loads no zmq or torch."""
    code = (
        "import json, sys\n"
        "import kvstore.index, kvstore.policy, kvstore.protocol, kvstore.store, kvstore.keys\n"
        "print(json.dumps(sorted(m for m in ('zmq', 'torch') if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert json.loads(result.stdout) == []


def test_loading_check_would_notice_zmq() -> None:
    """The subprocess check is live: importing the client does load zmq."""
    code = "import json, sys, kvstore.client\nprint(json.dumps('zmq' in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert json.loads(result.stdout) is True
