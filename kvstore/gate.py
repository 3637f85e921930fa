"""The daemon's door: CURVE authentication (ZAP) of client keys and, per request, whether the
request's key may use the namespace it names (kvstore/tenants.py). Reloaded on SIGHUP.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import zmq

from kvstore.protocol import Invalidate, Op, Request
from kvstore.tenants import Access, AccessError, load_access

log = logging.getLogger("kvstore.server")

_READ_OPS = frozenset({Op.LOOKUP, Op.GET})
_WRITE_OPS = frozenset({Op.RESERVE, Op.PUT, Op.COMMIT, Op.ABORT})
_REVOKED = "this client key is no longer admitted (removed from the clients directory)"
# ZMQ_MAXMSGSIZE bounds the wire frame, which under CURVE is a MESSAGE command: flags byte +
# "\x07MESSAGE" (8) + short nonce (8) + Poly1305 tag (16) around the plaintext. Measured on
# libzmq 4.3.5: 33 is the smallest extra that lets a 4 MiB frame through a 4 MiB limit.
CURVE_FRAME_OVERHEAD_BYTES = 33
_TENANT_DOMAIN = "tenant:"  # ZAP domain of a tenant's own listener: this, then the tenant name


class Gate:
    """Admits CURVE client keys and checks each request against the tenants file."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        # Read before anything listens: a bad key file stops the start (AccessError).
        self.access: Access = load_access(keys_dir)
        self._auth: Any = None
        self._server_keys: tuple[bytes, bytes] = (b"", b"")

    def enable(self, ctx: zmq.Context, sock: zmq.Socket, tenant: str | None = None) -> None:
        """Make sock a CURVE server whose clients this gate admits: every admitted key, or for a
        tenant's own listener only that tenant's keys (its ZAP domain names the tenant)."""
        if self._auth is None:
            from zmq.auth import load_certificate
            from zmq.auth.thread import ThreadAuthenticator

            public, secret = load_certificate(self.keys_dir / "server.key_secret")
            assert secret is not None, "server.key_secret holds no secret key"
            self._server_keys = (public, secret)
            # ZAP asks callback() about each new connection; the User-Id of the connection's
            # messages is then its z85 public key (pyzmq's curve_user_id).
            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        if tenant is not None:
            domain = _TENANT_DOMAIN + tenant
            self._auth.configure_curve_callback(domain=domain, credentials_provider=self)
            sock.zap_domain = domain.encode()
        sock.curve_publickey, sock.curve_secretkey = self._server_keys
        sock.curve_server = True

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP (authenticator thread): whether a z85 client key is admitted right now, on a
        tenant's own listener only when the key writes that tenant."""
        access = self.access  # one read; reload swaps it
        user = key.decode("ascii", "replace")
        if user not in access.keys:
            return False
        if not domain.startswith(_TENANT_DOMAIN):
            return True
        grant = (access.grants or {}).get(user)
        return grant is not None and domain[len(_TENANT_DOMAIN):] in grant.write

    def reload(self) -> None:
        """Re-read the clients directory and tenants file; a bad one changes nothing and is
        logged naming the file. New connections and every later request see the new rules."""
        try:
            access = load_access(self.keys_dir)
        except AccessError as exc:
            log.error("reload failed, the keys in force stay: %s", exc)
            return
        if access.listeners != self.access.listeners:
            log.warning("tenant listen addresses changed in tenants.toml: they take effect at the "
                        "next start (the listeners in force stay)")
        self.access = access
        log.warning("reloaded %s: %d client keys, %s", self.keys_dir, len(access.keys),
                    f"{access.num_tenants} tenants" if access.grants is not None
                    else "no tenants file")

    def refusal(self, req: Request, user_id: str | None) -> str | None:
        """Why the key user_id may not make req; None when it may."""
        if req.OP in _READ_OPS or req.OP in _WRITE_OPS:
            ns = getattr(req, "ns")  # every read and write names its namespace (NsRequest)
            return self.access.refusal(user_id, ns.name, req.OP in _WRITE_OPS)
        if isinstance(req, Invalidate):
            return self.access.refusal(user_id, req.name, write=True)
        return None if user_id in self.access.keys else _REVOKED

    def visible(self, user_id: str | None, namespaces: dict[str, Any]) -> dict[str, Any]:
        """The STATS namespaces (hex name -> stats) the key may see: other tenants' names,
        counts and hottest hashes are theirs."""
        if self.access.is_admin(user_id):
            return namespaces
        return {k: v for k, v in namespaces.items()
                if self.access.can_read(user_id, bytes.fromhex(k))}


def user_id(frame: zmq.Frame) -> str | None:
    """The User-Id ZAP gave the connection a frame came on (its z85 CURVE key)."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None
