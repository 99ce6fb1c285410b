"""Iterative reconstruction on the matched projector pair (A, Aᵀ) of :mod:`.projector`.

* SIRT: x ← x + C Aᵀ R (b − A x), R = 1/A1, C = 1/Aᵀ1 (row and column sums), x ≥ 0;
* OS-SART: the same update over ordered subsets of views (interleaved), one subset at a time;
* CGLS: conjugate gradients on the normal equations (no constraint; stop early to regularise);
* TV: min ½‖A x − b‖² + λ TV(x), x ≥ 0, by Chambolle–Pock (PDHG; Sidky et al. 2012), isotropic
  TV over the slices (2D) or the volume (3D). λ is given relative to the data: the problem is
  solved for x in units of μ_water with A scaled to unit norm, so one λ suits any geometry.

All functions take and return attenuation μ (mm⁻¹) and work on NumPy or CuPy (``p.xp``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dicomnode_ct_recon.projector import Projector

Progress = Callable[[int, float], None] | None


def _safe_inverse(xp: Any, a: Any) -> Any:
    return xp.where(a > 1e-8, 1.0 / xp.maximum(a, 1e-8), 0.0).astype(xp.float32)


def sirt(p: Projector, b: Any, iterations: int, x0: Any = None) -> Any:
    xp = p.xp
    b = xp.asarray(b, dtype=xp.float32)
    r = _safe_inverse(xp, p.forward(xp.ones(p.grid.shape, dtype=xp.float32)))
    c = _safe_inverse(xp, p.back(xp.ones(p.sino_shape, dtype=xp.float32)))
    x = xp.zeros(p.grid.shape, dtype=xp.float32) if x0 is None else x0
    for _ in range(iterations):
        x = xp.maximum(x + c * p.back(r * (b - p.forward(x))), 0)
    return x


def os_sart(p: Projector, b: Any, iterations: int, subsets: int = 10, relaxation: float = 1.0,
            x0: Any = None) -> Any:
    xp = p.xp
    b = xp.asarray(b, dtype=xp.float32)
    subsets = max(1, min(subsets, p.g.views))
    groups = [np.arange(s, p.g.views, subsets) for s in range(subsets)]
    ones_img = xp.ones(p.grid.shape, dtype=xp.float32)
    norms = []
    for idx in groups:
        r = _safe_inverse(xp, p.forward(ones_img, views=idx))
        c = _safe_inverse(xp, p.back(xp.ones((idx.size, *p.sino_shape[1:]), dtype=xp.float32),
                                     views=idx))
        norms.append((r, c))
    x = xp.zeros(p.grid.shape, dtype=xp.float32) if x0 is None else x0
    for _ in range(iterations):
        for idx, (r, c) in zip(groups, norms, strict=True):
            residual = b[xp.asarray(idx)] - p.forward(x, views=idx)
            x = xp.maximum(x + relaxation * c * p.back(r * residual, views=idx), 0)
    return x


def cgls(p: Projector, b: Any, iterations: int) -> Any:
    xp = p.xp
    b = xp.asarray(b, dtype=xp.float32)
    x = xp.zeros(p.grid.shape, dtype=xp.float32)
    r = b.copy()
    s = p.back(r)
    d = s.copy()
    gamma = float(xp.vdot(s, s))
    for _ in range(iterations):
        q = p.forward(d)
        qq = float(xp.vdot(q, q))
        if qq == 0 or gamma == 0:
            break
        alpha = gamma / qq
        x = x + alpha * d
        r = r - alpha * q
        s = p.back(r)
        gamma_new = float(xp.vdot(s, s))
        d = s + (gamma_new / gamma) * d
        gamma = gamma_new
    return x


def operator_norm(p: Projector, iterations: int = 20, seed: int = 0) -> float:
    """‖A‖ by power iteration on AᵀA."""
    xp = p.xp
    x = xp.asarray(np.random.default_rng(seed).random(p.grid.shape), dtype=xp.float32)
    norm = 0.0
    for _ in range(iterations):
        x = p.back(p.forward(x))
        norm = float(xp.linalg.norm(x))
        x = x / norm
    return float(np.sqrt(norm))


def _grad(xp: Any, x: Any, axes: tuple[int, ...]) -> Any:
    out = xp.zeros((len(axes), *x.shape), dtype=x.dtype)
    for i, ax in enumerate(axes):
        d = xp.diff(x, axis=ax)
        sl = [slice(None)] * x.ndim
        sl[ax] = slice(0, x.shape[ax] - 1)
        out[i][tuple(sl)] = d
    return out


def _div(xp: Any, q: Any, axes: tuple[int, ...]) -> Any:
    """−∇ᵀ (the adjoint of forward differences with zero flux at the far edge)."""
    out = xp.zeros(q.shape[1:], dtype=q.dtype)
    for i, ax in enumerate(axes):
        qi = q[i]
        n = qi.shape[ax]
        first = [slice(None)] * qi.ndim
        first[ax] = slice(0, 1)
        mid = [slice(None)] * qi.ndim
        mid[ax] = slice(1, n - 1)
        prev = [slice(None)] * qi.ndim
        prev[ax] = slice(0, n - 2)
        last = [slice(None)] * qi.ndim
        last[ax] = slice(n - 1, n)
        prev_last = [slice(None)] * qi.ndim
        prev_last[ax] = slice(n - 2, n - 1)
        d = xp.zeros_like(qi)
        d[tuple(first)] = qi[tuple(first)]
        d[tuple(mid)] = qi[tuple(mid)] - qi[tuple(prev)]
        d[tuple(last)] = -qi[tuple(prev_last)]
        out += d
    return out


def tv(p: Projector, b: Any, iterations: int, weight: float = 0.002, balance: float = 1.0,
       x0: Any = None) -> Any:
    """Chambolle–Pock for ½‖Âx − b̂‖² + λ TV(x), x ≥ 0 (Â = A/‖A‖, x in units of μ_water)."""
    xp = p.xp
    mu_w = p.g.mu_water
    norm = operator_norm(p)
    bh = xp.asarray(b, dtype=xp.float32) / (norm * mu_w)
    axes = (1, 2) if p.grid.shape[0] == 1 else (0, 1, 2)
    k_norm = float(np.sqrt(1.0 + 4.0 * len(axes)))  # ‖(Â, ∇)‖ ≤ √(1 + 4·dims)
    tau, sigma = balance / k_norm, 1.0 / (balance * k_norm)
    x = xp.zeros(p.grid.shape, dtype=xp.float32) if x0 is None else xp.maximum(x0 / mu_w, 0)
    xbar = x.copy()
    dual_p = xp.zeros_like(bh)
    dual_q = xp.zeros((len(axes), *x.shape), dtype=xp.float32)
    for _ in range(iterations):
        dual_p = (dual_p + sigma * (p.forward(xbar) / norm - bh)) / (1.0 + sigma)
        dual_q = dual_q + sigma * _grad(xp, xbar, axes)
        mag = xp.sqrt(xp.sum(dual_q * dual_q, axis=0))
        dual_q = dual_q / xp.maximum(1.0, mag / weight)[None]
        x_new = xp.maximum(x - tau * (p.back(dual_p) / norm - _div(xp, dual_q, axes)), 0)
        xbar = 2 * x_new - x
        x = x_new
    return x * mu_w
