"""The Fisher metric of a latent plane, the Hessian-geometry way: posteriors, free energy, metric.

    coords = torch.rand(60, 2, generator=torch.Generator().manual_seed(0))   # [n, 2] in the unit square
    emb = torch.nn.functional.normalize(torch.cat([coords, 1 - coords], 1), dim=1)   # [n, D] unit
    post = kernel_posteriors(emb, coords, resolution=16)        # [60, 16, 16], each sums to 1
    fit = fit_free_energy(post, coords, width=16, steps=20, progress=False)
    field = metric_field(fit.net, resolution=8)                 # metric [8, 8, 2, 2], det, eig_max

The method of "Hessian Geometry of Latent Space in Generative Models" (Lobashev et al., ICML 2025)
and of its public code, in three steps on the unit square u in [0, 1]^2 (a sweep's (alpha, beta)
box mapped onto it; `UnitBox` converts):

1. Posterior p(u | x_i) of every sample on an R x R grid from unit image embeddings e: weights
   w_j = exp(-10 sqrt(2 (1.00001 - e_j . e_i))) splatted bilinearly at u_j, each cell clipped to at
   most 1, normalised (`kernel_posteriors`, chunked, on any device).
2. Free energy f: an MLP R^2 -> R (2 -> 512 x 4 -> 1, LayerNorm, ReLU) whose log-partition function
   F = log Z = -f defines the exponential-family posterior Q_i(u) ~ exp(-N D_F(u, u_i)), D_F the
   Bregman divergence of F; fitted so that Q_i matches p(u | x_i) (Jensen-Shannon divergence plus the
   centroid distance / sqrt(2), 80/20 split) (`fit_free_energy`).
3. Metric g(u) = Hessian of log Z by double autograd, on a dense grid: det g and its eigenvalues
   (`metric_field`; `metric_tensor` at any points).

N, the number of samples the exponential family's posterior stands for, only sets the metric's
scale (N g is what the fit sees). By default (`n_samples=None`) N is chosen from the posteriors,
1 / (mean posterior variance per axis), so the fitted F has curvature of order one in unit
coordinates, which the network learns fastest. Q_i is centred on the sample's own point u_i, as in
the paper. The posterior of a true exponential family after M draws is centred on the draws'
estimate of u_i instead, as far from u_i as it is wide: fitted as it is with N = M, that scatter is
taken for width and g comes out about 40% low. Its 1/M-th power converges to exp(-D_F(u, u_i))
(the paper's Theorem 3.1), so such posteriors are fitted raised to the power k/M with N = k << M
(tests/test_fisher.py: 2,500 draws, k = 25, within 6-8% of the exact metric).

One deliberate difference from the reference code: its bilinear splat takes the fractional part of
a coordinate before clipping the cell index, which moves samples on the upper edge of the box one
cell inwards; here the fraction is taken after clipping, so they land on the edge cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flux_ir.errors import InvalidArgumentError

SHARPNESS = 10.0  # the reference code's kernel: exp(-10 * chordal distance)
KERNEL_EPS = 1e-5  # 1.00001 - e_j . e_i keeps the square root away from zero
ENTROPY_EPS = 1e-8  # inside the log of the Jensen-Shannon entropies, as in the reference code


@dataclass(frozen=True)
class UnitBox:
    """The (alpha, beta) box of a sweep, mapped onto the unit square u = (t - lo) / (hi - lo)."""

    alpha: tuple[float, float] = (0.0, 1.0)
    beta: tuple[float, float] = (0.0, 1.0)

    @property
    def lo(self) -> np.ndarray:
        return np.array([self.alpha[0], self.beta[0]], dtype=np.float64)

    @property
    def size(self) -> np.ndarray:
        return np.array([self.alpha[1] - self.alpha[0], self.beta[1] - self.beta[0]], np.float64)

    def to_unit(self, t) -> np.ndarray:
        """(alpha, beta) points [..., 2] -> unit coordinates [..., 2]."""
        return (np.asarray(t, dtype=np.float64) - self.lo) / self.size

    def from_unit(self, u) -> np.ndarray:
        """Unit coordinates [..., 2] -> (alpha, beta) [..., 2]."""
        return self.lo + np.asarray(u, dtype=np.float64) * self.size

    def metric_from_unit(self, g) -> np.ndarray:
        """A metric [..., 2, 2] in unit coordinates -> in (alpha, beta): g_ij / (L_i L_j)."""
        s = self.size
        return np.asarray(g, dtype=np.float64) / np.outer(s, s)


# -- 1. posteriors ----------------------------------------------------------------------------------
def _splat_factors(coords: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear splat of points coords [n, 2] (unit square) onto an R x R grid, factorised:
    A [R, n] over the alpha cells and B [R, n] over the beta cells, so that the grid of weights w [n]
    is A diag(w) B^T."""
    n = coords.shape[0]
    factors = []
    for axis in range(2):
        x = coords[:, axis].clamp(0.0, 1.0) * (resolution - 1)
        i = x.floor().long().clamp(0, resolution - 2)
        frac = x - i  # after clipping: a point on the upper edge lands on the last cell
        m = torch.zeros(resolution, n, dtype=coords.dtype, device=coords.device)
        cols = torch.arange(n, device=coords.device)
        m[i, cols] = 1.0 - frac
        m[i + 1, cols] += frac
        factors.append(m)
    return factors[0], factors[1]


