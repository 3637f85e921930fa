"""Who may connect and which namespaces each client key may use: CURVE client keys from
DIR/clients/*.key and, optionally, tenants from DIR/tenants.toml. Pure checks; no sockets.

A namespace belongs to the tenant named before the first '/' of its name (b"team-a/<digest>";
the connector's `tenant` setting adds it). DIR/tenants.toml binds keys to tenants:

    [tenants.team-a]
    keys = ["alice.key", "bob.key"]   # public key files in DIR/clients/
    read = ["shared"]                 # optional: other tenants these keys may read ("*": all)

    [tenants.ops]
    keys = ["ops.key"]
    admin = true                      # read, write, invalidate and see every namespace

    [tenants.untrusted]
    keys = ["eve.key"]
    listen = "tcp://0.0.0.0:5601"     # optional: a listener of its own, admitting only its keys

A listener is the unit of isolation (kvstore/listeners.py): a flood of frames on one stalls only
its own clients, so give a tenant you do not trust its own `listen` address.

A key may write (RESERVE, PUT, COMMIT, ABORT, INVALIDATE) the tenants that list it, and read
(LOOKUP, GET, STATS) those plus their `read` lists. Without the file every admitted key may use
every namespace. A malformed file or key raises AccessError naming it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zmq.utils import z85

from kvstore.keys import TENANT_RE, tenant_of, with_tenant

_TENANT_KEYS = {"keys", "read", "admin", "listen"}
ALL = "*"


class AccessError(Exception):
    """The CURVE clients directory or the tenants file is unusable; names the file at fault."""


@dataclass(slots=True, frozen=True)
class Grant:
    """What one client key may do."""

    write: frozenset[str]
    read: frozenset[str]  # includes write; ALL when it may read every tenant
    is_admin: bool = False

    def can_read(self, tenant: str) -> bool:
        return self.is_admin or ALL in self.read or tenant in self.read

    def can_write(self, tenant: str) -> bool:
        return self.is_admin or tenant in self.write


@dataclass(slots=True, frozen=True)
class Access:
    """The admitted keys (z85 public key -> file name) and, with tenants on, their grants."""

    keys: dict[str, str]
    grants: dict[str, Grant] | None  # None: no tenants file
    listeners: dict[str, str] = field(default_factory=dict)  # tenant -> its own tcp:// address

    @property
    def num_tenants(self) -> int:
        return len({t for g in (self.grants or {}).values() for t in g.write})

    def refusal(self, user_id: str | None, name: bytes, write: bool) -> str | None:
        """Why user_id may not read (or write) namespace name; None when it may."""
        if user_id not in self.keys:
            return "this client key is no longer admitted (removed from the clients directory)"
        if self.grants is None:
            return None
        grant = self.grants.get(user_id)
        who = f"key {self.keys[user_id]}"
        if grant is None:
            return f"{who} belongs to no tenant in tenants.toml: it may use no namespace"
        tenant = tenant_of(name)
        if tenant is None:
            return (f"namespace {name.hex()[:24]} names no tenant: with tenants on, a namespace "
                    f"name starts with '<tenant>/' (the connector's `tenant` setting)")
        if write and not grant.can_write(tenant):
            return (f"{who} may not write namespaces of tenant {tenant!r} (it writes "
                    f"{_listed(grant.write)})")
        if not write and not grant.can_read(tenant):
            return (f"{who} may not read namespaces of tenant {tenant!r} (it reads "
                    f"{_listed(grant.read)})")
        return None

    def is_admin(self, user_id: str | None) -> bool:
        return self.grants is None or (user_id in self.grants and self.grants[user_id].is_admin)

    def can_read(self, user_id: str | None, name: bytes) -> bool:
        return self.refusal(user_id, name, write=False) is None


def check_tenant(tenant: str) -> str:
    """tenant, if it can prefix a namespace name; ValueError saying what is allowed."""
    if not TENANT_RE.fullmatch(tenant):
        with_tenant(tenant or "\0", b"")  # raises the message the connector also gives
    return tenant


def load_access(curve_dir: Path) -> Access:
    """Read DIR/clients/*.key and, when present, DIR/tenants.toml; AccessError naming the file."""
    keys = load_client_keys(curve_dir / "clients")
    path = curve_dir / "tenants.toml"
    if not path.exists():
        return Access(keys, None)
    grants, listeners = _load_tenants(path, keys)
    return Access(keys, grants, listeners)


def load_client_keys(directory: Path) -> dict[str, str]:
    """z85 public key -> file name of every *.key in directory, each checked."""
    if not directory.is_dir():
        raise AccessError(f"CURVE clients directory {directory} does not exist (make one with "
                          f"`kvstore keygen DIR`)")
    keys: dict[str, str] = {}
    for path in sorted(directory.glob("*.key")):
        keys.setdefault(_public_key(path), path.name)
    return keys


def _public_key(path: Path) -> str:
    """The z85 public key of a certificate file as `kvstore keygen` writes it."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise AccessError(f"cannot read CURVE client key {path}: {exc.strerror}") from None
    for line in text.splitlines():
        field, sep, value = line.strip().partition("=")
        if sep and field.strip() == "public-key":
            key = value.strip().strip("'\"")
            if len(key) == 40 and _decodes(key):
                return key
            break
    raise AccessError(f"CURVE client key {path} holds no valid public key (a 40-character "
                      f"z85 `public-key = \"...\"` line): fix or remove the file")


def _decodes(key: str) -> bool:
    try:
        return len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError):
        return False


def _load_tenants(path: Path,
                  keys: dict[str, str]) -> tuple[dict[str, Grant], dict[str, str]]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise AccessError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AccessError(f"{path} is not valid TOML: {exc}") from None
    if set(document) - {"tenants"} or not isinstance(document.get("tenants"), dict):
        raise AccessError(f"{path}: expected only [tenants.NAME] tables")
    by_file = {name: key for key, name in keys.items()}
    tenants: dict[str, dict[str, Any]] = document["tenants"]
    write: dict[str, set[str]] = {}
    read: dict[str, set[str]] = {}
    admin: set[str] = set()
    listeners: dict[str, str] = {}
    for tenant, table in tenants.items():
        where = f"{path}: [tenants.{tenant}]"
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise AccessError(f"{where}: {exc}") from None
        if not isinstance(table, dict) or set(table) - _TENANT_KEYS:
            raise AccessError(f"{where}: allowed keys are {', '.join(sorted(_TENANT_KEYS))}")
        for name in _strings(table.get("keys", []), f"{where} keys"):
            if name not in by_file:
                raise AccessError(f"{where} names key {name!r}, which is not a key file in "
                                  f"{path.parent / 'clients'}")
            key = by_file[name]
            write.setdefault(key, set()).add(tenant)
            read.setdefault(key, set()).update([tenant, *_strings(table.get("read", []),
                                                                  f"{where} read")])
            if table.get("admin", False) is True:
                admin.add(key)
            elif "admin" in table and table["admin"] is not False:
                raise AccessError(f"{where}: admin must be true or false")
        if "listen" in table:
            address = table["listen"]
            if not isinstance(address, str) or not address.startswith("tcp://"):
                raise AccessError(f"{where}: listen must be a tcp://HOST:PORT address")
            if address in listeners.values():
                raise AccessError(f"{where}: listen address {address} is another tenant's")
            listeners[tenant] = address
    for key, tenants_read in read.items():
        unknown = sorted(tenants_read - set(tenants) - {ALL})
        if unknown:
            raise AccessError(f"{path}: key {keys[key]} reads tenant {unknown[0]!r}, which has "
                              f"no [tenants.{unknown[0]}] table")
    return {key: Grant(frozenset(write[key]), frozenset(read[key]), key in admin)
            for key in write}, listeners


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AccessError(f"{where} must be a list of strings")
    return value


def _listed(tenants: frozenset[str]) -> str:
    return ", ".join(repr(t) for t in sorted(tenants)) or "none"
