"""The simulator's consistent_hash ring against the real vllm-router: the real router, in front of
three stdlib HTTP workers that answer a completion and note each request's X-Session-ID, sends
every session where bench/router_hash.py says it will. The simulator's first model hashed
sessions its own way and agreed with the router on about half the sessions of two workers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.fleet_procs import Router, free_port, http
from bench.router_hash import HashRing, session_key


class _Worker:
    """An OpenAI-style worker that answers every completion with one token and notes sessions."""

    def __init__(self) -> None:
        self.sessions: list[str] = []
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self._reply({"status": "ok"})

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                worker.sessions.append(self.headers.get("X-Session-ID", ""))
                self._reply({"id": "cmpl-0", "object": "text_completion", "model": "m",
                             "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "total_tokens": 2}})

            def _reply(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_sessions_land_where_the_ring_model_puts_them(tmp_path: Path) -> None:
    workers = [_Worker() for _ in range(3)]
    router = Router("consistent_hash", workers, tmp_path, "hash").start()  # type: ignore[arg-type]
    sessions = [f"chat-{i}" for i in range(24)]
    try:
        for session in sessions:
            with http("POST", router.url + "/v1/completions",
                      {"model": "m", "prompt": "hello", "max_tokens": 1},
                      headers={"X-Session-ID": session}) as response:
                assert response.status == 200
    finally:
        router.stop()
        for w in workers:
            w.server.shutdown()
            w.server.server_close()
    ring = HashRing([w.url for w in workers])
    for index, w in enumerate(workers):
        want = [s for s in sessions if ring.owner(session_key(s)) == index]
        assert w.sessions == want, (index, w.sessions, want, router.log_path)
    assert sum(1 for w in workers if w.sessions) >= 2  # the ring spread them, or the test is weak


def test_the_ring_keeps_the_router_logs_choices() -> None:
    """Choices vllm-router 0.1.17 logged in bench.fleet's runs (router-*-consistent_hash-*.log)."""
    three = ["http://127.0.0.1:30799", "http://127.0.0.1:30585", "http://127.0.0.1:30647"]
    two = ["http://127.0.0.1:22694", "http://127.0.0.1:28807"]
    logged = {(tuple(three), "chat-0"): 1, (tuple(three), "chat-4"): 0,
              (tuple(three), "chat-9"): 2, (tuple(three), "faq-3"): 0,
              (tuple(two), "chat-0"): 1, (tuple(two), "chat-13"): 0,
              (tuple(two), "faq-0"): 0, (tuple(two), "faq-8"): 1}
    for (urls, session), want in logged.items():
        assert HashRing(urls).owner(session_key(session)) == want, (urls, session)
