"""Geodesics of a fitted Fisher metric between two points of the plane, and their distance from the
straight line.

    net = FreeEnergyNet(width=8, depth=2)                     # or fit_free_energy(...).net
    geo = geodesic(net, (0.2, 0.3), (0.8, 0.7), iterations=20, progress=False)
    geo.points            # [10, 2] metric-equidistant points from start to end (unit coordinates)
    geo.length, geo.line_length, geo.deviation

As the reference code does it: a curve of `n_points` points (default 90) starts on the straight
line; its inner points minimise the discrete energy sum_k D_k^T g(m_k) D_k + 0.1 sum_k |D_{k+1} -
D_k|^2 (D_k the segment from point k to k+1, m_k its midpoint, g the metric from `metric_tensor`)
with Adam (lr 0.01, 5000 iterations), clamped inside the unit square after every step; the result
is resampled to `n_out` points equally spaced in metric length.

Unlike the reference code, the gradient goes through the metric too (g(m_k) is differentiated in
the midpoints, which needs third derivatives of the network): the reference treats g(m_k) as a
constant at each step, whose fixed points conserve g D along the curve instead of solving the
geodesic equation, so in an isotropic metric it never leaves the straight line. `through_metric=
False` reproduces the reference behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from flux_ir.analysis.fisher import FreeEnergyNet, metric_tensor
from flux_ir.errors import InvalidArgumentError

CLAMP = 1e-6  # points stay in [CLAMP, 1 - CLAMP], as in the reference code


@dataclass
class Geodesic:
    """A geodesic in unit coordinates: `curve` [n_points, 2] (the optimised polyline), `points`
    [n_out, 2] (metric-equidistant, endpoints included), its metric `length` and that of the straight
    line `line_length`; `deviation`: the largest Euclidean distance of the curve from the straight
    segment, and `mean_deviation` the mean one (unit coordinates); `energy` [iterations], the loss."""

    start: np.ndarray
    end: np.ndarray
    curve: np.ndarray
    points: np.ndarray
    length: float
    line_length: float
    deviation: float
    mean_deviation: float
    energy: np.ndarray

    @property
    def relative_deviation(self) -> float:
        """`deviation` over the distance between the endpoints (unit coordinates)."""
        chord = float(np.linalg.norm(self.end - self.start))
        return self.deviation / chord if chord > 0 else 0.0


def curve_lengths(net: FreeEnergyNet, curve: torch.Tensor) -> torch.Tensor:
    """Metric length of each segment of a polyline [n, 2]: sqrt(D^T g(midpoint) D), [n - 1]."""
    d = curve[1:] - curve[:-1]
    g = metric_tensor(net, (curve[1:] + curve[:-1]) / 2)
    return torch.einsum("ni,nij,nj->n", d, g, d).clamp(min=0.0).sqrt()


def equidistant(net: FreeEnergyNet, curve: torch.Tensor, n_out: int) -> torch.Tensor:
    """`n_out` points along the polyline [n, 2] equally spaced in metric length: [n_out, 2]."""
    lengths = curve_lengths(net, curve).double()
    cum = torch.cat([torch.zeros(1, dtype=lengths.dtype, device=lengths.device), lengths.cumsum(0)])
    targets = torch.linspace(0.0, float(cum[-1]), n_out, dtype=cum.dtype, device=cum.device)
    idx = (torch.searchsorted(cum, targets) - 1).clamp(0, len(curve) - 2)
    span = (cum[idx + 1] - cum[idx]).clamp(min=1e-30)
    frac = ((targets - cum[idx]) / span).clamp(0.0, 1.0).to(curve.dtype)[:, None]
    out = curve[idx] * (1 - frac) + curve[idx + 1] * frac
    out[0], out[-1] = curve[0], curve[-1]
    return out


def segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance of points [n, 2] from the segment a-b: [n]."""
    ab = b - a
    denom = float(ab @ ab)
    t = np.zeros(len(points)) if denom == 0 else np.clip((points - a) @ ab / denom, 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def geodesic(
    net: FreeEnergyNet,
    start,
    end,
    *,
    n_points: int = 90,
    iterations: int = 5000,
    lr: float = 0.01,
    smoothness: float = 0.1,
    n_out: int = 10,
    through_metric: bool = True,
    progress: bool = True,
) -> Geodesic:
    """The geodesic of `net`'s metric from `start` to `end` (unit coordinates, inside the square)."""
    a = _unit_point(start, "start")
    b = _unit_point(end, "end")
    for name, value, least in (("n_points", n_points, 3), ("n_out", n_out, 2), ("iterations", iterations, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(
                f"{{param}} must be an integer >= {least}, got {value!r}", name
            )
    device = next(net.parameters()).device
    ta = torch.tensor(a, dtype=torch.float32, device=device)
    tb = torch.tensor(b, dtype=torch.float32, device=device)
    s = torch.linspace(0.0, 1.0, n_points, device=device)[:, None]
    line = ta * (1 - s) + tb * s
    inner = torch.nn.Parameter(line[1:-1].clone())
    opt = torch.optim.Adam([inner], lr=lr)
    energies = []
    bar = tqdm(range(iterations), desc="geodesic", unit="it", disable=not progress, leave=False)
    for _ in bar:
        curve = torch.cat([ta[None], inner, tb[None]])
        d = curve[1:] - curve[:-1]
        mid = (curve[1:] + curve[:-1]) / 2
        if through_metric:
            g = metric_tensor(net, mid, create_graph=True)
        else:
            g = metric_tensor(net, mid.detach())
        energy = torch.einsum("ni,nij,nj->n", d, g, d).sum()
        loss = energy + smoothness * (d[1:] - d[:-1]).square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            inner.clamp_(CLAMP, 1 - CLAMP)
        energies.append(float(loss.detach()))
    with torch.no_grad():
        curve = torch.cat([ta[None], inner.detach(), tb[None]])
    points = equidistant(net, curve, n_out)
    length = float(curve_lengths(net, curve).sum())
    line_length = float(curve_lengths(net, line).sum())
    c = curve.double().cpu().numpy()
    dist = segment_distance(c, a, b)
    return Geodesic(
        start=a,
        end=b,
        curve=c,
        points=points.double().cpu().numpy(),
        length=length,
        line_length=line_length,
        deviation=float(dist.max()),
        mean_deviation=float(dist.mean()),
        energy=np.asarray(energies),
    )


def _unit_point(p, name: str) -> np.ndarray:
    try:
        arr = np.asarray(p, dtype=np.float64).reshape(2)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"{{param}} must be two numbers, got {p!r}", name) from err
    if not np.isfinite(arr).all() or (arr < -1e-9).any() or (arr > 1 + 1e-9).any():
        raise InvalidArgumentError(
            f"{{param}} {tuple(arr)} lies outside the sweep's alpha/beta box", name
        )
    return arr.clip(0.0, 1.0)  # the endpoints stay where they are; the inner points are clamped
