"""Convergence diagnostics of Markov chains: split R-hat and effective sample size.

Both take draws of one scalar quantity as an array of shape ``(chains, draws)``
(burn-in already removed) and follow Vehtari, Gelman, Simpson, Carpenter &
Bürkner (2021), "Rank-normalization, folding, and localization: an improved
R-hat for assessing convergence of MCMC", Bayesian Analysis 16(2), which
refines Gelman et al., *Bayesian Data Analysis* (3rd ed., 2013), §11.4–11.5.

Split R-hat. Each chain is cut into halves (an odd middle draw is dropped), so
``m`` = 2·chains sequences of ``n`` draws. With the between- and
within-sequence variances

    B = n/(m−1) · Σ_j (θ̄_j − θ̄)²,    W = (1/m) · Σ_j s_j²,
    var⁺ = (n−1)/n · W + B/n,         R̂ = sqrt(var⁺ / W).

R̂ → 1 as the chains forget their start; values above ~1.01 say they have not
mixed. ``rank_normalize=True`` (default) computes it on the normal scores of the
pooled ranks, z = Φ⁻¹((r − 3/8)/(S + 1/4)), and returns the larger of that "bulk"
R̂ and the R̂ of the folded draws |θ − median| (the "tail" R̂), so heavy tails and
differences in spread are caught too.

Effective sample size. With the autocorrelation ρ̂_t combined over sequences as

    ρ̂_t = 1 − (W − (1/m) Σ_j s_j² ρ̂_{t,j}) / var⁺,

Geyer's initial monotone sequence estimator sums the pairs P_k = ρ̂_{2k} + ρ̂_{2k+1}
while they are positive, forcing them to be non-increasing, and

    τ̂ = −1 + 2 Σ_k P_k,      ESS = m·n / τ̂.

For i.i.d. draws ESS ≈ m·n; for an AR(1) chain x_t = φ x_{t−1} + ε_t it is
m·n·(1 − φ)/(1 + φ).

>>> import numpy as np
>>> draws = np.random.default_rng(0).standard_normal((4, 1000))
>>> bool(abs(split_rhat(draws) - 1) < 0.01), bool(3000 < effective_sample_size(draws) < 5000)
(True, True)
"""

from __future__ import annotations

import numpy as np


def _split(draws: np.ndarray) -> np.ndarray:
    draws = np.asarray(draws, dtype=np.float64)
    if draws.ndim != 2:
        raise ValueError(f"draws must have shape (chains, draws), not {draws.shape}")
    half = draws.shape[1] // 2
    if half < 2:
        raise ValueError(f"split diagnostics need at least 4 draws per chain, not {draws.shape[1]}")
    # An odd middle draw is dropped so both halves have equal length.
    return np.concatenate([draws[:, :half], draws[:, -half:]], axis=0)


def _normal_scores(draws: np.ndarray) -> np.ndarray:
    # Imported here: scipy.stats takes ~0.9 s to import, which every command that loads the
    # probes (even `validate`) would otherwise pay.
    from scipy import special, stats

    ranks = stats.rankdata(draws, method="average").reshape(draws.shape)
    return special.ndtri((ranks - 0.375) / (draws.size + 0.25))


def _rhat(sequences: np.ndarray) -> float:
    m, n = sequences.shape
    means = sequences.mean(axis=1)
    within = sequences.var(axis=1, ddof=1).mean()
    between = n * means.var(ddof=1) if m > 1 else 0.0
    if within == 0:
        return float("nan")
    var_plus = (n - 1) / n * within + between / n
    return float(np.sqrt(var_plus / within))


def split_rhat(draws: np.ndarray, rank_normalize: bool = True) -> float:
    """Split R-hat of ``draws`` (chains, draws); NaN when every draw is equal."""
    sequences = _split(draws)
    if not rank_normalize:
        return _rhat(sequences)
    bulk = _rhat(_normal_scores(sequences))
    folded = np.abs(sequences - np.median(sequences))
    tail = _rhat(_normal_scores(folded))
    return float(max(bulk, tail))


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of each row of ``x`` at lags 0..n−1 (by FFT)."""
    n = x.shape[-1]
    centered = x - x.mean(axis=-1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centered, n=size, axis=-1)
    return np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=-1)[..., :n] / n


def effective_sample_size(draws: np.ndarray, rank_normalize: bool = True) -> float:
    """Effective sample size of ``draws`` (chains, draws), Geyer's monotone sequence.

    ``rank_normalize=True`` gives the "bulk" ESS of Vehtari et al. (2021);
    ``False`` the ESS of the mean of the raw values (for a Monte Carlo standard
    error of the mean). NaN when every draw is equal.
    """
    sequences = _split(draws)
    if rank_normalize:
        sequences = _normal_scores(sequences)
    m, n = sequences.shape
    acov = _autocovariance(sequences)
    chain_var = acov[:, 0] * n / (n - 1)
    within = chain_var.mean()
    if within == 0:
        return float("nan")
    var_plus = (n - 1) / n * within
    if m > 1:
        var_plus += sequences.mean(axis=1).var(ddof=1)
    rho = 1.0 - (within - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer's initial positive sequence, made monotone.
    pairs = rho[: n - n % 2].reshape(-1, 2).sum(axis=1)
    positive = np.flatnonzero(pairs <= 0)
    pairs = pairs[: positive[0]] if positive.size else pairs
    pairs = np.minimum.accumulate(pairs)
    tau = -1.0 + 2.0 * pairs.sum()
    # An antithetic chain can make tau < 1; cap as Stan does (ESS ≤ m·n·log10(m·n)).
    tau = max(tau, 1.0 / np.log10(m * n))
    return float(m * n / tau)
