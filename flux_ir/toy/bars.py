"""Science bars of a flux-toy-like model: the lens against decoding x_k, phases read twice, settling.

    pipe, spec = load_pipeline("flux-toy")                  # or any model trained on the toy scenes
    opts = SamplingOptions.from_spec(spec)                  # 128², 16 steps, true CFG 2
    prompts = ["a red circle on a blue background"]
    lens = measure_lens(pipe, opts, prompts, steps=(8, 15), double_blocks=(), single_blocks=(7,))
    lens.table[["block", "step", "lens_mse", "latent_mse", "improvement"]]   # one row per (block, step)
    lens.summary["per_step"][8]["share_beating"]          # share of blocks closer than decoding x_8

Three measurements, each a pandas DataFrame plus a summary dict of plain numbers:

- `measure_lens`: at selected denoising steps, the mean squared pixel error (images in [0, 1]) between
  each block's x0 lens decode and the final image, against the null baseline of VAE-decoding the
  current latent x_k itself; per (block, step) the improvement over that baseline, per step the share
  of blocks that beat it and the Spearman correlation of the lens error with depth.
- `measure_phases`: a neutral-prompt grid swept by `flux_ir.sweep` (per-step x0 latents kept), class
  shares and the Lipschitz field's boundary / inside ratio (field of 4x4-pooled pixels, as
  `flux_ir.analysis` computes it) with classes read twice: by the checker from the pixels, and by a
  `LatentReader`, a small classifier of the final latents trained on labelled renders of the scenes
  (VAE-encoded), which never sees a pixel of the grid; shape-only, colour-only and background-only
  classes separately.
- `measure_settling`: per denoising step, the share of grid points whose x0 estimate at that step
  already shows the final image's background / colour / shape (checker on the decoded x0; the
  latent reader on the x0 latents as a second reading).

`measure_science` runs all three and writes tables and figures; `science_table` is its markdown.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from flux_ir.analysis.lipschitz import embedding_grid, lipschitz_edges, lipschitz_field
from flux_ir.capture import CaptureOptions, Selection, run_capture
from flux_ir.capture.select import parse_indices
from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import pack_latents
from flux_ir.io.atomic import write_text
from flux_ir.lens.blocks import block_steps, decode_capture
from flux_ir.lens.decode import decode_packed
from flux_ir.sampling import SamplingOptions
from flux_ir.sweep import GridSpec, SweepConfig, SweepStore, run_sweep
from flux_ir.toy.checker import NO_SHAPE, check_images
from flux_ir.toy.scenes import (
    COLOURS,
    NEUTRAL_CAPTION,
    SHAPES,
    caption,
    make_scenes,
    palette_tensor,
)

ATTRIBUTES = ("background", "colour", "shape")
IGNORE = -100  # label of an attribute a training render does not have (the colour of no shape)


# ----------------------------------------------------------------------------- readings


def read_images(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checker's reading of images [B, 3, H, W] in [0, 1]: background, colour, shape, each [B]
    (indices into COLOURS / SHAPES; shape and colour NO_SHAPE where no shape is found)."""
    found = check_images(images)
    colour = torch.where(found.shape == NO_SHAPE, NO_SHAPE, found.colour)
    return {"background": found.background, "colour": colour, "shape": found.shape}


