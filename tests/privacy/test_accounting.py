import math

import dp_accounting as dpa
import pytest

from fedtune.privacy.accounting import Mechanism, adaptive_noise_split, calibrate_noise, rounds_within


def _direct(event, relation, delta, pld=False):
    """The library called by hand, as a reader of a run's log would."""
    acc = (dpa.pld.PLDAccountant if pld else dpa.rdp.RdpAccountant)(neighboring_relation=relation)
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_epsilon_is_the_librarys_for_what_the_run_logs(accountant):
    m = Mechanism(1.1, "poisson", 100, 10, 1e-5, accountant)
    told = m.describe(rounds=30)
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(told["sample_rate"], dpa.GaussianDpEvent(told["noise_multiplier"])), told["rounds"]
    )
    assert told["neighbouring"] == "add_or_remove_one"
    direct = _direct(event, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, told["delta"], accountant == "pld")
    assert m.epsilon(30) == pytest.approx(direct, rel=1e-9)


def test_fixed_size_sampling_is_accounted_without_replacement_under_replace_one():
    m = Mechanism(1.1, "fixed", 100, 10, 1e-5)
    # replacing a client moves the clipped sum by up to 2C: the library is told the std over 2C
    event = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(0.55)), 30)
    told = m.describe()
    assert told["neighbouring"] == "replace_one" and told["accountant_noise_multiplier"] == 0.55
    assert m.epsilon(30) == pytest.approx(_direct(event, dpa.NeighboringRelation.REPLACE_ONE, 1e-5), rel=1e-9)
    # replacing a client is two add/removes: it costs more than Poisson at the same rate
    assert m.epsilon(30) > Mechanism(1.1, "poisson", 100, 10, 1e-5).epsilon(30)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    m = Mechanism(1.0, "poisson", 50, 5, 1e-5)
    eps = [m.epsilon(r) for r in (0, 1, 5, 20)]
    assert eps[0] == 0 and eps == sorted(eps) and len(set(eps)) == 4
    assert m.with_noise(2.0).epsilon(20) < eps[-1]
    assert math.isinf(m.with_noise(0.0).epsilon(1))


def test_rounds_within_is_the_last_round_under_the_target():
    m = Mechanism(1.5, "poisson", 50, 5, 1e-5)
    r = rounds_within(m, 2.0, 500)
    assert 0 < r < 500 and m.epsilon(r) <= 2.0 < m.epsilon(r + 1)
    assert rounds_within(m, 1e6, 40) == 40 and rounds_within(m, 1e-9, 40) == 0


def test_calibrated_noise_meets_the_target_tightly():
    m = Mechanism(1.0, "poisson", 100, 10, 1e-5)
    z = calibrate_noise(m, 50, 3.0)
    assert m.with_noise(z).epsilon(50) <= 3.0 < m.with_noise(z * 0.99).epsilon(50)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": "fixed", "accountant": "pld"}, "PLD"),
        ({"sample_size": 0}, "sample size"),
        ({"sample_size": 101}, "sample size"),
        ({"delta": 1.0}, "delta"),
        ({"noise_multiplier": float("nan")}, "noise multiplier"),
    ],
)
def test_a_mechanism_the_accountant_cannot_state_is_refused(kwargs, match):
    base = {"noise_multiplier": 1.0, "sampling": "poisson", "population": 100, "sample_size": 10, "delta": 1e-5}
    with pytest.raises(ValueError, match=match):
        Mechanism(**{**base, **kwargs})


def test_adaptive_clipping_leaves_the_update_more_noise_and_the_same_total():
    z, sigma_b = 1.0, 5.0
    z_update = adaptive_noise_split(z, sigma_b)
    assert z_update > z
    assert (z_update**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)  # Andrew et al. 2021, Theorem 1
    with pytest.raises(ValueError, match="too small"):
        adaptive_noise_split(1.0, 0.4)


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.25, 1.0, 5), (0.01, 0.8, 1000), (0.5, 3.0, 20)])
def test_opacus_own_rdp_accountant_agrees_within_its_coarser_orders(q, z, rounds):
    """A second implementation of the sampled Gaussian's RDP bound (Opacus's; other orders, other code) gives
    the same epsilon to within 3%: a wrong q, z or composition in ours would not."""
    from opacus.accountants import RDPAccountant

    ours = Mechanism(z, "poisson", 1000, round(q * 1000), 1e-5).epsilon(rounds)
    theirs = RDPAccountant()
    theirs.history = [(z, q, rounds)]
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=0.03)
