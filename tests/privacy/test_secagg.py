import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.privacy.secagg import (
    PRIME,
    ClientRound,
    FixedPoint,
    SecAggError,
    check_public_key,
    seed_commitment,
    shamir_join,
    shamir_split,
    share_commitment,
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
    dealt = {u: cr.share_keys(roster, threshold) for u, cr in rounds.items()}
    inbox = {v: {u: dealt[u][0][v] for u in dealt} for v in roster}
    for v in roster:  # every ciphertext opens and matches its commitments
        commitments = {u: (dealt[u][1][f"{v}/s"], dealt[u][1][f"{v}/b"]) for u in dealt}
        assert rounds[v].open_inbox(inbox[v], roster, commitments)[1] == []
    u2 = [u for u in rounds if u not in drop_before_input]
    masked = {u: rounds[u].masked_input(fp.encode(xs[u])[0], roster, fp) for u in u2}
    u3 = u2  # their masked inputs arrived: the sum is theirs
    total = torch.zeros_like(next(iter(masked.values())))
    for u in u3:
        total = fp.add(total, masked[u])
    dropped = [u for u in roster if u not in u3]
    revealers = [u for u in u3 if u not in drop_before_unmask]  # gone after masking: others reveal for them
    revealed = {u: rounds[u].unmask(inbox[u], roster, u3, dropped) for u in revealers}
    seeds = {u: dealt[u][1]["self"] for u in u3}
    return fp.decode(unmask_sum(total, roster, u3, dropped, revealed, threshold, r, fp, seeds)), masked, fp


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
    to_b = a.share_keys(roster, 2)[0][1]
    flipped = to_b[:-1] + bytes([to_b[-1] ^ 1])
    assert b.unmask({0: flipped}, roster, [0], []) == {}  # its share is left out, not revealed wrong
    assert c.unmask({0: to_b}, roster, [0], []) == {}  # b's shares sent to c
    assert set(b.unmask({0: to_b}, roster, [0], [])) == {0}
    with pytest.raises(SecAggError, match="both"):
        b.unmask({0: to_b}, roster, [0], [0])


# Small-order points of Curve25519 in their usual encodings (what an attacker sends to zero every secret).
SMALL_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]


@pytest.mark.parametrize("key", SMALL_ORDER, ids=range(len(SMALL_ORDER)))
def test_a_public_key_of_small_order_is_refused(key):
    with pytest.raises(SecAggError, match="not a usable"):
        check_public_key(key)


def test_real_public_keys_pass_and_short_ones_do_not():
    for _ in range(20):
        for key in ClientRound.fresh(0, 1).public_keys():
            check_public_key(key)
    with pytest.raises(SecAggError, match="32 bytes"):
        check_public_key(bytes(31))


def test_the_inbox_check_names_senders_whose_shares_do_not_open_or_match():
    rounds = {u: ClientRound.fresh(u, 2) for u in range(4)}
    roster = {u: cr.public_keys() for u, cr in rounds.items()}
    dealt = {u: cr.share_keys(roster, 3) for u, cr in rounds.items()}
    inbox = {u: dealt[u][0][0] for u in dealt}
    commitments = {u: (dealt[u][1]["0/s"], dealt[u][1]["0/b"]) for u in dealt}
    inbox[1] = bytes(len(inbox[1]))  # garbage from 1
    commitments[2] = (commitments[2][0], bytes(32))  # 2 committed to another b share than it sent
    inbox[3] = dealt[3][0][1]  # 3's ciphertext for client 1, passed off as client 0's
    opened, bad = rounds[0].open_inbox(inbox, roster, commitments)
    assert bad == [1, 2, 3] and sorted(opened) == [0]
    del inbox[0]
    assert rounds[0].open_inbox(inbox, roster, commitments)[1] == [0, 1, 2, 3]


def test_shares_of_no_one_polynomial_rebuild_no_secret_that_passes_its_check():
    """A dealer that hands out shares of different polynomials (each matching its commitment) cannot make the
    server accept a wrong seed or key: the rebuilt secret is checked against its commitment / public key."""
    r, t = 5, 3
    fp = FixedPoint.fit(1.0, 16, clients=4)
    rounds = {u: ClientRound.fresh(u, r) for u in range(4)}
    roster = {u: cr.public_keys() for u, cr in rounds.items()}
    liar = rounds[0]
    good = shamir_split(int.from_bytes(liar.b_seed, "big"), [1, 2, 3, 4], t)
    other = shamir_split(12345, [1, 2, 3, 4], t)
    revealed = {v: {0: ("b", (good if v < 2 else other)[v + 1])} for v in range(4)}
    seeds = {0: seed_commitment(r, 0, liar.b_seed)}
    total = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(SecAggError, match="client 0's self-mask seed"):
        unmask_sum(total, roster, [0], [], revealed, t, r, fp, seeds)
    revealed = {v: {0: ("b", good[v + 1])} for v in range(4)}
    unmask_sum(total, roster, [0], [], revealed, t, r, fp, seeds)  # the honest shares pass
    s_int = int.from_bytes(rounds[1].s_sk.private_bytes_raw(), "big")
    wrong = shamir_split(s_int ^ 1, [1, 2, 3, 4], t)
    revealed = {v: {0: ("b", good[v + 1]), 1: ("s", wrong[v + 1])} for v in (0, 2, 3)}
    with pytest.raises(SecAggError, match="client 1's mask key"):
        unmask_sum(total, roster, [0], [1], revealed, t, r, fp, seeds)
    assert share_commitment(r, 0, 1, "b", good[2]) != share_commitment(r, 0, 1, "s", good[2])  # kinds differ
