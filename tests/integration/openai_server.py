"""A loopback OpenAI-compatible chat server for tests: records every request, answers by a rule.

`reply(request)` returns the assistant text to send, or one of the failure actions: `FAIL` answers
HTTP 500, `HANG` sleeps past the client's timeout before answering.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAIL = object()
HANG = object()
HANG_SECONDS = 5.0


class ChatServer:
    """Serves POST <base>/chat/completions on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, reply: Callable[[dict], object]):
        self.reply = reply
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str, model: str) -> dict:
    """An OpenAI chat.completion body with one assistant message."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _handler(server: ChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with server.lock:
                server.requests.append(body)
            action = server.reply(body)
            if action is HANG:
                time.sleep(HANG_SECONDS)
            if action is FAIL or action is HANG:
                self._send(500, {"error": {"message": "test server error", "type": "server_error"}})
                return
            self._send(200, completion(str(action), body.get("model", "test")))

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def log_message(self, *args) -> None:  # quiet
            return None

    return Handler