def kernel_posteriors(
    embeddings,
    coords,
    resolution: int = 128,
    *,
    sharpness: float = SHARPNESS,
    eps: float = KERNEL_EPS,
    chunk: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Posterior of every sample over the unit square: [n, R, R] float32 (axis 1: alpha, axis 2:
    beta), each summing to 1, on `device` (default: the embeddings'). Similarities are computed in
    float64 (a sample's weight on itself, exp(-10 sqrt(2 (1e-5 + rounding))), would otherwise carry
    float32's rounding of e_i . e_i), the splat in float32.

    embeddings [n, D]: unit vectors (CLIP image embeddings); coords [n, 2]: the samples' (alpha,
    beta) in unit coordinates. Sample i's posterior is sum_j w_ij splat(u_j), w_ij =
    exp(-sharpness sqrt(2 (1 + eps - e_i . e_j))), each cell clipped to at most 1, normalised. The
    splat factorises over the axes, so a chunk of C samples is one batched matrix product
    [C, R, n] x [n, R] (O(n^2 (D + R^2)) in all), `chunk` samples at a time (default: ~512 MB).
    """
    e = torch.as_tensor(embeddings)
    u = torch.as_tensor(coords, dtype=torch.float32)
    _check_points(u, "coords")
    if e.ndim != 2 or e.shape[0] != u.shape[0]:
        raise InvalidArgumentError(
            f"{{param}} must be [n, D] with one row per coordinate ({u.shape[0]}), got "
            f"{tuple(e.shape)}",
            "embeddings",
        )
    _check_resolution(resolution, "resolution")
    device = torch.device(device) if device is not None else e.device
    e, u = e.to(device, torch.float64), u.to(device)
    n, r = u.shape[0], resolution
    a, b = _splat_factors(u, r)  # [R, n] each
    bt = b.T.contiguous()  # [n, R]
    if chunk is None:
        chunk = max(1, min(n, (512 << 20) // (4 * r * n)))
    out = torch.empty(n, r, r, dtype=torch.float32, device=device)
    starts = range(0, n, chunk)
    for lo in tqdm(starts, desc="posteriors", unit="chunk", disable=not progress, leave=False):
        sim = e[lo : lo + chunk] @ e.T  # [C, n], float64: a sample's weight on itself hangs on eps
        w = torch.exp(-sharpness * torch.sqrt((2.0 * (1.0 + eps - sim)).clamp(min=0.0))).float()
        grid = torch.matmul(a[None] * w[:, None, :], bt)  # [C, R, R]
        grid = grid.clamp(max=1.0)
        out[lo : lo + chunk] = grid / grid.sum(dim=(1, 2), keepdim=True)
    return out


def posterior_moments(posteriors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids [n, 2] and per-axis variances [n, 2] of posteriors [n, R, R] in unit coordinates."""
    r = posteriors.shape[-1]
    axis = torch.linspace(0.0, 1.0, r, device=posteriors.device, dtype=posteriors.dtype)
    pa, pb = posteriors.sum(2), posteriors.sum(1)  # marginals over alpha, beta: [n, R]
    mean = torch.stack([pa @ axis, pb @ axis], dim=1)
    var = torch.stack([pa @ axis**2, pb @ axis**2], dim=1) - mean**2
    return mean, var.clamp(min=0.0)


# -- 2. free energy -----------------------------------------------------------------------------------
class FreeEnergyNet(nn.Module):
    """f: [B, 2] unit coordinates -> [B] free energy; log Z = -f. `depth` hidden layers of `width`,
    each Linear, LayerNorm, ReLU (the reference: width 512, depth 4), then Linear to one value."""

    def __init__(self, width: int = 512, depth: int = 4):
        super().__init__()
        for name, value in (("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"{{param}} must be a positive integer, got {value!r}", name
                )
        self.width, self.depth = width, depth
        layers: list[nn.Module] = []
        fan_in = 2
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.LayerNorm(width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.layers(u).squeeze(-1)

    def log_partition(self, u: torch.Tensor) -> torch.Tensor:
        """F(u) = log Z(u) = -f(u): [B]."""
        return -self(u)


def unit_grid(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Cell centres of an R x R grid over the unit square, row-major (alpha, then beta): [R*R, 2]."""
    axis = torch.linspace(0.0, 1.0, resolution, device=device, dtype=dtype)
    ua, ub = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([ua.reshape(-1), ub.reshape(-1)], dim=1)


def bregman_logits(
    net: FreeEnergyNet,
    grid: torch.Tensor,
    centres: torch.Tensor,
    n_samples: float,
    create_graph: bool = True,
) -> torch.Tensor:
    """-N D_F(u, u_i) for grid points u [G, 2] and centres u_i [B, 2]: [B, G] (differentiable in the
    network's weights with `create_graph`). D_F(u, v) = F(u) - F(v) - grad F(v) . (u - v), F = log Z."""
    f_grid = net.log_partition(grid)  # [G]
    with torch.enable_grad():
        c = centres.detach().requires_grad_(True)
        f_c = net.log_partition(c)  # [B]
        (grad_c,) = torch.autograd.grad(f_c.sum(), c, create_graph=create_graph)
    d = (
        f_grid[None, :]
        - f_c[:, None]
        - ((grid[None, :, :] - c[:, None, :]) * grad_c[:, None]).sum(-1)
    )
    return -n_samples * d


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + ENTROPY_EPS)).sum(-1)


def posterior_loss(p: torch.Tensor, log_q: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per sample [B]: JSD(P, Q) + |centroid(P) - centroid(Q)| / sqrt(2), for P [B, G] and Q =
    softmax(log_q) [B, G] on grid points [G, 2] (unit coordinates)."""
    q = torch.softmax(log_q, dim=-1)
    jsd = _entropy((p + q) / 2) - (_entropy(p) + _entropy(q)) / 2
    shift = (q - p) @ grid  # [B, 2]
    return jsd + shift.norm(dim=-1) / math.sqrt(2.0)


@dataclass
class FreeEnergyFit:
    """A fitted free energy: the network (evaluation mode, on its device), N, and the losses.

    `train_loss` [k] and `val_loss` [k] at `eval_steps` [k] (the training loss averaged since the
    previous evaluation); the network kept is the one of `best_step` (lowest validation loss)."""

    net: FreeEnergyNet
    n_samples: float
    resolution: int
    eval_steps: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray
    best_step: int
    train_index: np.ndarray = field(repr=False)
    val_index: np.ndarray = field(repr=False)

    @property
    def best_val_loss(self) -> float:
        return float(self.val_loss.min()) if len(self.val_loss) else math.nan


def auto_n_samples(posteriors: torch.Tensor) -> float:
    """N for which the fitted log Z has curvature of order one in unit coordinates:
    1 / (mean posterior variance per axis)."""
    _, var = posterior_moments(posteriors.float())
    return float(1.0 / var.mean().clamp(min=1e-12))


def fit_free_energy(
    posteriors,
    coords,
    *,
    n_samples: float | None = None,
    width: int = 512,
    depth: int = 4,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    eval_every: int = 50,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> FreeEnergyFit:
    """Fit the free-energy network to posteriors [n, R, R] of samples at coords [n, 2] (unit
    coordinates): Adam on the mean `posterior_loss` over batches of `batch_size` training samples.

    The samples are split at random (seeded) into training (1 - val_fraction) and validation
    (val_fraction, at least one sample); every `eval_every` steps the validation loss is measured
    and the network with the lowest one is kept. `n_samples` is N of Q ~ exp(-N D_F) (default:
    `auto_n_samples`). Deterministic for a given seed on a given device.
    """
    post = torch.as_tensor(posteriors, dtype=torch.float32)
    u = torch.as_tensor(coords, dtype=torch.float32)
    _check_points(u, "coords")
    if post.ndim != 3 or post.shape[0] != u.shape[0] or post.shape[1] != post.shape[2]:
        raise InvalidArgumentError(
            f"{{param}} must be [n, R, R] with one posterior per coordinate ({u.shape[0]}), got "
            f"{tuple(post.shape)}",
            "posteriors",
        )
    n, r = post.shape[0], post.shape[1]
    _check_positive_int(steps, "steps")
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(eval_every, "eval_every")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidArgumentError(
            f"{{param}} must be between 0 and 1 (exclusive), got {val_fraction!r}", "val_fraction"
        )
    if n < 2:
        raise InvalidArgumentError(f"{{param}} needs at least 2 samples, got {n}", "posteriors")
    if n_samples is None:
        n_samples = auto_n_samples(post)
    elif not (isinstance(n_samples, int | float) and n_samples > 0 and math.isfinite(n_samples)):
        raise InvalidArgumentError(
            f"{{param}} must be a positive number, got {n_samples!r}", "n_samples"
        )
    device = torch.device(device) if device is not None else post.device
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    val_index, train_index = np.sort(order[:n_val]), np.sort(order[n_val:])
    flat = post.reshape(n, r * r).to(device)
    u = u.to(device)
    grid = unit_grid(r, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FreeEnergyNet(width, depth)
    net = net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best_state, best_loss, best_step = None, math.inf, 0
    eval_steps, train_hist, val_hist = [], [], []
    running, count = 0.0, 0
    batch = min(batch_size, len(train_index))
    queue: list[int] = []
    val_t = torch.as_tensor(val_index, device=device)

    def evaluate() -> float:
        net.eval()
        total = 0.0
        for lo in range(0, len(val_t), batch):
            idx = val_t[lo : lo + batch]
            logits = bregman_logits(net, grid, u[idx], n_samples, create_graph=False)
            total += float(posterior_loss(flat[idx], logits, grid).detach().sum())
        net.train()
        return total / len(val_t)

    bar = tqdm(range(1, steps + 1), desc="free energy", unit="step", disable=not progress)
    for step in bar:
        if len(queue) < batch:
            queue += rng.permutation(train_index).tolist()
        idx = torch.as_tensor(queue[:batch], device=device)
        del queue[:batch]
        logits = bregman_logits(net, grid, u[idx], n_samples)
        loss = posterior_loss(flat[idx], logits, grid).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        count += 1
        if step % eval_every == 0 or step == steps:
            val = evaluate()
            eval_steps.append(step)
            train_hist.append(running / count)
            val_hist.append(val)
            running, count = 0.0, 0
            bar.set_postfix(train=f"{train_hist[-1]:.4f}", val=f"{val:.4f}")
            if val < best_loss:
                best_loss, best_step = val, step
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval().requires_grad_(False)
    return FreeEnergyFit(
        net=net,
        n_samples=float(n_samples),
        resolution=r,
        eval_steps=np.asarray(eval_steps, dtype=np.int64),
        train_loss=np.asarray(train_hist, dtype=np.float64),
        val_loss=np.asarray(val_hist, dtype=np.float64),
        best_step=best_step,
        train_index=train_index,
        val_index=val_index,
    )


# -- 3. metric ---------------------------------------------------------------------------------------
def metric_tensor(
    net: FreeEnergyNet, points, *, chunk: int = 16384, create_graph: bool = False
) -> torch.Tensor:
    """g = Hessian of log Z at points [M, 2] (unit coordinates), by double autograd: [M, 2, 2].

    With `create_graph` the result stays differentiable in the points (geodesics need that)."""
    pts = torch.as_tensor(points, dtype=torch.float32)
    device = next(net.parameters()).device
    pts = pts.to(device)
    out = []
    for lo in range(0, pts.shape[0], chunk):
        with torch.enable_grad():
            p = pts[lo : lo + chunk]
            if not p.requires_grad:
                p = p.detach().requires_grad_(True)
            f = net.log_partition(p)
            (grad,) = torch.autograd.grad(f.sum(), p, create_graph=True)
            rows = [
                torch.autograd.grad(
                    grad[:, k].sum(), p, retain_graph=True, create_graph=create_graph
                )[0]
                for k in range(2)
            ]
        h = torch.stack(rows, dim=1)  # [C, 2, 2]: row k is d/du of dF/du_k
        h = (h + h.transpose(1, 2)) / 2
        out.append(h if create_graph else h.detach())
    return torch.cat(out) if out else torch.zeros(0, 2, 2, device=device)


@dataclass
class MetricField:
    """The metric on an M x M grid over the box: `alphas` [M], `betas` [M]; `metric` [M, M, 2, 2]
    in (alpha, beta) coordinates, its determinant `det` [M, M], eigenvalues `eig_max`, `eig_min`
    [M, M], and the free energy `free_energy` [M, M] (f = -log Z)."""

    alphas: np.ndarray
    betas: np.ndarray
    metric: np.ndarray
    det: np.ndarray
    eig_max: np.ndarray
    eig_min: np.ndarray
    free_energy: np.ndarray


def metric_field(
    net: FreeEnergyNet, resolution: int = 128, box: UnitBox | None = None
) -> MetricField:
    """The metric of `net` on a resolution x resolution grid over `box` (default: the unit square),
    expressed in the box's (alpha, beta) coordinates."""
    _check_resolution(resolution, "metric_resolution")
    box = box or UnitBox()
    device = next(net.parameters()).device
    grid = unit_grid(resolution, device=device)
    g_unit = metric_tensor(net, grid).double().cpu().numpy()
    with torch.no_grad():
        f = net(grid).double().cpu().numpy()
    g = box.metric_from_unit(g_unit).reshape(resolution, resolution, 2, 2)
    eig = np.linalg.eigvalsh(g)  # ascending
    axis = np.linspace(0.0, 1.0, resolution)
    return MetricField(
        alphas=box.alpha[0] + axis * (box.alpha[1] - box.alpha[0]),
        betas=box.beta[0] + axis * (box.beta[1] - box.beta[0]),
        metric=g,
        det=np.linalg.det(g),
        eig_max=eig[..., 1],
        eig_min=eig[..., 0],
        free_energy=f.reshape(resolution, resolution),
    )


# -- saving -------------------------------------------------------------------------------------------
def save_free_energy(net: FreeEnergyNet, path, metadata: dict[str, str] | None = None) -> None:
    """The network's weights as safetensors (width and depth in the metadata, with `metadata`)."""
    from safetensors.torch import save_file

    from flux_ir.io.atomic import atomic_path

    meta = {"format": "flux-ir free energy", "width": str(net.width), "depth": str(net.depth)}
    meta.update(metadata or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_free_energy(path, device: str | torch.device = "cpu") -> tuple[FreeEnergyNet, dict]:
    """(network in evaluation mode, metadata) from a file written by `save_free_energy`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != "flux-ir free energy":
        raise InvalidArgumentError(f"{{param}} {path} is not a flux-ir free-energy file", "path")
    net = FreeEnergyNet(int(meta["width"]), int(meta["depth"]))
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval().requires_grad_(False), meta


# -- checks -------------------------------------------------------------------------------------------
def _check_points(u: torch.Tensor, name: str) -> None:
    if u.ndim != 2 or u.shape[1] != 2:
        raise InvalidArgumentError(f"{{param}} must be [n, 2], got {tuple(u.shape)}", name)
    if not torch.isfinite(u).all():
        raise InvalidArgumentError("{param} must be finite", name)


def _check_resolution(r, name: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 2:
        raise InvalidArgumentError(f"{{param}} must be an integer >= 2, got {r!r}", name)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{{param}} must be a positive integer, got {value!r}", name)
