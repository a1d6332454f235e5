"""Reward over-optimisation: the functional forms of Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model
Overoptimization", 2210.10760), fitted by least squares.

With d = sqrt(KL(pi || pi_init)), the gold reward gain over the initial policy follows, for best-of-n and for RL
against a learned (proxy) reward,
    best-of-n:  R_bon(d) = d * (alpha - beta * d)          (eq. 1)
    RL:         R_rl(d)  = d * (alpha - beta * log d)      (eq. 2)
alpha is the initial slope (gold rises while the proxy is still right), beta how fast the proxy's errors take over.
Both are linear in (alpha, beta), so ordinary least squares fits them exactly. The gain peaks at dR/dd = 0:
d* = alpha / (2 beta) (best-of-n), d* = exp(alpha / beta - 1) (RL), at KL d*^2 (when beta > 0: a turnover).
"""
import math

import numpy as np

FORMS = ("bon", "rl")


def _features(d, form: str):
    """The two regressors of R = alpha * f1 - beta * f2 for `form`; d (N,) >= 0."""
    d = np.asarray(d, dtype=np.float64)
    if form == "bon":
        return d, d * d
    if form == "rl":
        # d * log d -> 0 as d -> 0 (the form's own limit), so the initial policy itself (d = 0) is a valid point
        safe = np.where(d > 0, d, 1.0)
        return d, np.where(d > 0, d * np.log(safe), 0.0)
    raise ValueError(f"unknown form {form!r} (choose from {', '.join(FORMS)})")


def gao_curve(d, alpha: float, beta: float, form: str):
    """R(d) of the given form, (N,) float64."""
    f1, f2 = _features(d, form)
    return alpha * f1 - beta * f2


def peak_distance(alpha: float, beta: float, form: str):
    """d at which R(d) is largest, or None when the fitted curve never turns over (beta <= 0)."""
    if beta <= 0:
        return None
    if form == "bon":
        return alpha / (2.0 * beta)
    if form == "rl":
        return math.exp(alpha / beta - 1.0)
    raise ValueError(f"unknown form {form!r}")


def fit_gao(kl, gain, form: str) -> dict:
    """Least-squares fit of R(d) = d (alpha - beta * g(d)) to measured points: kl (N,) = KL(pi || pi_init) in nats
    (d = sqrt(kl)), gain (N,) = gold reward minus the initial policy's; at least two points with d > 0. Returns
    {"form", "alpha", "beta", "rmse", "n", "peak_d", "peak_kl", "peak_gain"} (peak_* None when beta <= 0)."""
    kl = np.asarray(kl, dtype=np.float64)
    gain = np.asarray(gain, dtype=np.float64)
    if kl.shape != gain.shape or kl.ndim != 1:
        raise ValueError("kl and gain must be 1-D arrays of the same length")
    if np.any(kl < 0):
        raise ValueError("KL values must be >= 0")
    d = np.sqrt(kl)
    if int((d > 0).sum()) < 2:
        raise ValueError("need at least two points with KL > 0 to fit alpha and beta")
    f1, f2 = _features(d, form)
    design = np.stack([f1, -f2], axis=1)  # (N, 2): R = design @ [alpha, beta]
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    resid = gain - design @ np.array([alpha, beta])
    peak_d = peak_distance(alpha, beta, form)
    return {"form": form, "alpha": float(alpha), "beta": float(beta),
            "rmse": float(np.sqrt(np.mean(resid ** 2))), "n": int(len(d)),
            "peak_d": peak_d, "peak_kl": None if peak_d is None else peak_d ** 2,
            "peak_gain": None if peak_d is None else float(gao_curve([peak_d], alpha, beta, form)[0])}
