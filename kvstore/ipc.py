"""The daemon's ipc:// socket: its default path in a directory private to the daemon's uid, the
check that no live daemon holds a path before binding it, and its removal at shutdown.

Paths and files only; no ZeroMQ here. The default lives beside the segments, under /dev/shm: a
process that can reach it can also open a same-uid segment (the same-host fast path).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

SOCKET_ROOT = Path("/dev/shm")
_DIR_MODE = 0o700  # only the daemon's uid may reach its sockets (and root)
_SOCKET_MODE = 0o600
_DIR_PREFIX = "kvstore-sockets-"


class IpcError(Exception):
    """An ipc path cannot be used; the message is meant for an operator."""


def socket_dir(uid: int | None = None) -> Path:
    """The per-uid directory of default sockets (like tmux's /tmp/tmux-UID)."""
    return SOCKET_ROOT / f"{_DIR_PREFIX}{os.geteuid() if uid is None else uid}"


def default_ipc_path(segment: str) -> Path:
    """Where a daemon of this uid listens by default: one socket per segment name."""
    return socket_dir() / f"{segment}.sock"


def default_address(segment: str = "kvstore") -> str:
    """The client's default address: the default daemon (segment `kvstore`) of this uid."""
    return f"ipc://{default_ipc_path(segment)}"


def connect_refusal(address: str) -> str | None:
    """Why a client must not connect to address; None when it may.

    A default socket directory (kvstore-sockets-UID) must be the one that uid's daemon made:
    owned by UID and closed to others. Another user could make one first under /dev/shm and
    listen there, to be handed the blocks a client saves and to serve it blocks of their own.
    """
    if not address.startswith("ipc://"):
        return None
    directory = Path(address.removeprefix("ipc://")).parent
    uid = directory.name.removeprefix(_DIR_PREFIX)
    if not directory.name.startswith(_DIR_PREFIX) or not uid.isdigit():
        return None
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None  # no daemon there yet: the connect just finds nobody
    if stat.S_ISDIR(st.st_mode) and st.st_uid == int(uid) and not stat.S_IMODE(st.st_mode) & 0o077:
        return None
    return (f"not connecting to {address}: {directory} is not private to uid {uid} (owner uid "
            f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); another user may have made it")


def ensure_private_dir(path: Path) -> None:
    """Create path mode 0700, or check an existing one is ours and closed to others.

    /dev/shm is writable by everyone: a directory another user made there first could hand our
    socket to them, so it is refused, not used.
    """
    try:
        path.mkdir(mode=_DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise IpcError(f"cannot create socket directory {path}: {exc.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() \
            or stat.S_IMODE(st.st_mode) & 0o077:
        raise IpcError(f"socket directory {path} is not a directory of uid {os.geteuid()} with "
                       f"mode 0700 (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): "
                       f"remove it, or pass --ipc PATH")


def prepare_bind(path: Path) -> None:
    """Refuse a path a live daemon listens on; remove a socket file a dead one left.

    ZeroMQ unlinks whatever file sits at an ipc path when it binds, so without this check a
    second daemon would silently take the first one's socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise IpcError(f"--ipc {path} exists and is not a socket: choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)  # nobody listens: left by a daemon that was killed
        return
    except OSError as exc:
        raise IpcError(f"--ipc {path} cannot be checked: {exc.strerror}") from None
    finally:
        probe.close()
    raise IpcError(f"--ipc {path} is in use by a running daemon: choose another path")


def restrict(path: Path) -> None:
    """Make a freshly bound socket file connectable by its owner only."""
    os.chmod(path, _SOCKET_MODE)


def remove(path: Path, inode: int) -> None:
    """Remove the socket file at shutdown, unless another process has bound the path since."""
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
