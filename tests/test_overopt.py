"""Gao et al. 2022 fits: recover known alpha, beta from synthetic points; the peak is the curve's argmax."""
import numpy as np
import pytest

from minirlhf.evaluation.overopt import fit_gao, gao_curve, peak_distance


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.8, 0.15), ("rl", 0.6, 0.25), ("rl", 1.2, 0.4)])
def test_fit_recovers_parameters_exactly_without_noise(form, alpha, beta):
    kl = np.array([0.0, 0.2, 0.7, 1.5, 3.0, 5.0, 8.0, 12.0])
    gain = gao_curve(np.sqrt(kl), alpha, beta, form)
    fit = fit_gao(kl, gain, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-10)
    assert fit["beta"] == pytest.approx(beta, abs=1e-10)
    assert fit["rmse"] < 1e-10
    assert fit["n"] == len(kl)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_with_noise_is_close_and_residual_matches_noise(form):
    rng = np.random.default_rng(0)
    kl = np.linspace(0.05, 10.0, 400)
    gain = gao_curve(np.sqrt(kl), 0.7, 0.2, form) + rng.normal(0, 0.01, kl.shape)
    fit = fit_gao(kl, gain, form)
    assert abs(fit["alpha"] - 0.7) < 0.01 and abs(fit["beta"] - 0.2) < 0.01
    assert 0.007 < fit["rmse"] < 0.013


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.8, 0.15), ("rl", 0.6, 0.25)])
def test_peak_is_the_argmax_of_the_curve(form, alpha, beta):
    d = np.linspace(1e-6, 40.0, 400001)
    numeric = d[np.argmax(gao_curve(d, alpha, beta, form))]
    assert peak_distance(alpha, beta, form) == pytest.approx(numeric, abs=1e-3)
    fit = fit_gao(d[1::1000] ** 2, gao_curve(d[1::1000], alpha, beta, form), form)
    assert fit["peak_kl"] == pytest.approx(numeric ** 2, rel=1e-3)
    assert fit["peak_gain"] == pytest.approx(gao_curve([numeric], alpha, beta, form)[0], abs=1e-6)


def test_no_turnover_gives_no_peak_and_bad_input_is_refused():
    kl = np.array([0.5, 1.0, 2.0, 4.0])
    fit = fit_gao(kl, 0.5 * np.sqrt(kl), "bon")  # straight line in d: beta = 0
    assert abs(fit["beta"]) < 1e-12 and (fit["peak_d"] is None or fit["beta"] > 0)
    with pytest.raises(ValueError):
        fit_gao([0.0, 1.0], [0.0, 0.3], "rl")  # one point with KL > 0
    with pytest.raises(ValueError):
        fit_gao([1.0, 2.0], [0.1, 0.2], "linear")
    with pytest.raises(ValueError):
        fit_gao([-1.0, 2.0, 3.0], [0.1, 0.2, 0.3], "bon")
