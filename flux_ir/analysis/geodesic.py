"""Geodesics of a fitted Fisher metric between points of the plane, and their distance from the
straight line.

    net = FreeEnergyNet(width=8, depth=2)                     # or fit_free_energy(...).net
    geo = geodesic(net, (0.2, 0.3), (0.8, 0.7), iterations=20, progress=False)
    geo.points            # [10, 2] metric-equidistant points from start to end (unit coordinates)
    geo.length, geo.line_length, geo.deviation
    many = geodesics(net, [(0.1, 0.1), (0.2, 0.9)], [(0.9, 0.9), (0.8, 0.1)], iterations=20, progress=False)

As the reference code does it: a curve of `n_points` points (default 90) starts on the straight
line; its inner points minimise the discrete energy sum_k D_k^T g(m_k) D_k + 0.1 sum_k |D_{k+1} -
D_k|^2 (D_k the segment from point k to k+1, m_k its midpoint, g the metric from `metric_tensor`)
with Adam (lr 0.01, 5000 iterations), clamped inside the unit square after every step; the result
is resampled to `n_out` points equally spaced in metric length. `geodesics` optimises several
curves at once (one batch of network calls per iteration; each curve's result is the same as
alone, Adam being elementwise).

Two differences from the reference code, both switchable:

- The gradient goes through the metric (g(m_k) is differentiated in the midpoints, which needs
  third derivatives of the network). The reference treats g(m_k) as a constant at each step: its
  fixed points conserve g D along the curve instead of solving the geodesic equation, whose
  derivative-of-g term is what bends geodesics around regions of large metric. `through_metric=
  False` reproduces the reference.
- Where the fitted log Z is not convex, g has a negative eigenvalue and the energy has no minimum
  (a curve gains by running along that direction). The energy and the lengths use the positive
  part of g (negative eigenvalues set to zero), `positive=False` the raw g as the reference does.
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


def positive_part(g: torch.Tensor) -> torch.Tensor:
    """Symmetric [..., 2, 2] matrices with their negative eigenvalues set to zero (closed form,
    differentiable): g itself where both eigenvalues are >= 0, 0 where both are <= 0, else
    lambda_+ (g - lambda_- I) / (lambda_+ - lambda_-)."""
    a, b, c = g[..., 0, 0], g[..., 0, 1], g[..., 1, 1]
    m = (a + c) / 2
    r = torch.sqrt(((a - c) / 2) ** 2 + b**2 + 1e-30)
    hi, lo = m + r, m - r
    eye = torch.eye(2, dtype=g.dtype, device=g.device)
    mixed = (g - lo[..., None, None] * eye) * (hi / (2 * r))[..., None, None]
    out = torch.where((lo >= 0)[..., None, None], g, mixed)
    return torch.where((hi <= 0)[..., None, None], torch.zeros_like(g), out)


def _metric(net, points: torch.Tensor, positive: bool, create_graph: bool = False) -> torch.Tensor:
    """The metric at points [..., 2] (positive part with `positive`): [..., 2, 2]."""
    shape = points.shape[:-1]
    g = metric_tensor(net, points.reshape(-1, 2), create_graph=create_graph).reshape(*shape, 2, 2)
    return positive_part(g) if positive else g


def curve_lengths(net: FreeEnergyNet, curve: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """Metric length of each segment of polylines [..., n, 2]: sqrt(D^T g(midpoint) D), [..., n-1]."""
    d = curve[..., 1:, :] - curve[..., :-1, :]
    g = _metric(net, (curve[..., 1:, :] + curve[..., :-1, :]) / 2, positive)
    return torch.einsum("...i,...ij,...j->...", d, g, d).clamp(min=0.0).sqrt()


def equidistant(
    net: FreeEnergyNet, curve: torch.Tensor, n_out: int, positive: bool = True
) -> torch.Tensor:
    """`n_out` points along the polyline [n, 2] equally spaced in metric length: [n_out, 2]."""
    lengths = curve_lengths(net, curve, positive).double()
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


def geodesic(net: FreeEnergyNet, start, end, **options) -> Geodesic:
    """The geodesic of `net`'s metric from `start` to `end` (unit coordinates, inside the square);
    options as for `geodesics`."""
    return geodesics(net, [start], [end], **options)[0]


def geodesics(
    net: FreeEnergyNet,
    starts,
    ends,
    *,
    n_points: int = 90,
    iterations: int = 5000,
    lr: float = 0.01,
    smoothness: float = 0.1,
    n_out: int = 10,
    through_metric: bool = True,
    positive: bool = True,
    progress: bool = True,
) -> list[Geodesic]:
    """Geodesics from each of `starts` to the matching `ends` (unit coordinates), optimised
    together: one `Geodesic` per pair."""
    a = np.stack([_unit_point(p, "start") for p in starts]) if len(starts) else np.zeros((0, 2))
    b = np.stack([_unit_point(p, "end") for p in ends]) if len(ends) else np.zeros((0, 2))
    if len(a) != len(b):
        raise InvalidArgumentError(
            f"{{param}} and ends must pair up, got {len(a)} and {len(b)} points", "starts"
        )
    for name, value, least in (("n_points", n_points, 3), ("n_out", n_out, 2), ("iterations", iterations, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InvalidArgumentError(
                f"{{param}} must be an integer >= {least}, got {value!r}", name
            )
    if not len(a):
        return []
    device = next(net.parameters()).device
    ta = torch.tensor(a, dtype=torch.float32, device=device)[:, None]  # [K, 1, 2]
    tb = torch.tensor(b, dtype=torch.float32, device=device)[:, None]
    s = torch.linspace(0.0, 1.0, n_points, device=device)[None, :, None]
    line = ta * (1 - s) + tb * s  # [K, n, 2]
    inner = torch.nn.Parameter(line[:, 1:-1].clone())
    opt = torch.optim.Adam([inner], lr=lr)
    energies = []
    bar = tqdm(range(iterations), desc="geodesics", unit="it", disable=not progress, leave=False)
    for _ in bar:
        curve = torch.cat([ta, inner, tb], dim=1)
        d = curve[:, 1:] - curve[:, :-1]
        mid = (curve[:, 1:] + curve[:, :-1]) / 2
        if through_metric:
            g = _metric(net, mid, positive, create_graph=True)
        else:
            g = _metric(net, mid.detach(), positive)
        energy = torch.einsum("kni,knij,knj->k", d, g, d)
        loss = energy + smoothness * (d[:, 1:] - d[:, :-1]).square().sum(dim=(1, 2))  # [K]
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        opt.step()
        with torch.no_grad():
            inner.clamp_(CLAMP, 1 - CLAMP)
        energies.append(loss.detach().cpu())
    with torch.no_grad():
        curves = torch.cat([ta, inner.detach(), tb], dim=1)
    lengths = curve_lengths(net, curves, positive).sum(-1).double().cpu().numpy()
    line_lengths = curve_lengths(net, line, positive).sum(-1).double().cpu().numpy()
    history = torch.stack(energies).double().numpy() if energies else np.zeros((0, len(a)))
    out = []
    for k in range(len(a)):
        c = curves[k].double().cpu().numpy()
        dist = segment_distance(c, a[k], b[k])
        out.append(
            Geodesic(
                start=a[k],
                end=b[k],
                curve=c,
                points=equidistant(net, curves[k], n_out, positive).double().cpu().numpy(),
                length=float(lengths[k]),
                line_length=float(line_lengths[k]),
                deviation=float(dist.max()),
                mean_deviation=float(dist.mean()),
                energy=history[:, k],
            )
        )
    return out


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