def decode_latents(pipe: FluxPipeline, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """VAE-decode unpacked latents [B, 16, h, w] (the pipeline's scaled space) in batches: images
    [B, 3, 8h, 8w] float32 in [0, 1] on the CPU."""
    h, w = latents.shape[-2:]
    out = []
    for start in range(0, len(latents), batch):
        packed = pack_latents(latents[start : start + batch].float())
        out.append(decode_packed(pipe, packed, 8 * h, 8 * w, output_type="pt").float().cpu())
    return torch.cat(out)


@torch.inference_mode()
def encode_images(pipe: FluxPipeline, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> latents [B, 16, H/8, W/8] float32 on the CPU, in the space the
    transformer samples in: (posterior mode - shift) * scale."""
    cfg = pipe.vae.config
    device = next(pipe.vae.parameters()).device
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device, pipe.vae.dtype) * 2 - 1
        z = pipe.vae.encode(x).latent_dist.mode()
        out.append(((z.float() - cfg.shift_factor) * cfg.scaling_factor).cpu())
    return torch.cat(out)


class LatentReader(nn.Module):
    """A small convolutional classifier of latents [B, 16, h, w]: shape (SHAPES or none), colour and
    background. Global pooling after three convolutions makes it indifferent to where the object is.
    It reads a representation the grid's pixel field is not computed on."""

    def __init__(self, channels: int = 16, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GELU(),
        )
        self.sizes = {"shape": len(SHAPES) + 1, "colour": len(COLOURS), "background": len(COLOURS)}
        self.head = nn.Linear(4 * width, sum(self.sizes.values()))

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latents [B, C, h, w] -> logits per attribute, [B, classes]."""
        h = self.body(z)
        logits = self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))
        return dict(zip(self.sizes, logits.split(list(self.sizes.values()), dim=1)))

    @torch.no_grad()
    def read(self, z: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """Latents [B, C, h, w] -> background, colour, shape [B] as `read_images` reports them
        (shape and colour NO_SHAPE for "none")."""
        self.eval()
        parts = [self(z[i : i + batch].float()) for i in range(0, len(z), batch)]
        out = {k: torch.cat([p[k] for p in parts]).argmax(1) for k in self.sizes}
        none = out["shape"] == len(SHAPES)
        out["shape"] = torch.where(none, NO_SHAPE, out["shape"])
        out["colour"] = torch.where(none, NO_SHAPE, out["colour"])
        return {k: out[k] for k in ATTRIBUTES}


def labelled_renders(n: int, size: int, seed: int, plain_share: float = 0.125):
    """`n` labelled scene renders [n, 3, size, size] and labels {attribute: [n]}: scenes from
    `make_scenes`, of which a `plain_share` are replaced by a plain background (shape "none",
    colour IGNORE). Shape labels use len(SHAPES) for "none"."""
    s = make_scenes(n, size, seed=seed)
    images, shape, colour = s.images.clone(), s.shape.clone(), s.colour.clone()
    gen = torch.Generator().manual_seed(seed + 7919)
    plain = torch.rand(n, generator=gen) < plain_share
    bg = palette_tensor()[s.background[plain]]
    bg = (bg + (torch.rand(bg.shape, generator=gen) * 2 - 1) * 0.03).clamp(0, 1)
    images[plain] = bg[:, :, None, None].expand(-1, -1, size, size)
    shape[plain] = len(SHAPES)
    colour[plain] = IGNORE
    return images, {"background": s.background.clone(), "colour": colour, "shape": shape}


def train_latent_reader(
    pipe: FluxPipeline,
    *,
    n_train: int = 1024,
    n_test: int = 256,
    size: int | None = None,
    epochs: int = 30,
    seed: int = 0,
    noise: float = 0.05,
    progress: bool = False,
) -> tuple[LatentReader, dict]:
    """Train a `LatentReader` on `n_train` VAE-encoded renders (seeded; Gaussian noise of std `noise`
    added to the latents in training) and measure it on `n_test` held-out renders of another seed.
    Returns the reader (on the CPU, eval mode) and its held-out accuracy per attribute (colour over
    renders that have a shape) with the numbers of renders."""
    size = size or int(pipe.vae.config.sample_size)
    images, labels = labelled_renders(n_train, size, seed=10_000 + seed)
    z = encode_images(pipe, images)
    test_images, test_labels = labelled_renders(n_test, size, seed=20_000 + seed)
    z_test = encode_images(pipe, test_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reader = LatentReader(channels=z.shape[1])
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
        steps_per_epoch = math.ceil(n_train / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=2e-3, total_steps=epochs * steps_per_epoch
        )
        reader.train()
        for _ in tqdm(range(epochs), desc="latent reader", unit="epoch", disable=not progress):
            order = torch.randperm(n_train, generator=gen)
            for start in range(0, n_train, 64):
                idx = order[start : start + 64]
                x = z[idx] + noise * torch.randn(z[idx].shape, generator=gen)
                logits = reader(x)
                loss = sum(
                    F.cross_entropy(logits[k], labels[k][idx], ignore_index=IGNORE)
                    for k in ATTRIBUTES
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    reader.eval()
    found = reader.read(z_test)
    want = dict(test_labels)
    want["shape"] = torch.where(want["shape"] == len(SHAPES), NO_SHAPE, want["shape"])
    has_colour = want["colour"] != IGNORE
    accuracy = {
        "background": (found["background"] == want["background"]).float().mean().item(),
        "colour": (found["colour"] == want["colour"])[has_colour].float().mean().item(),
        "shape": (found["shape"] == want["shape"]).float().mean().item(),
        "n_train": n_train,
        "n_test": n_test,
    }
    return reader, accuracy


# ----------------------------------------------------------------------------- lens


@dataclass
class LensReport:
    """`per_prompt`: one row per (prompt, block, step); `table`: one row per (block, step), means
    over prompts; `summary`: plain numbers (see `measure_lens`)."""

    per_prompt: pd.DataFrame
    table: pd.DataFrame
    summary: dict


def lens_prompts(n: int) -> list[str]:
    """`n` full captions cycling through shapes, colours and backgrounds, the background always
    another colour than the object (deterministic).

    >>> lens_prompts(8)[-1]
    'a green square on a yellow background'
    """
    k = len(COLOURS)
    return [
        caption(SHAPES[i % len(SHAPES)], COLOURS[i % k], COLOURS[(i + 1 + (i // k) % (k - 1)) % k])
        for i in range(n)
    ]


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties; nan when either side is constant)."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    return float(x.rank().corr(y.rank()))


def default_lens_steps(num_steps: int) -> list[int]:
    """Steps from a quarter of the run to its end, every num_steps/8-th, and the last step.

    >>> default_lens_steps(16)
    [4, 6, 8, 10, 12, 14, 15]
    """
    return sorted(
        set(range(num_steps // 4, num_steps - 1, max(1, num_steps // 8))) | {num_steps - 1}
    )


def resolve_steps(steps, num_steps: int, param: str = "steps") -> list[int]:
    """Denoising steps (negative: from the end; None: all; text such as "4-8,15" as a capture
    selection reads it) -> sorted distinct steps in [0, num_steps).

    >>> resolve_steps("4-6,-1", 16)
    [4, 5, 6, 15]
    >>> resolve_steps((3, 16), 16)
    Traceback (most recent call last):
    ...
    flux_ir.errors.InvalidArgumentError: steps must lie in [-16, 16) for 16 steps, got 16
    """
    steps = parse_indices(steps, param)
    if steps is None:
        return list(range(num_steps))
    if not steps:
        raise InvalidArgumentError("{param} must name at least one step", param)
    out = []
    for s in steps:
        k = s + num_steps if s < 0 else s
        if not 0 <= k < num_steps:
            raise InvalidArgumentError(
                f"{{param}} must lie in [-{num_steps}, {num_steps}) for {num_steps} steps, got {s}",
                param,
            )
        out.append(k)
    return sorted(set(out))


def previous_x0(ctx: dict, k: int) -> torch.Tensor:
    """The whole model's x0 estimate of step k - 1 [B, N, 64], from the latents alone: the Euler step
    x_k = x_{k-1} + (s_k - s_{k-1}) v gives v, and x0 = x_{k-1} - s_{k-1} v (float32; with true CFG
    v is the guided velocity)."""
    x_prev, x = (ctx["img_state"][j].float() for j in (k - 1, k))
    s_prev, s = (torch.tensor(float(ctx["timestep_pairs"][j][0])) for j in (k - 1, k))
    v = (x - x_prev) / (s - s_prev)
    return x_prev - s_prev * v


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image: [B, ...] x [B, ...] -> [B] (float64)."""
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


@torch.inference_mode()
def measure_lens(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    prompts: list[str],
    *,
    steps=None,
    seed: int = 0,
    model_name: str = "unknown",
    double_blocks: tuple[int, ...] | None = None,
    single_blocks: tuple[int, ...] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> LensReport:
    """Per prompt (seed `seed + i`), sample with `opts` (true CFG included: the lens combines both
    passes as the sampler does) while capturing every block's image tokens at `steps` (None:
    `default_lens_steps`); decode every
    block's x0 lens and, as the baseline, the current latent x_k itself (unpacked, VAE-decoded, no
    model call); score both by the MSE to the final image (the decode of the final latents, float).

    `improvement` = latent_mse - lens_mse (positive: the block is closer to the final image than x_k
    is), `relative` = improvement / latent_mse. A stronger baseline sits beside it: `prev_x0_mse`,
    the whole model's x0 estimate one step earlier (what the sampler already knew; nan at step 0). Summary per step: the baseline's MSE, the share of
    blocks whose mean lens MSE beats it, the mean relative improvement, the mean over prompts of the
    Spearman correlation of lens MSE with depth (negative: deeper blocks are closer), and the same
    over the "middle" steps (from num_steps/4 up to 3 num_steps/4). `double_blocks` and
    `single_blocks` (None: all) pick blocks; depth is the block's place in the model (double blocks
    first).
    """
    if not prompts:
        raise InvalidArgumentError("{param} must name at least one prompt", "prompts")
    ks = (
        default_lens_steps(opts.num_steps)
        if steps is None
        else resolve_steps(steps, opts.num_steps)
    )
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="lens", unit="prompt", disable=not progress)):
        sampling = replace(opts, prompt=prompt)
        _, cap = run_capture(
            pipe,
            CaptureOptions(sampling, seed + i),
            model_name=model_name,
            selection=Selection(double_blocks, single_blocks, tuple(ks), streams="img"),
            progress=False,
        )
        ctx, h, w = cap.denoising_context, sampling.height, sampling.width
        prev = [k for k in ks if k > 0]
        latents = torch.cat(
            [ctx["final_latents"]]
            + [ctx["img_state"][k] for k in ks]
            + [previous_x0(ctx, k) for k in prev]
        )
        decoded = decode_packed(pipe, latents, h, w, output_type="pt").float().cpu()
        final, rest = decoded[:1], decoded[1:]
        errors = mse(rest, final.expand_as(rest)).tolist()
        baseline = dict(zip(ks, errors[: len(ks)]))
        prev_error = dict(zip(prev, errors[len(ks) :]))
        items = block_steps(cap, steps=ks)
        n_double = len(pipe.transformer.transformer_blocks)
        for item, image in decode_capture(
            pipe, cap, items, "x0", batch_size, progress=False, output_type="pt"
        ):
            lens = mse(image.float().cpu(), final).item()
            rows.append(
                dict(
                    prompt_index=i,
                    prompt=prompt,
                    seed=seed + i,
                    block=f"{item.kind} {item.index}",
                    kind=item.kind,
                    index=item.index,
                    depth=item.index + (n_double if item.kind == "single" else 0),
                    step=item.step,
                    sigma=float(ctx["timestep_pairs"][item.step][0]),
                    lens_mse=lens,
                    latent_mse=baseline[item.step],
                    prev_x0_mse=prev_error.get(item.step, float("nan")),
                )
            )
    per_prompt = pd.DataFrame(rows)
    per_prompt["improvement"] = per_prompt.latent_mse - per_prompt.lens_mse
    per_prompt["relative"] = per_prompt.improvement / per_prompt.latent_mse
    per_prompt["beats"] = per_prompt.improvement > 0
    keys = ["block", "kind", "index", "depth", "step", "sigma"]
    table = (
        per_prompt.groupby(keys, sort=False)[
            ["lens_mse", "latent_mse", "prev_x0_mse", "improvement", "relative", "beats"]
        ]
        .mean()
        .rename(columns={"beats": "share_prompts_beating"})
        .reset_index()
        .sort_values(["step", "depth"], ignore_index=True)
    )
    table["beats"] = table.lens_mse < table.latent_mse
    table["beats_prev_x0"] = table.lens_mse < table.prev_x0_mse
    summary = lens_summary(per_prompt, table, opts.num_steps)
    summary["sigmas"] = [float(s) for s in cap.metadata["sigmas"]]  # the schedule, steps + 1
    return LensReport(per_prompt, table, summary)


def lens_summary(per_prompt: pd.DataFrame, table: pd.DataFrame, num_steps: int) -> dict:
    """Per step and over the middle steps: see `measure_lens`."""
    per_step = {}
    for step, part in table.groupby("step"):
        rho = [
            spearman(p.depth, p.lens_mse)
            for _, p in per_prompt[per_prompt.step == step].groupby("prompt_index")
        ]
        last = part[part.depth == part.depth.max()].iloc[0]
        per_step[int(step)] = dict(
            sigma=float(part.sigma.iloc[0]),
            latent_mse=float(part.latent_mse.iloc[0]),
            prev_x0_mse=float(part.prev_x0_mse.iloc[0]),
            share_beating=float(part.beats.mean()),
            blocks_beating=int(part.beats.sum()),
            blocks_beating_prev_x0=int(part.beats_prev_x0.sum()),
            blocks=len(part),
            mean_relative=float(part.relative.mean()),
            last_block_lens_mse=float(last.lens_mse),
            best_block=str(part.loc[part.lens_mse.idxmin(), "block"]),
            spearman_depth=float(np.nanmean(rho)) if len(rho) else float("nan"),
            spearman_depth_of_means=spearman(part.depth, part.lens_mse),
        )
    mid = [s for s in per_step if num_steps / 4 <= s < 3 * num_steps / 4]
    in_mid = table.step.isin(mid)
    return dict(
        prompts=int(per_prompt.prompt_index.nunique()),
        steps=sorted(per_step),
        mid_steps=mid,
        per_step=per_step,
        mid_share_beating=float(table[in_mid].beats.mean()) if mid else float("nan"),
        mid_share_beating_prev_x0=float(table[in_mid].beats_prev_x0.mean())
        if mid
        else float("nan"),
        mid_spearman_depth=float(np.mean([per_step[s]["spearman_depth"] for s in mid]))
        if mid
        else float("nan"),
        mid_mean_relative=float(table[in_mid].relative.mean()) if mid else float("nan"),
        share_beating=float(table.beats.mean()),
    )


# ----------------------------------------------------------------------------- phases


@dataclass
class PhaseReport:
    """`points`: one row per grid point (row, col, alpha, beta, the checker's and the reader's
    readings, the Lipschitz value); `summary`: shares, ratios; `store`: the sweep directory."""

    points: pd.DataFrame
    summary: dict
    store: SweepStore
    cfg: SweepConfig


def neutral_sweep_config(
    opts: SamplingOptions,
    grid: int,
    *,
    model_name: str = "unknown",
    seeds: tuple[int, int, int] = (0, 1, 2),
    span: tuple[float, float] = (-0.5, 1.5),
) -> SweepConfig:
    """The neutral-prompt grid: prompt "", z = z0 + a (z1 - z0) + b (z2 - z0) for a, b in `span`
    (`grid` points each), annulus normalisation. One pass per step: with the prompt equal to the
    negative prompt, true CFG's v_u + s (v_c - v_u) is v_c exactly, so the images are the same."""
    spec = GridSpec(alpha=span, beta=span, n_alpha=grid, n_beta=grid, normalisation="annulus")
    sampling = replace(opts, prompt=NEUTRAL_CAPTION, true_cfg_scale=1.0)
    return SweepConfig(model=model_name, sampling=sampling, grid=spec, seeds=seeds)


def boundary_ratio(lip: np.ndarray, classes: np.ndarray) -> dict:
    """Mean Lipschitz value on boundary cells (a 4-neighbour of another class) over that on inside
    cells; lip and classes [n_alpha, n_beta]."""
    classes = np.asarray(classes)
    boundary = np.zeros(classes.shape, dtype=bool)
    for axis in (0, 1):
        differ = np.diff(classes, axis=axis) != 0
        lo = [slice(None), slice(None)]
        hi = [slice(None), slice(None)]
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        boundary[tuple(lo)] |= differ
        boundary[tuple(hi)] |= differ
    edge = float(np.nanmean(lip[boundary])) if boundary.any() else float("nan")
    inside = float(np.nanmean(lip[~boundary])) if (~boundary).any() else float("nan")
    return dict(
        boundary=edge,
        inside=inside,
        ratio=edge / inside if inside > 0 else float("nan"),
        boundary_share=float(boundary.mean()),
    )


def class_shares(values, names: dict[int, str]) -> dict[str, float]:
    """Share of each class name among `values` (every name listed; shares sum to 1)."""
    values = np.asarray(values)
    return {name: float((values == k).mean()) for k, name in names.items()}


SHAPE_NAMES = {NO_SHAPE: "none", **dict(enumerate(SHAPES))}
COLOUR_NAMES = {NO_SHAPE: "none", **dict(enumerate(COLOURS))}


def measure_phases(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    out_dir,
    *,
    grid: int = 20,
    reader: LatentReader | None = None,
    model_name: str = "unknown",
    seeds: tuple[int, int, int] = (0, 1, 2),
    span: tuple[float, float] = (-0.5, 1.5),
    batch_size: int = 16,
    progress: bool = False,
) -> PhaseReport:
    """Sweep the neutral-prompt grid into `out_dir` (resumed if it is there, per-step x0 latents
    kept), read every final image with the checker and, given a `reader`, every final latent with
    it; the Lipschitz field of 4x4-pooled pixels; class shares and boundary / inside ratios per
    reading and attribute ("scene": background, colour and shape together)."""
    cfg = neutral_sweep_config(opts, grid, model_name=model_name, seeds=seeds, span=span)
    result = run_sweep(pipe, cfg, out_dir, batch_size=batch_size, phase_pool=1, progress=progress)
    store = result.store
    points = cfg.grid.points()
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(store.images / p.file).convert("RGB")))
            for p in points
        ]
    )
    images = images.permute(0, 3, 1, 2).float() / 255  # [P, 3, H, W]
    finals = torch.stack([torch.from_numpy(store.load_phases(p)[-1]).float() for p in points])
    rows, cols = [p.row for p in points], [p.col for p in points]
    emb = F.avg_pool2d(images, 4).flatten(1).double().numpy()
    d_alpha, d_beta = cfg.grid.spacing
    lip = lipschitz_field(
        lipschitz_edges(embedding_grid(emb, rows, cols, grid, grid), *cfg.grid.spacing)
    )
    table = pd.DataFrame(
        dict(
            index=[p.index for p in points],
            row=rows,
            col=cols,
            alpha=[p.alpha for p in points],
            beta=[p.beta for p in points],
            lipschitz=lip[rows, cols],
        )
    )
    readings = {"checker": read_images(images)}
    if reader is not None:
        readings["latent"] = reader.read(finals)
    summary: dict = dict(grid=grid, points=len(points), d_alpha=d_alpha, d_beta=d_beta)
    for source, found in readings.items():
        for k in ATTRIBUTES:
            table[f"{source}_{k}"] = found[k].numpy()
        grids = {k: np.full((grid, grid), 0) for k in ATTRIBUTES}
        for k in ATTRIBUTES:
            grids[k][rows, cols] = found[k].numpy()
        scene = grids["shape"] * 100 + grids["colour"] * 10 + grids["background"]
        summary[source] = dict(
            shares=dict(
                shape=class_shares(found["shape"], SHAPE_NAMES),
                colour=class_shares(found["colour"], COLOUR_NAMES),
                background=class_shares(found["background"], dict(enumerate(COLOURS))),
            ),
            lipschitz={
                "scene": boundary_ratio(lip, scene),
                **{k: boundary_ratio(lip, grids[k]) for k in ATTRIBUTES},
            },
        )
    if reader is not None:
        summary["agreement"] = {
            k: float((table[f"checker_{k}"] == table[f"latent_{k}"]).mean()) for k in ATTRIBUTES
        }
    return PhaseReport(table, summary, store, cfg)


