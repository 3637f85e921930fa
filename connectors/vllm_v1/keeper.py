"""Connected clients kept ready in the background, so no request pays for connecting.

A replica's first lookup used to connect and say HELLO inside lookup_timeout_ms; on a busy
machine that did not fit and the first request missed its pool hits. The keeper says HELLO when
the connector starts, then again every KEEPALIVE_S on a client of its own. Each time it sees a
new daemon (the first HELLO, a restart: another pid or segment token, or the daemon answering
again after a failure) it connects a fresh client for every user thread ("slot") and leaves it for
that thread to take; the thread closes its old client and never waits on ZeroMQ's reconnect
backoff or on a HELLO itself.

Clients are not thread-safe: the keeper only builds and connects them, and hands each over once,
under a lock, to the one thread that uses it from then on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kvstore.client import Client
from kvstore.errors import KVStoreError

log = logging.getLogger("kvstore.connector")

# How often a healthy daemon is checked (one HELLO on loopback: ~0.1 ms of daemon time); a restart
# is noticed within this, and every call failure reported through poke() is checked at once.
KEEPALIVE_S = 0.5
# How often a daemon that does not answer is tried again (each try waits up to the probe timeout).
RETRY_S = 0.2
# Consecutive failed probes before an answering daemon counts as down (its lookups then become
# misses at no cost). One probe past its timeout is no proof: a daemon or a replica stalled for a
# moment on a loaded machine still answers lookups, which have their own budget and breaker.
# A user's call failing (poke) probes again at once, so a dead daemon is down within two probes.
FAILED_PROBES_DOWN = 2
# How long stop() waits for the thread beyond a probe's timeout: a slot client's connect after a
# probe that answered (no further one starts once stop() is called).
STOP_JOIN_S = 1.0


class Keeper:
    """One background thread that keeps a connected client ready per slot."""

    def __init__(self, make_client: Callable[[bool], Client], slots: dict[str, bool],
                 probe_timeout_s: float) -> None:
        # make_client(use_shm) -> an unconnected client; the probe never maps the segment.
        self._make_client = make_client
        self._slots = dict(slots)  # slot -> whether its client maps the segment (same host)
        self._probe_timeout_s = probe_timeout_s
        self._lock = threading.Lock()
        self._ready: dict[str, Client] = {}  # slot -> a fresh connected client, not yet taken
        self._generation: tuple[Any, bytes] | None = None  # (pid, token) of the daemon seen
        self._num_generations = 0  # daemons connected to so far (restarts + 1)
        self._num_failed_probes = 0  # consecutive HELLOs that failed
        self._first_try = threading.Event()  # set once the first HELLO answered or failed
        self._wake = threading.Event()
        self._refresh = False  # a user's call failed: give every slot a fresh client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-keeper", daemon=True)

    def start(self) -> Keeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread and close the clients no user thread took. Waits for the thread (a
        HELLO in flight ends within the probe's timeout), so none of its connects or log lines
        comes after the connector has shut down."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self._probe_timeout_s + STOP_JOIN_S)
        with self._lock:
            ready, self._ready = self._ready, {}
        for client in ready.values():
            client.close()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # --- for the user threads -----------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        """Whether the daemon answered the last HELLO."""
        return self._generation is not None

    @property
    def num_generations(self) -> int:
        """How many daemons (first start, restarts) were connected to: changes on every new one,
        and when the daemon answers again after not answering."""
        return self._num_generations

    @property
    def num_failed_probes(self) -> int:
        """Consecutive keepalive HELLOs that failed (0 while the daemon answers)."""
        return self._num_failed_probes

    def wait_first_try(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) for the first HELLO to answer or fail; True if it has."""
        return self._first_try.wait(timeout_s)

    @property
    def is_first_try_done(self) -> bool:
        return self._first_try.is_set()

    def take(self, slot: str) -> Client | None:
        """A freshly connected client for slot if the keeper made one since the last take."""
        with self._lock:
            return self._ready.pop(slot, None)

    def poke(self) -> None:
        """A call failed: check the daemon now instead of at the next keepalive, and hand out
        fresh clients (the failed one has dropped its socket and would reconnect in a call)."""
        self._refresh = True
        self._wake.set()

    # --- the keeper thread -------------------------------------------------------------------
    def _run(self) -> None:
        probe = self._make_client(False)
        probe.timeout_s = self._probe_timeout_s
        try:
            while not self._stop.is_set():
                self._check(probe)
                self._first_try.set()
                is_sure = self.is_up and not self._num_failed_probes
                self._wake.wait(KEEPALIVE_S if is_sure else RETRY_S)
                self._wake.clear()
        finally:
            probe.close()

    def _check(self, probe: Client) -> None:
        try:
            hello = probe.connect()
        except KVStoreError as exc:
            self._num_failed_probes += 1
            if self._generation is not None and self._num_failed_probes >= FAILED_PROBES_DOWN:
                if not self._stop.is_set():
                    log.warning("kvstore daemon at %s stopped answering (%s)", probe.address, exc)
                self._generation = None
            return
        self._num_failed_probes = 0
        generation = (hello.pid, bytes(hello.token))
        if generation == self._generation and not self._refresh:
            return
        self._refresh = False
        clients: dict[str, Client] = {}
        try:
            for slot, use_shm in self._slots.items():
                if self._stop.is_set():
                    break
                client = clients[slot] = self._make_client(use_shm)
                client.connect()
        except KVStoreError as exc:  # gone again already: try again later
            if not self._stop.is_set():
                log.warning("kvstore daemon at %s: connecting failed (%s)", probe.address, exc)
            for client in clients.values():
                client.close()
            return
        with self._lock:
            if self._stop.is_set():  # stopped meanwhile: nobody will take these
                old, clients = clients, {}
            else:
                old, self._ready = self._ready, clients
        for client in old.values():
            client.close()  # never taken: its thread did no call since the last new daemon
        if self._generation is None and self._num_generations:
            log.info("kvstore daemon at %s answers again", probe.address)
        if generation != self._generation:
            self._num_generations += 1  # first: whoever sees is_up also sees it
        self._generation = generation


def swap(keeper: Keeper, slot: str, current: Client | None,
         on_replace: Callable[[Client], None] | None = None) -> Client | None:
    """current, or the keeper's fresh client for slot (closing current) when there is one."""
    fresh = keeper.take(slot)
    if fresh is None:
        return current
    if current is not None:
        if on_replace is not None:
            on_replace(current)
        current.close()
    return fresh
