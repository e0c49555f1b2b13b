"""A real loopback OpenAI-compatible server (`rlxf serve`'s handler) that injects faults on a deterministic schedule.

Request n (counted over all POSTs, from 0) gets action `pattern[n % len(pattern)]` until `max_faults` faults have
been injected; after that every request is served normally. Actions:
    "ok"        serve normally
    "500"       HTTP 500 with an OpenAI-style error body
    "429"       HTTP 429 with Retry-After: 0
    "timeout"   sleep `sleep_s` (past the client's time-out), then close without answering
    "malformed" HTTP 200 with a truncated JSON body
    "wrong"     HTTP 200 with valid JSON of the wrong shape ({"choices": []})
    "drop"      close the connection without any response
    "slow"      sleep `slow_s`, then serve normally (not a fault: used to stall a client so it can be killed)
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence

from rlxf.backends.serve import OpenAIHandler, ServeEngine, start_server

FAULTS = ("500", "429", "timeout", "malformed", "wrong", "drop")


class FaultSchedule:
    def __init__(
        self, pattern: Sequence[str], max_faults: int | None = None, sleep_s: float = 2.0, slow_s: float = 0.0
    ):
        unknown = set(pattern) - set(FAULTS) - {"ok", "slow"}
        if unknown:
            raise ValueError(f"unknown fault actions {sorted(unknown)}")
        self.pattern, self.max_faults, self.sleep_s, self.slow_s = list(pattern), max_faults, sleep_s, slow_s
        self.lock = threading.Lock()
        self.requests = 0
        self.injected: Counter[str] = Counter()

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    def next(self) -> str:
        with self.lock:
            action = self.pattern[self.requests % len(self.pattern)]
            self.requests += 1
            if action in FAULTS:
                if self.max_faults is not None and self.faults >= self.max_faults:
                    return "ok"
                self.injected[action] += 1
            return action


class FaultHandler(OpenAIHandler):
    def do_POST(self) -> None:  # noqa: N802
        schedule: FaultSchedule = self.server.schedule  # type: ignore[attr-defined]
        action = schedule.next()
        if action == "ok":
            return super().do_POST()
        if action == "slow":
            time.sleep(schedule.slow_s)
            return super().do_POST()
        self.read_body()
        if action == "500":
            self.send_error_json(500, "injected server error", kind="server_error")
        elif action == "429":
            self.send_json(429, {"error": {"message": "injected rate limit", "code": 429}}, {"Retry-After": "0"})
        elif action == "timeout":
            time.sleep(schedule.sleep_s)
            self.close_connection = True
        elif action == "malformed":
            data = b'{"choices": [{"text": "1", "logprobs": {"top_logpro'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif action == "wrong":
            self.send_json(200, {"choices": []})
        elif action == "drop":
            self.close_connection = True


def start_fault_server(engine: ServeEngine, schedule: FaultSchedule):
    """(server, thread, base URL) of a fault-injecting server over `engine`; `server.schedule` is the schedule."""
    server, thread, url = start_server(engine=engine, handler=FaultHandler)
    server.schedule = schedule  # type: ignore[attr-defined]
    return server, thread, url