# ----------------------------------------------------------------------------- settling


@dataclass
class SettlingReport:
    """`table`: one row per (reader, attribute, step) with the share of points whose reading of that
    step's x0 equals the final reading (`same`) and the share for which it does so from that step
    on (`settled`); `per_point`: the readings per (point, step)."""

    table: pd.DataFrame
    per_point: pd.DataFrame


@torch.inference_mode()
def measure_settling(
    pipe: FluxPipeline,
    phases: PhaseReport,
    *,
    points: int | None = 64,
    reader: LatentReader | None = None,
    sigmas: list[float] | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> SettlingReport:
    """For `points` grid points of `phases` (evenly spread; None: all), decode the x0 estimate of
    every step and read it with the checker; with a `reader`, also read the x0 latents of every step
    of every point. A step's reading is compared with the same reader's reading of the last step's x0
    (the final latents as the sweep kept them, float16), so that a reader's own jitter between
    the kept latents and the saved image does not count as unsettled; `image` holds the checker's
    reading of the saved image beside it. `sigmas` (the schedule, e.g. a capture's
    metadata["sigmas"]) adds each step's noise level to the table."""
    table = phases.points
    store = phases.store
    by_index = {p.index: p for p in phases.cfg.grid.points()}
    all_idx = table["index"].tolist()
    if points is None or points >= len(all_idx):
        chosen = all_idx
    else:
        pick = np.linspace(0, len(all_idx) - 1, points).round().astype(int)
        chosen = [all_idx[i] for i in sorted(set(pick.tolist()))]
    x0 = {i: torch.from_numpy(store.load_phases(by_index[i])).float() for i in all_idx}
    n_steps = next(iter(x0.values())).shape[0]
    rows = []
    image = table.set_index("index")
    bar = tqdm(total=n_steps, desc="settling", unit="step", disable=not progress)
    for step in range(n_steps):
        lat = torch.stack([x0[i][step] for i in chosen])
        found = read_images(decode_latents(pipe, lat, batch_size))
        for j, i in enumerate(chosen):
            rows += [
                dict(reader="checker", index=i, step=step, attribute=k,
                     value=int(found[k][j]), image=int(image.at[i, f"checker_{k}"]))
                for k in ATTRIBUTES
            ]  # fmt: skip
        if reader is not None:
            found = reader.read(torch.stack([x0[i][step] for i in all_idx]))
            for j, i in enumerate(all_idx):
                rows += [
                    dict(reader="latent", index=i, step=step, attribute=k,
                         value=int(found[k][j]), image=-2)
                    for k in ATTRIBUTES
                ]  # fmt: skip
        bar.update(1)
    bar.close()
    per_point = pd.DataFrame(rows)
    per_point = per_point.sort_values(["reader", "attribute", "index", "step"], ignore_index=True)
    per_point["final"] = per_point.groupby(["reader", "attribute", "index"])["value"].transform(
        "last"
    )
    per_point["same"] = per_point.value == per_point.final
    # settled at step k: the same at k and at every later step
    later = per_point.groupby(["reader", "attribute", "index"])["same"]
    per_point["settled"] = later.transform(lambda s: s[::-1].cummin()[::-1]).astype(bool)
    out = (
        per_point.groupby(["reader", "attribute", "step"])[["same", "settled"]].mean().reset_index()
    )
    out["points"] = per_point.groupby(["reader", "attribute", "step"]).size().values
    checker = per_point[(per_point.reader == "checker") & (per_point.step == n_steps - 1)]
    out["final_reads_as_image"] = out.attribute.map(
        (checker.value == checker.image).groupby(checker.attribute).mean()
    ).where(out.reader == "checker")
    if sigmas is not None and len(sigmas) >= n_steps:
        out["sigma"] = [sigmas[s] for s in out.step]
    return SettlingReport(out, per_point)


def settling_summary(report: SettlingReport, levels=(0.5, 0.9)) -> dict:
    """Per reader and attribute: the first step at which the `settled` share reaches each level,
    and the `same` / `settled` shares at each step."""
    out: dict = {}
    for (source, attribute), part in report.table.groupby(["reader", "attribute"]):
        part = part.sort_values("step")
        first = {}
        for level in levels:
            hit = part[part.settled >= level]
            first[f"settled_{level:.0%}_at_step"] = int(hit.step.iloc[0]) if len(hit) else None
        out.setdefault(source, {})[attribute] = dict(
            points=int(part.points.iloc[0]),
            **first,
            **(
                {"final_reads_as_image": float(part.final_reads_as_image.iloc[0])}
                if source == "checker" and "final_reads_as_image" in part
                else {}
            ),
            same=[round(float(v), 4) for v in part.same],
            settled=[round(float(v), 4) for v in part.settled],
        )
    return out


# ----------------------------------------------------------------------------- all of it


def measure_science(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    out_dir,
    *,
    model_name: str = "unknown",
    lens_prompts_n: int = 32,
    lens_steps=None,
    grid: int = 20,
    settle_points: int | None = 64,
    reader_train: int = 1024,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Every science bar; writes into `out_dir`: lens.csv (per block and step), lens_prompts.csv,
    phases.csv (per grid point), settling.csv, science.json (the summary), the figures
    settling.png and lens_baseline.png, and the neutral grid's sweep (neutral_grid/).
    Returns the summary dict."""
    from flux_ir.plots.toy import plot_lens_baseline, plot_settling

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = tqdm.write if progress else (lambda _: None)
    say(f"science: lens against decoding x_k, {lens_prompts_n} prompts ...")
    lens = measure_lens(
        pipe, opts, lens_prompts(lens_prompts_n), steps=lens_steps, model_name=model_name,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    say(f"science: latent reader on {reader_train} VAE-encoded renders ...")
    reader, accuracy = train_latent_reader(pipe, n_train=reader_train, progress=progress)
    say(f"science: {grid}x{grid} neutral-prompt grid ...")
    phases = measure_phases(
        pipe, opts, out / "neutral_grid", grid=grid, reader=reader, model_name=model_name,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    say(f"science: settling over denoising, {settle_points or 'all'} points decoded ...")
    settling = measure_settling(
        pipe, phases, points=settle_points, reader=reader, sigmas=lens.summary["sigmas"],
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    summary = dict(
        model=model_name,
        lens=lens.summary,
        reader_accuracy=accuracy,
        phases=phases.summary,
        settling=settling_summary(settling),
    )
    write_text(out / "lens.csv", lens.table.to_csv(index=False))
    write_text(out / "lens_prompts.csv", lens.per_prompt.to_csv(index=False))
    write_text(out / "phases.csv", phases.points.to_csv(index=False))
    write_text(out / "settling.csv", settling.table.to_csv(index=False))
    write_text(out / "science.json", json.dumps(summary, indent=1))
    title = f"{model_name}, {grid}x{grid} neutral-prompt grid"
    plot_settling(settling.table, out / "settling.png", title=title)
    plot_lens_baseline(lens.table, out / "lens_baseline.png", title=model_name)
    return summary


def science_table(summary: dict) -> str:
    """Markdown tables of a `measure_science` summary."""
    lens = summary["lens"]
    lines = [
        f"**Lens against decoding x_k** ({lens['prompts']} prompts; MSE of pixels in [0, 1] to the "
        "final image)",
        "",
        "| step | sigma | MSE of decoding x_k | blocks beating it | mean relative improvement "
        "| MSE of the previous step's x0 | blocks beating that | last block's MSE "
        "| Spearman(depth, lens MSE) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for step, s in lens["per_step"].items():
        lines.append(
            f"| {step} | {s['sigma']:.3f} | {s['latent_mse']:.2e} | {s['blocks_beating']}/{s['blocks']} "
            f"| {s['mean_relative']:+.1%} | {s['prev_x0_mse']:.2e} "
            f"| {s['blocks_beating_prev_x0']}/{s['blocks']} | {s['last_block_lens_mse']:.2e} "
            f"| {s['spearman_depth']:+.3f} |"
        )
    lines += [
        "",
        f"Middle steps {lens['mid_steps']}: {lens['mid_share_beating']:.0%} of (block, step) pairs "
        f"beat decoding x_k, {lens['mid_share_beating_prev_x0']:.0%} the previous step's x0; "
        f"mean Spearman {lens['mid_spearman_depth']:+.3f}.",
        "",
    ]
    acc = summary["reader_accuracy"]
    lines += [
        f"**Phases** ({summary['phases']['grid']}x{summary['phases']['grid']} neutral-prompt grid). "
        f"Latent reader held-out accuracy ({acc['n_test']} renders): shape {acc['shape']:.1%}, "
        f"colour {acc['colour']:.1%}, background {acc['background']:.1%}.",
        "",
        "| reading | shape shares | Lipschitz boundary/inside: shape | colour | background "
        "| scene |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for source in ("checker", "latent"):
        if source not in summary["phases"]:
            continue
        ph = summary["phases"][source]
        shares = ", ".join(f"{k} {v:.0%}" for k, v in ph["shares"]["shape"].items())
        r = {k: v["ratio"] for k, v in ph["lipschitz"].items()}
        lines.append(
            f"| {source} | {shares} | {r['shape']:.2f} | {r['colour']:.2f} | "
            f"{r['background']:.2f} | {r['scene']:.2f} |"
        )
    if "agreement" in summary["phases"]:
        agree = ", ".join(f"{k} {v:.0%}" for k, v in summary["phases"]["agreement"].items())
        lines += ["", f"Checker and latent reader agree on: {agree}."]
    lines += [
        "",
        "**Settling** (first step whose x0 shows the final reading, from then on, for 50% / 90% "
        "of points)",
        "",
        "| reading | attribute | points | 50% settled at step | 90% settled at step "
        "| last x0 read as the saved image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for source, attrs in summary["settling"].items():
        for k, v in attrs.items():
            same = v.get("final_reads_as_image")
            lines.append(
                f"| {source} | {k} | {v['points']} | {v['settled_50%_at_step']} "
                f"| {v['settled_90%_at_step']} | {'' if same is None else f'{same:.0%}'} |"
            )
    return "\n".join(lines)
