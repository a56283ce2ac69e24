import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.privacy.secagg import (
    PRIME,
    ClientRound,
    FixedPoint,
    SecAggError,
    shamir_join,
    shamir_split,
    unmask_sum,
)


@given(st.integers(0, 2**256 - 1), st.integers(1, 6), st.integers(0, 6))
@settings(max_examples=30, deadline=None)
def test_any_threshold_shares_rebuild_the_secret_and_fewer_do_not(secret, threshold, extra):
    shares = shamir_split(secret, range(1, threshold + extra + 1), threshold)
    assert shamir_join(dict(list(shares.items())[-threshold:]), threshold) == secret
    if threshold > 1:
        fewer = dict(list(shares.items())[: threshold - 1])
        guess = shamir_join({**fewer, PRIME - 1: 12345}, threshold)  # a made-up share in place of a real one
        assert guess != secret
        with pytest.raises(SecAggError):
            shamir_join(fewer, threshold)


def test_fixed_point_sums_decode_within_the_rounding_and_report_clipping():
    fp = FixedPoint.fit(1.0, 16, clients=64)
    assert fp.modulus_bits == 32
    xs = [torch.rand(1000) * 2 - 1 for _ in range(64)]
    total = torch.zeros(1000, dtype=torch.int64)
    for x in xs:
        q, clipped = fp.encode(x)
        assert clipped == 0 and int(q.min()) >= 0 and int(q.max()) < 2**32
        total = fp.add(total, q)
    exact = torch.stack(xs).double().sum(0)
    assert (fp.decode(total).double() - exact).abs().max() <= 64 * 2**-17 + 1e-6  # half a step per client
    q, clipped = fp.encode(torch.tensor([0.5, 3.0, -7.0, float("nan")]))
    assert clipped == 3 and fp.decode(q).tolist() == [0.5, 1.0, -1.0, 0.0]
    assert FixedPoint.fit(1.0, 24, clients=1024).modulus_bits == 36
    with pytest.raises(ValueError, match="62"):
        FixedPoint.fit(1e6, 40, clients=1000)


def _protocol(xs: dict[int, torch.Tensor], threshold: int, drop_before_input=(), drop_before_unmask=(), r=3):
    """Every step of a round, in memory, as the server would run it; returns (sum, masked inputs seen)."""
    fp = FixedPoint.fit(1.0, 16, clients=len(xs))
    rounds = {u: ClientRound.fresh(u, r) for u in xs}
    rounds = {u: ClientRound.from_bytes(cr.to_bytes()) for u, cr in rounds.items()}  # kept in client state
    roster = {u: cr.public_keys() for u, cr in rounds.items()}
    sent = {u: cr.share_keys(roster, threshold) for u, cr in rounds.items()}
    inbox = {v: {u: sent[u][v] for u in sent} for v in roster}
    u2 = [u for u in rounds if u not in drop_before_input]
    masked = {u: rounds[u].masked_input(fp.encode(xs[u])[0], roster, fp) for u in u2}
    u3 = u2  # their masked inputs arrived: the sum is theirs
    total = torch.zeros_like(next(iter(masked.values())))
    for u in u3:
        total = fp.add(total, masked[u])
    dropped = [u for u in roster if u not in u3]
    revealers = [u for u in u3 if u not in drop_before_unmask]  # gone after masking: others reveal for them
    revealed = {u: rounds[u].unmask(inbox[u], roster, u3, dropped) for u in revealers}
    return fp.decode(unmask_sum(total, roster, u3, dropped, revealed, threshold, r, fp)), masked, fp


def test_the_sum_is_exact_when_clients_drop_before_masking_or_after():
    xs = {u: torch.rand(300) * 2 - 1 for u in range(6)}
    for drop_in, drop_un in [((), ()), ((4,), ()), ((), (1,)), ((0,), (5,))]:
        total, _, fp = _protocol(xs, 3, drop_in, drop_un)
        live = [u for u in xs if u not in drop_in]  # a client gone after masking still counts
        exact = sum(fp.decode(fp.encode(xs[u])[0]).double() for u in live)
        assert torch.allclose(total.double(), exact, atol=1e-6)  # exact up to fixed-point rounding


def test_a_masked_input_alone_tells_the_server_nothing_it_can_decode():
    xs = {u: torch.full((5000,), 0.25) for u in range(4)}
    _, masked, fp = _protocol(xs, 3)
    for u, y in masked.items():
        plain = fp.encode(xs[u])[0]
        assert (y == plain).float().mean() < 0.01  # no coordinate survives the masks
        assert abs(y.double().mean().item() / 2**32 - 0.5) < 0.02  # looks uniform mod 2^32


def test_too_few_revealers_fail_the_round_rather_than_reveal():
    xs = {u: torch.rand(10) for u in range(5)}
    with pytest.raises(SecAggError, match="threshold"):
        _protocol(xs, 4, (), (0, 1))


def test_an_altered_or_misdirected_ciphertext_does_not_open():
    a, b, c = (ClientRound.fresh(u, 1) for u in range(3))
    roster = {u: cr.public_keys() for u, cr in enumerate((a, b, c))}
    to_b = a.share_keys(roster, 2)[1]
    flipped = to_b[:-1] + bytes([to_b[-1] ^ 1])
    assert b.unmask({0: flipped}, roster, [0], []) == {}  # its share is left out, not revealed wrong
    assert c.unmask({0: to_b}, roster, [0], []) == {}  # b's shares sent to c
    assert set(b.unmask({0: to_b}, roster, [0], [])) == {0}
    with pytest.raises(SecAggError, match="both"):
        b.unmask({0: to_b}, roster, [0], [0])
