"""A client's end of the direct channel: take the coordinator's next message over TLS, answer it, repeat.

The coordinator says where its channel listens beside the messages it sends through Flower
(``direct_wire.PORT``); the client then opens it to the same host as the SuperLink, verifies the
coordinator's certificate against the federation's CA, and signs every request with its enrolment
key. Each take is held open by the coordinator until a message is queued for this client, so a
round's exchanges cost one request each way on a warm connection. The client still listens on
nothing. Where the channel cannot be opened (a firewall, an older coordinator) the client keeps
answering through Flower, which the coordinator then uses.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from fedtune.core.errors import untrusted_text
from fedtune.runtime import direct_wire as dw
from fedtune.runtime import flower_wire as wire
from fedtune.runtime.direct_hub import TAKE_S
from fedtune.runtime.flower_grid import brief

log = logging.getLogger("fedtune")

RETRY_S = (1.0, 2.0, 5.0)  # waits after the channel fails (the last repeats)
REFUSED_S = 30.0  # wait after the coordinator refuses this client's signature (a clock far off, say)
MAX_FRAME = wire.MAX_PIECE_BYTES + dw.META_MAX + 16  # the largest message taken (a larger one comes in pieces)

# (meta, payload) -> the reply's (meta, payload); a request it cannot serve is answered with direct_wire.ERROR
Answer = Callable[[dict, bytes], tuple[dict, bytes]]


class DirectLink:
    """Requests to one coordinator's channel, each signed with this client's key."""

    def __init__(self, host: str, port: int, ca: Path, private_key, public_key):
        context = ssl.create_default_context(cafile=str(ca))
        host = f"[{host}]" if ":" in host else host
        self.base = f"https://{host}:{port}"
        self.client = httpx.Client(verify=context, timeout=httpx.Timeout(TAKE_S + 30.0, connect=5.0))
        self.key, self.der = private_key, dw.public_der(public_key)
        self.port = port

    def _post(self, path: str, body: bytes) -> httpx.Response:
        headers = dw.sign(self.key, self.der, "POST", path, body)
        with self.client.stream("POST", self.base + path, content=body, headers=headers) as res:
            if res.status_code == 204:
                return res
            declared = res.headers.get("content-length", "")
            limit = MAX_FRAME if res.status_code == 200 else 2**16
            if not declared.isdigit() or int(declared) > limit:
                raise ValueError(f"an answer of {declared[:20] or 'undeclared'} bytes (at most {limit:,})")
            res.read()
            return res

    def take(self) -> tuple[dict, bytes] | None:
        """The next message for this client, or None when none came while the coordinator held the ask open."""
        res = self._post("/take", b"")
        if res.status_code == 204:
            return None
        res.raise_for_status()
        return dw.decode(res.content)

    def reply(self, msg_id: str, meta: dict, payload: bytes) -> None:
        res = self._post("/reply", dw.encode({**meta, dw.REPLY_TO: msg_id}, payload))
        if res.status_code not in (204, 409):  # 409: that exchange is over (a deadline passed)
            res.raise_for_status()

    def close(self) -> None:
        self.client.close()


class DirectLoop:
    """The thread that serves the channel at the port the coordinator last named, while the node runs."""

    def __init__(self, host: str, ca: Path, private_key, public_key, answer: Answer, stop: threading.Event):
        self.host, self.ca, self.keys = host, ca, (private_key, public_key)
        self.answer, self.stop = answer, stop
        self.link: DirectLink | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.answered_at = -1e9  # monotonic time of the last take the coordinator answered

    @property
    def open(self) -> bool:
        """Whether the coordinator answered a take lately: its messages come this way, not through Flower."""
        return time.monotonic() - self.answered_at < TAKE_S + 5.0

    def follow(self, port: object) -> None:
        """Serve the channel at ``port`` (as a coordinator's message says: untrusted), unless already there."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            return
        with self.lock:
            if self.link is not None and self.link.port == port and self.thread is not None and self.thread.is_alive():
                return
            old, self.link = self.link, DirectLink(self.host, port, self.ca, *self.keys)
            if old is not None:
                old.close()
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="fedtune-direct", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        failures, opened = 0, None
        while not self.stop.is_set():
            link = self.link
            if link is None:
                return
            try:
                got = link.take()
                failures, self.answered_at = 0, time.monotonic()
                if opened is not link:
                    log.info("answering over the coordinator's direct channel (port %d)", link.port)
                    opened = link
                if got is not None:
                    self._answer(link, *got)
            except httpx.HTTPStatusError as exc:
                wait = REFUSED_S if exc.response.status_code == 401 else RETRY_S[-1]
                said = untrusted_text(exc.response.text[:200])
                log.warning("the coordinator's direct channel refused this client (%s: %s)", brief(exc), said)
                self.stop.wait(wait)
            except Exception as exc:  # transport trouble or a malformed message: Flower still serves
                if self.stop.is_set() or link is not self.link:
                    continue  # closed on purpose
                wait = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.warning("direct channel to the coordinator lost (%s); again in %.0fs", brief(exc), wait)
                self.stop.wait(wait)

    def _answer(self, link: DirectLink, meta: dict, payload: bytes) -> None:
        msg_id = meta.pop(dw.ID, None)
        if not isinstance(msg_id, str):
            raise ValueError("a message without its id")
        reply_meta, reply = self.answer(meta, payload)
        link.reply(msg_id, reply_meta, reply)

    def close(self) -> None:
        with self.lock:
            if self.link is not None:
                self.link.close()
            self.link = None
