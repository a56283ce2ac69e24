"""The deployed client's worker: one long-lived process that keeps the model loaded between rounds.

Flower starts a fresh ClientApp process for every message; that process only forwards the payload
here over a local, key-protected socket (``ask_worker``). The worker serves it with the same
``ClientHandler`` the simulations use and keeps the client's persistent state on disk, one file
per round it trained in. A request for round r starts from the newest state saved before r, so a
round the coordinator repeats after a crash replays exactly what it did the first time; an
evaluation in round r sees the state that round's training left.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import untrusted_text

if TYPE_CHECKING:  # Flower runs ask_worker in a fresh process per message: no torch import there
    from fedtune.types import ClientState

log = logging.getLogger("fedtune")

KEEP_STATES = 3  # a repeated round needs the state before it; keep a margin
IDLE_TIMEOUT_S = 30.0  # a local peer that stops sending or reading mid-exchange is cut off after this


def worker_secret(folder: str) -> tuple[str, bytes]:
    """A fresh key for the worker's socket, written to folder/worker.key created owner-only (0600):
    the ClientApp reads it there, so it never appears on a command line (visible to every user in ps)."""
    path, secret = os.path.join(folder, "worker.key"), os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return path, secret


def ask_worker(address: str, key: bytes, client_id: int, payload: bytes) -> bytes:
    """Send one request to the worker at ``address``; its reply, or RuntimeError with the worker's error."""
    with Client(address, family="AF_UNIX", authkey=key) as conn:
        conn.send(("serve", client_id))
        conn.send_bytes(payload)
        status, detail = conn.recv()
        if status != "ok":
            raise RuntimeError(f"fedtune client worker: {detail}")
        return conn.recv_bytes()


def serve_socket(
    listener: Listener,
    key: bytes,
    handle: Callable[[int, bytes], bytes],
    stop: threading.Event,
    idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> None:
    """Serve ``ask_worker`` requests one at a time until ``stop``: authenticate each connection with
    ``key`` (``listener`` is made without an authkey, so the handshake runs here), read (client id,
    payload), reply with ``handle``'s bytes or its error. A peer silent for ``idle_timeout_s`` while
    it should be sending (or reading) is cut off, so no connection can stall the worker."""
    while not stop.is_set():
        try:
            conn = listener.accept()
        except OSError:
            if stop.is_set():
                return
            raise
        with conn:
            try:
                _limit_idle(conn, idle_timeout_s)
                deliver_challenge(conn, key)
                answer_challenge(conn, key)
                _op, client_id = conn.recv()  # unpickled only after the peer proved it holds the key
                payload = conn.recv_bytes()
            except Exception as exc:  # no key, wrong key, stalled, malformed: refuse it, keep serving
                log.warning("refused a local connection: %s", untrusted_text(repr(exc)))
                continue
            try:
                reply = handle(int(client_id), payload)
            except Exception as exc:
                log.exception("request failed")
                out: tuple = ("error", f"{type(exc).__name__}: {exc}")
            else:
                out = ("ok", None)
            try:
                conn.send(out)
                if out[0] == "ok":
                    conn.send_bytes(reply)
            except OSError as exc:
                log.warning("could not send the reply to the local ClientApp: %s", exc)


def _limit_idle(conn: Connection, seconds: float) -> None:
    """Make every blocking read and write on ``conn`` fail after ``seconds`` without progress."""
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock = socket.socket(fileno=os.dup(conn.fileno()))  # a second handle on the same socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        sock.close()


class StateStore:
    """A client's persistent state, versioned by the round that produced it."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _rounds(self) -> list[int]:
        found = (re.fullmatch(r"round-(\d+)\.safetensors", p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def before(self, round_index: int) -> ClientState:
        """The state saved by the newest round before ``round_index`` ({} if none)."""
        from safetensors.torch import load_file

        from fedtune.types import unflatten_state

        earlier = [r for r in self._rounds() if r < round_index]
        return unflatten_state(load_file(self.folder / f"round-{earlier[-1]:06d}.safetensors")) if earlier else {}

    def save(self, round_index: int, state: ClientState) -> None:
        from safetensors.torch import save_file

        from fedtune.types import flatten_state

        tmp = self.folder / f".round-{round_index:06d}.tmp"
        save_file({k: v.contiguous() for k, v in flatten_state(state).items()}, tmp)
        os.replace(tmp, self.folder / f"round-{round_index:06d}.safetensors")
        for old in self._rounds()[:-KEEP_STATES]:
            (self.folder / f"round-{old:06d}.safetensors").unlink(missing_ok=True)


class LocalWorker:
    """Serves requests for whatever client id the coordinator assigned this participant."""

    def __init__(self, cfg, examples: list, state_dir: Path):
        from fedtune.assembly import build_workbench, federation_eval_set, make_handler

        self.cfg, self.examples, self.state_dir = cfg, examples, state_dir
        self.bench = build_workbench(cfg)
        self.handler = make_handler(cfg, self.bench, {}, federation_eval_set(cfg, self.bench.encoder))
        self.lock = threading.Lock()

    def serve_one(self, client_id: int, payload: bytes) -> bytes:
        from fedtune.assembly import local_client_data
        from fedtune.paradigms.evaluation import EvalRequest
        from fedtune.wire.serialize import read_header

        with self.lock:
            if client_id not in self.handler.data:
                self.handler.data[client_id] = local_client_data(self.examples, self.bench.encoder, self.cfg, client_id)
            header = read_header(payload)
            store = StateStore(self.state_dir / f"client-{client_id}")
            round_index = int(header.get("round", 0))
            log.info("round %d: %s request for client %d", round_index, header.get("kind"), client_id)
            evaluating = header.get("kind") == EvalRequest.KIND  # reads the state after this round's training
            reply, state = self.handler.handle(client_id, payload, store.before(round_index + evaluating))
            if not evaluating and state:
                store.save(round_index, state)
            done = read_header(reply)  # the fields to log, without loading the reply's tensors
            if "steps" in done:
                log.info(
                    "round %d: trained as client %d: %d steps, loss %.4f, %.1fs, %d bytes up",
                    round_index,
                    client_id,
                    done["steps"],
                    done["train_loss"],
                    done["local_train_s"],
                    len(reply),
                )
            else:
                log.info("round %d: served a %s request as client %d", round_index, header.get("kind"), client_id)
            return reply

    def serve_forever(self, listener: Listener, key: bytes, stop: threading.Event) -> None:
        serve_socket(listener, key, self.serve_one, stop)
