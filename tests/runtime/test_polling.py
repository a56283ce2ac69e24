"""How soon either end of a deployment asks the SuperLink again."""

from __future__ import annotations

import pytest

from fedtune.runtime import polling
from fedtune.runtime.polling import Poll


def test_waits_start_short_after_a_message_double_to_the_cap_and_grow_to_idle_after_a_quiet_minute(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(polling.time, "monotonic", lambda: now[0])
    poll = Poll(first=0.002, busy=0.05, idle=1.0, busy_for_s=60)
    poll.got()
    assert [poll.next() for _ in range(7)] == [0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05]
    now[0] = 61.0  # a minute without a message: longer waits, up to idle
    assert [poll.next() for _ in range(5)] == [0.256, 0.512, 1.0, 1.0, 1.0]  # it kept doubling meanwhile
    poll.got()
    assert poll.next() == 0.002


def test_auto_scales_the_clients_wait_with_the_federation_and_a_number_is_taken_as_given():
    assert Poll.of("auto", 1).busy == 0.02 and Poll.of("auto", 3).busy == pytest.approx(0.045)
    assert Poll.of("auto", 100).busy == pytest.approx(1.5) and Poll.of("auto", 100).idle == pytest.approx(15.0)
    assert Poll.of(0.01, 100).busy == 0.01 and Poll.of(0.001, 1).first == 0.001
    with pytest.raises(ValueError, match="first <= busy <= idle"):
        Poll(first=0.1, busy=0.05)


def test_poll_s_must_be_auto_or_seconds():
    from fedtune.config import validate_config

    assert validate_config({"runtime": {"flower": {"poll_s": 0.2}}}, "t").runtime.flower.poll_s == 0.2
    for bad in (0, -1, 11, "soon"):
        with pytest.raises(Exception, match="poll_s"):
            validate_config({"runtime": {"flower": {"poll_s": bad}}}, "t")
