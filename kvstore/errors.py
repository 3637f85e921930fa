"""Typed errors shared by the daemon and its clients."""


class KVStoreError(Exception):
    """Base class for every error kvstore raises on purpose."""


class ProtocolError(KVStoreError):
    """A frame or message does not follow the wire spec (kvstore/protocol.py)."""


class ServerUnavailable(KVStoreError):
    """The daemon did not answer in time or cannot be reached; callers treat this as a miss."""


class ServerError(KVStoreError):
    """The daemon answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class VersionMismatch(ServerError):
    """Client and daemon speak different protocol versions."""
