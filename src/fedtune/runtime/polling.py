"""How soon to ask again for a message that has not come: short waits while a conversation is under way.

Both ends of a deployment ask the SuperLink (Flower has no push to a client): the coordinator for
replies, each client for requests. A fixed wait puts that wait into every exchange; a short one
spends the SuperLink's time while nothing happens. ``Poll`` starts at ``first`` after each message
and doubles up to ``busy``; after ``busy_for_s`` without a message it doubles on up to ``idle``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

FIRST_S = 0.005  # the first wait after a message: nothing can answer faster than a SuperLink round trip or two
AUTO_S = 0.02  # auto's longest wait while busy, for a coordinator (one asker) or a small federation's clients
PER_CLIENT_S = 0.015  # auto's longest wait per client: an empty ask costs a SuperLink 7-9 ms of its one core
# first and longest wait for a message's content still on its way to the SuperLink (a message is listed before
# its sender has pushed all of it; Flower's own default waits 1 s, then 2, 4, ...), at both ends
OBJECT_WAIT_S = (0.002, 0.1)


@dataclass
class Poll:
    first: float = FIRST_S
    busy: float = AUTO_S
    idle: float = 1.0
    busy_for_s: float = 60.0
    _wait: float = field(default=0.0, init=False)
    _last: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.busy <= self.idle:
            raise ValueError(
                f"poll waits must satisfy 0 < first <= busy <= idle, got {self.first}, {self.busy}, {self.idle}"
            )
        self._wait = self.first

    @classmethod
    def up_to(cls, busy: float, first: float = FIRST_S) -> Poll:
        """Waits of at most ``busy`` while busy (starting at ``first``, or ``busy`` if less); when idle, up to
        1 s or 10 x ``busy``, whichever is more."""
        return cls(first=min(first, busy), busy=busy, idle=max(1.0, 10 * busy))

    @classmethod
    def of(cls, poll_s: float | str, clients: int) -> Poll:
        """``runtime.flower.poll_s`` for a federation of ``clients``: auto is 20 ms, or 15 ms per client."""
        return cls.up_to(max(AUTO_S, PER_CLIENT_S * clients) if poll_s == "auto" else float(poll_s))

    def got(self) -> None:
        """Something came: the next waits start short again."""
        self._wait, self._last = self.first, time.monotonic()

    def next(self) -> float:
        """How long to wait before asking again (each call after nothing came waits longer, up to the cap)."""
        cap = self.busy if time.monotonic() - self._last < self.busy_for_s else self.idle
        wait = min(self._wait, cap)
        self._wait = min(self._wait * 2, self.idle)
        return wait
