"""The coordinator's end of the direct channel: enrolled clients take their messages and answer over TLS.

Flower admits clients, starts the run and reaches a client the channel does not (yet) reach; once a
client has opened the channel (it learns the port beside its first Flower message), a round's
exchanges with it go here instead: the client asks for its next message (``POST /take``, held open up
to ``TAKE_S`` until one is queued for it) and sends each reply (``POST /reply``), in frames
(``direct_wire``). Nothing is polled, so an exchange costs a request and a response on a warm
connection instead of about eighteen SuperLink requests and the waits between asks.

Every request must be signed by an enrolled client's key (``direct_wire.verify``): a request that is
not is refused before its body is read, bodies are read up to ``max_frame`` bytes only, and a reply
counts only for a message that was sent to the client that signed it and not yet answered. A frame
from an enrolled client that is not well formed fails that client's outstanding exchanges at once
with the reason, as a hostile Flower reply does; it never reaches the round loop as a reply.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from fedtune.runtime import direct_wire as dw

log = logging.getLogger("fedtune")

TAKE_S = 5.0  # how long a take is held open when nothing is queued for its client
RECENT_S = 5.0  # a client asked within this long counts as connected (it may be computing its reply)
MAX_TAKES = 2  # takes one client may hold open at once (one, and its next while the first times out)
START_S = 10.0  # how long the channel's server may take to start listening


@dataclass(eq=False)
class _Sent:
    name: str
    frame: tuple[bytes, bytes] | None  # (head, payload); let go once taken. The payload is not copied: a
    # request sent to many clients is one bytes object however many frames queue it
    taken: bool = False
    reply: tuple[dict, bytes] | None = None
    failed: str | None = None


class Hub:
    """Messages queued per enrolled client name, their replies, and the TLS server clients reach them by."""

    def __init__(self, keys: dict[bytes, tuple[str, object]], max_frame: int, take_s: float = TAKE_S):
        """``keys``: enrolled public keys (DER) -> (name, key); ``max_frame``: the largest reply frame read;
        ``take_s``: how long a take is held open."""
        self.keys, self.max_frame, self.take_s = keys, max_frame, take_s
        self.replays = dw.Replays()
        self.lock = threading.Lock()
        self.answered = threading.Condition(self.lock)  # a reply (or a failure) came
        self.queues: dict[str, deque[str]] = defaultdict(deque)
        self.sent: dict[str, _Sent] = {}
        self.takers: dict[str, int] = defaultdict(int)  # takes open now, per name
        self.seen: dict[str, float] = {}  # name -> monotonic time of its last authenticated request
        self.wakers: dict[str, asyncio.Event] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = None
        self.port = 0

    # ---- the round loop's side (any thread)

    def connected(self, name: str) -> bool:
        with self.lock:
            return self.takers[name] > 0 or time.monotonic() - self.seen.get(name, -1e9) < RECENT_S

    def put(self, name: str, meta: dict, payload: bytes) -> str:
        """Queue a message for ``name``; its id."""
        msg_id = secrets.token_hex(16)
        frame = (dw.head({**meta, dw.ID: msg_id}), payload)
        with self.lock:
            self.sent[msg_id] = _Sent(name, frame)
            self.queues[name].append(msg_id)
        self._wake(name)
        return msg_id

    def collect(self, ids) -> list[tuple[str, str, tuple[dict, bytes] | None, str | None]]:
        """(id, name, (meta, payload) or None, failure or None) for each of ``ids`` answered or failed; they
        are forgotten."""
        out = []
        with self.lock:
            for msg_id in ids:
                s = self.sent.get(msg_id)
                if s is not None and (s.reply is not None or s.failed is not None):
                    del self.sent[msg_id]
                    out.append((msg_id, s.name, s.reply, s.failed))
        return out

    def forget(self, ids) -> None:
        with self.lock:
            for msg_id in ids:
                s = self.sent.pop(msg_id, None)
                if s is not None and msg_id in self.queues[s.name]:
                    self.queues[s.name].remove(msg_id)

    def wait(self, timeout: float) -> None:
        """Return when a reply comes, or after ``timeout`` s."""
        with self.answered:
            self.answered.wait(timeout)

    # ---- the server

    def start(self, host: str, port: int, certfile: Path, keyfile: Path) -> int:
        """Listen on ``host:port`` (0: any free port) with TLS in a daemon thread; the port bound. OSError if it
        cannot be bound."""
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family)  # here, so a port in use is an error here
        config = uvicorn.Config(
            self.app(),
            ssl_certfile=str(certfile),
            ssl_keyfile=str(keyfile),
            log_level="warning",
            access_log=False,
            lifespan="off",
            limit_concurrency=(MAX_TAKES + 2) * len(self.keys) + 16,  # takes, replies, and a few strangers refused
            timeout_keep_alive=int(TAKE_S) + 30,
        )
        self.server = uvicorn.Server(config)
        thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="fedtune-direct")
        thread.daemon = True
        thread.start()
        until = time.monotonic() + START_S
        while not self.server.started:
            if time.monotonic() > until or not thread.is_alive():
                sock.close()
                raise RuntimeError(f"the direct channel could not start on {host}:{port}")
            time.sleep(0.01)
        self.port = int(sock.getsockname()[1])
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(
            routes=[Route("/take", self._take, methods=["POST"]), Route("/reply", self._reply, methods=["POST"])]
        )

    async def _take(self, request):
        from starlette.responses import PlainTextResponse, Response

        name, refused = await self._authenticated(request, "/take", 0)
        if refused is not None:
            return refused
        self.loop = asyncio.get_running_loop()
        waker = self.wakers.setdefault(name, asyncio.Event())
        with self.lock:
            if self.takers[name] >= MAX_TAKES:  # a client holds one open; more only crowd out the others
                return PlainTextResponse(f"at most {MAX_TAKES} takes open per client", status_code=429)
            self.takers[name] += 1
        try:
            until = self.loop.time() + self.take_s
            while True:
                waker.clear()
                frame = self._next(name)
                if frame is not None:
                    return _frame_response(*frame)
                left = until - self.loop.time()
                if left <= 0:
                    return Response(status_code=204)
                try:
                    await asyncio.wait_for(waker.wait(), left)
                except TimeoutError:
                    return Response(status_code=204)
        finally:
            with self.lock:
                self.takers[name] -= 1
                self.seen[name] = time.monotonic()

    def _next(self, name: str) -> tuple[bytes, bytes] | None:
        with self.lock:
            queue = self.queues[name]
            while queue:
                s = self.sent.get(queue.popleft())
                if s is not None and s.frame is not None:
                    frame, s.frame, s.taken = s.frame, None, True
                    return frame
        return None

    async def _reply(self, request):
        from starlette.responses import PlainTextResponse, Response

        name, refused = await self._authenticated(request, "/reply", self.max_frame)
        if refused is not None:
            return refused
        body = request.state.body
        try:
            meta, payload = dw.decode(body)
            msg_id = meta.pop(dw.REPLY_TO)
            error = meta.pop(dw.ERROR, None)
        except (ValueError, KeyError) as exc:
            self._fail(name, f"sent an unreadable direct reply ({str(exc)[:200]})")
            return PlainTextResponse("not a well-formed reply frame", status_code=400)
        with self.lock:
            s = self.sent.get(msg_id) if isinstance(msg_id, str) else None
            if s is None or s.name != name or not s.taken or s.reply is not None or s.failed is not None:
                return PlainTextResponse("no such message awaits this client's reply", status_code=409)
            if error is not None:
                s.failed = f"failed: {str(error)[:400]}"
            else:
                s.reply = (meta, payload)
            self.answered.notify_all()
        return Response(status_code=204)

    def _fail(self, name: str, why: str) -> None:
        """Every message ``name`` took and has not answered fails with ``why``."""
        with self.lock:
            for s in self.sent.values():
                if s.name == name and s.taken and s.reply is None and s.failed is None:
                    s.failed = why
            self.answered.notify_all()

    async def _authenticated(self, request, path: str, limit: int):
        """(name, None) for a request signed by an enrolled key, its body (at most ``limit`` bytes) in
        ``request.state.body``; else (None, the refusal)."""
        from starlette.responses import PlainTextResponse

        try:
            dw.checked_headers(request.headers, self.keys)  # before a byte of the body is read
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return None, PlainTextResponse(f"a body of at most {limit:,} bytes", status_code=413)
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None, PlainTextResponse(f"a body of at most {limit:,} bytes", status_code=413)
                chunks.append(chunk)
            body = b"".join(chunks)
            name = dw.verify(request.headers, "POST", path, body, self.keys, self.replays)
        except dw.Unauthorized as exc:
            return None, PlainTextResponse(str(exc), status_code=401)
        request.state.body = body
        with self.lock:
            self.seen[name] = time.monotonic()
        return name, None

    def _wake(self, name: str) -> None:
        waker, loop = self.wakers.get(name), self.loop
        if waker is not None and loop is not None:
            loop.call_soon_threadsafe(waker.set)


def _frame_response(head: bytes, payload: bytes):
    """A frame as a response, its payload written after its head in 1 MiB slices instead of joined to it."""
    from starlette.responses import StreamingResponse

    async def parts():
        yield head
        view = memoryview(payload)
        for start in range(0, len(view), 2**20):
            yield view[start : start + 2**20]

    size = str(len(head) + len(payload))
    return StreamingResponse(parts(), media_type="application/octet-stream", headers={"content-length": size})


def enrolled_keys(folder: Path) -> dict[bytes, tuple[str, object]]:
    """Public key (DER) -> (name, key) for each NAME.pub in ``folder`` (OpenSSH public keys)."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    keys = {}
    for path in sorted(folder.glob("*.pub")):
        key = load_ssh_public_key(path.read_bytes())
        keys[dw.public_der(key)] = (path.stem, key)
    return keys
