"""The deployed client's worker: the model loaded once, the client's state on disk between requests.

The node loop (node.py) hands it each coordinator request in the same process. It serves it with the
same ``ClientHandler`` the simulations use and keeps the client's persistent state on disk, per run
(the coordinator names its run in every message; a resumed run keeps its id), one file per round it
trained in. A request for round r starts from the newest state saved before r, so a round the
coordinator repeats after a crash replays exactly what it did the first time; an evaluation in
round r sees the state that round's training left. What no repeated round may roll back (the
durable owner, ``core.types.DURABLE``) is kept beside those files and handed with each of them.

A payload larger than one Flower message (``fedtune.runtime.flower_wire``) reaches the worker piece by
piece (``PieceExchanges.piece``), each into its place in the request; the piece that completes it
runs the request, and a large reply is handed out piece by piece (``fetch``) in the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.runtime import flower_wire as wire

if TYPE_CHECKING:
    from fedtune.core.types import ClientState

log = logging.getLogger("fedtune")

KEEP_STATES = 3  # a repeated round needs the state before it; keep a margin
KEEP_RUNS = 3  # the state of this many most recent runs is kept; older runs' is deleted
MAX_REQUEST_BYTES = 2**40  # a pieced request may declare at most this (its pages are taken as pieces arrive)
MAX_OPEN_EXCHANGES = 4  # pieced exchanges held at once; the oldest goes first (one per client id)


class _Exchange:
    """One pieced exchange at the worker: its request being put together, then its reply being fetched."""

    def __init__(self, client_id: int, run: str, piece_bytes: int, request: wire.Assembly | None):
        self.client_id, self.run, self.piece_bytes, self.request = client_id, run, piece_bytes, request
        self.reply: bytes | None = None
        self.answer: dict = {}  # the meta the reply's first piece goes with
        self.fetched: set[int] = set()


class PieceExchanges:
    """The worker's side of pieced exchanges (ops "piece" and "fetch"); ``handle`` serves a whole request.

    Whatever a message says is checked: sizes, indices and the request's sha256 (``wire.Assembly``).
    A piece sent again after its request was answered gets the same answer; a finished reply is
    dropped once its last piece is fetched, an unfinished exchange when its client starts another.
    """

    def __init__(self, handle: Callable[[int, str, bytes], bytes], max_request_bytes: int = MAX_REQUEST_BYTES):
        """``handle(client id, run, request)``: the reply to a whole request."""
        self.handle, self.max_request_bytes = handle, max_request_bytes
        self.open: dict[str, _Exchange] = {}  # exchange id -> exchange, oldest first

    def piece(self, client_id: int, info: dict, data: bytes) -> tuple[dict, bytes | memoryview]:
        """Take request piece info[PIECE] (the whole request if info has no TOTAL): (answer meta, answer bytes)."""
        eid, size = self._id(info), wire.checked_piece_bytes(info.get(wire.PIECE_SIZE))
        run = wire.checked_run(info.get(wire.RUN))
        x = self.open.get(eid)
        if x is not None:
            if x.client_id != client_id or x.piece_bytes != size or x.run != run:
                raise ValueError(f"exchange {eid} is client {x.client_id}'s, with {x.piece_bytes}-byte pieces")
            if x.reply is not None:  # answered already: this piece came twice
                return x.answer, memoryview(x.reply)[:size]
        if wire.TOTAL not in info:  # the whole request in one message
            if len(data) > size:
                raise ValueError(f"a single-message request of {len(data):,} bytes exceeds its {size:,}-byte pieces")
            return self._answer(eid, client_id, run, size, data)
        if x is None:
            request = wire.Assembly(info[wire.TOTAL], size, info.get(wire.SHA256), self.max_request_bytes)
            x = self._begin(eid, _Exchange(client_id, run, size, request))
        if x.request is None or (info[wire.TOTAL], info.get(wire.SHA256)) != (x.request.total, x.request.sha256):
            raise ValueError(f"exchange {eid}: the piece does not belong to the request being put together")
        x.request.add(info.get(wire.PIECE), data)
        if not x.request.complete:
            return {wire.HAVE: len(x.request.have)}, b""
        try:
            request = x.request.result()
        except ValueError:  # the pieces do not make the declared request: the exchange is over
            del self.open[eid]
            raise
        return self._answer(eid, client_id, run, size, request)

    def _answer(self, eid: str, client_id: int, run: str, size: int, request: bytes) -> tuple[dict, bytes | memoryview]:
        """Serve a whole request: the reply whole if it fits in a piece, else its first piece (the rest kept)."""
        try:
            reply = self.handle(client_id, run, request)
        except Exception:
            self.open.pop(eid, None)
            raise
        if len(reply) <= size:
            self.open.pop(eid, None)
            return {}, reply
        x = self.open.get(eid) or self._begin(eid, _Exchange(client_id, run, size, None))
        x.request, x.reply = None, reply
        x.answer = {wire.REPLY_TOTAL: len(reply), wire.REPLY_SHA256: hashlib.sha256(reply).hexdigest()}
        return x.answer, memoryview(reply)[:size]

    def fetch(self, client_id: int, info: dict) -> tuple[dict, memoryview]:
        """Reply piece info[FETCH] of a request this worker answered: (answer meta, the piece)."""
        eid = self._id(info)
        x = self.open.get(eid)
        if x is None or x.reply is None or x.client_id != client_id:
            raise ValueError(f"no reply of client {client_id} waits under exchange {eid}")
        count = wire.piece_count(len(x.reply), x.piece_bytes)
        index = wire.checked_int(info.get(wire.FETCH), 1, count - 1, "a reply piece index")
        start, end = wire.piece_span(index, len(x.reply), x.piece_bytes)
        piece = memoryview(x.reply)[start:end]
        x.fetched.add(index)
        if len(x.fetched) == count - 1:  # every piece handed out: the reply goes
            del self.open[eid]
        return {wire.PIECE: index}, piece

    def _begin(self, eid: str, x: _Exchange) -> _Exchange:
        for old in [k for k, o in self.open.items() if o.client_id == x.client_id]:
            log.info("client %d started another exchange: dropped unfinished exchange %s", x.client_id, old)
            del self.open[old]
        while len(self.open) >= MAX_OPEN_EXCHANGES:
            del self.open[next(iter(self.open))]
        self.open[eid] = x
        return x

    @staticmethod
    def _id(info: dict) -> str:
        eid = info.get(wire.EXCHANGE)
        if not isinstance(eid, str) or not 0 < len(eid) <= 100:
            raise ValueError(f"not an exchange id: {str(eid)[:40]!r}")
        return eid


class StateStore:
    """A client's persistent state in one run, versioned by the round that produced it; its durable part
    (``DURABLE``) in one file beside them, the newest, handed with every version."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.last: tuple[int, ClientState] | None = None  # the version this store saved last, kept in memory

    def _rounds(self) -> list[int]:
        found = (re.fullmatch(r"round-(\d+)\.safetensors", p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def before(self, round_index: int) -> ClientState:
        """The state saved by the newest round before ``round_index`` ({} if none)."""
        from safetensors.torch import load_file

        from fedtune.core.types import DURABLE, unflatten_state

        earlier = [r for r in self._rounds() if r < round_index]
        if earlier and self.last is not None and self.last[0] == earlier[-1]:
            return dict(self.last[1])  # what it saved last, read back from memory
        state = unflatten_state(load_file(self.folder / f"round-{earlier[-1]:06d}.safetensors")) if earlier else {}
        durable = self.folder / "durable.safetensors"
        if durable.is_file():
            state[DURABLE] = unflatten_state(load_file(durable)).get(DURABLE, {})
        return state

    def within(self, round_index: int) -> ClientState:
        """The state saved by round ``round_index`` so far, else by the newest round before it ({} if none):
        what a request that continues its round (split learning's later exchanges) goes on from."""
        return self.before(round_index + 1)

    def save(self, round_index: int, state: ClientState) -> None:
        from fedtune.core.types import DURABLE

        if DURABLE in state:  # first: a round's state never goes ahead of what it must not forget
            self._write("durable", {DURABLE: state[DURABLE]})
        self._write(f"round-{round_index:06d}", {k: v for k, v in state.items() if k != DURABLE})
        # what before() would read back: the round's file and the newest durable part (none, or this one)
        newest = DURABLE in state or not (self.folder / "durable.safetensors").is_file()
        self.last = (round_index, dict(state)) if newest else None
        for old in self._rounds()[:-KEEP_STATES]:
            (self.folder / f"round-{old:06d}.safetensors").unlink(missing_ok=True)

    def _write(self, name: str, state: ClientState) -> None:
        from safetensors.torch import save_file

        from fedtune.core.types import flatten_state

        tmp = self.folder / f".{name}.tmp"
        save_file({k: v.contiguous() for k, v in flatten_state(state).items()}, tmp)
        os.replace(tmp, self.folder / f"{name}.safetensors")


class LocalWorker:
    """Serves requests for whatever client id the coordinator assigned this participant."""

    def __init__(self, cfg, examples: list, state_dir: Path):
        from fedtune.assembly import client_workbench, federation_eval_set, make_handler, plan_of

        self.cfg, self.examples, self.state_dir = cfg, examples, state_dir
        plan = plan_of(cfg)
        self.bench = client_workbench(cfg, plan, announce=True)
        self.handler = make_handler(plan, self.bench, {}, federation_eval_set(cfg, self.bench.encoder))
        self.lock = threading.Lock()
        self.pieces = PieceExchanges(self.serve_one)
        self.stores: dict[tuple[str, int], StateStore] = {}  # (run, client id) -> its store, this run's only

    def store(self, run: str, client_id: int) -> StateStore:
        """Client ``client_id``'s state in run ``run``; the state of all but the KEEP_RUNS most recent runs goes."""
        folder = self.state_dir / f"run-{wire.checked_run(run)}"
        fresh = not folder.exists()
        if (run, client_id) not in self.stores:
            self.stores = {k: v for k, v in self.stores.items() if k[0] == run}  # one run's at a time
            self.stores[run, client_id] = StateStore(folder / f"client-{client_id}")
        store = self.stores[run, client_id]
        os.utime(folder)  # most recently used
        if fresh:
            runs = sorted(self.state_dir.glob("run-*"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in runs[KEEP_RUNS:]:
                log.info("deleting the state of an earlier run: %s", old.name)
                shutil.rmtree(old, ignore_errors=True)
        return store

    def serve_one(self, client_id: int, run: str, payload: bytes) -> bytes:
        from fedtune.assembly import local_client_data
        from fedtune.wire.protocol import ReplyFacts, RequestFacts
        from fedtune.wire.serialize import read_header

        with self.lock:
            if client_id not in self.handler.data:
                self.handler.data[client_id] = local_client_data(self.examples, self.bench.encoder, self.cfg, client_id)
            asked = RequestFacts.of(read_header(payload))
            store = self.store(run, client_id)
            log.info("round %d: %s request for client %d", asked.round, asked.kind, client_id)
            evaluating = self.handler.reads_only(asked.kind)  # reads the state after this round's training
            # a request that continues its round (split learning, secure aggregation) goes on from what that round
            # saved; any other starts from the state before its round, so that a round the coordinator repeats
            # replays exactly
            within = evaluating or asked.continues
            reply, state = self.handler.handle(
                client_id, payload, store.within(asked.round) if within else store.before(asked.round)
            )
            if not evaluating and (state or within):  # a round may also give up what it kept (state {})
                store.save(asked.round, state)
            done = ReplyFacts.of(read_header(reply))  # the fields to log, without loading the reply's tensors
            if done.steps is not None:
                log.info(
                    "round %d: trained as client %d: %d steps%s, %.1fs, %d bytes up",
                    asked.round,
                    client_id,
                    done.steps,
                    f", loss {done.train_loss:.4f}" if done.train_loss is not None else "",
                    done.local_train_s or 0.0,
                    len(reply),
                )
            else:
                log.info("round %d: served a %s request as client %d", asked.round, asked.kind, client_id)
            return reply
