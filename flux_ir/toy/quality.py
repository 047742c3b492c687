"""flux-toy's quality bars, measured: VAE fidelity, prompt adherence, lens convergence, phases, speed.

    pipe, spec = load_pipeline("flux-toy", device="cpu")
    report = measure_all(pipe, spec)          # dict of figures, each with its bar and pass flag

Bars: VAE PSNR >= 28 dB on held-out scenes; the checker finds the asked colour in >= 90% and the
asked shape in >= 80% of 200 samples; over blocks in depth order the distance of a block's x0 lens
decode (last step) to the final image falls (Spearman >= 0.8 on average); a 20x20 neutral-prompt grid
has >= 2 shape classes with >= 10% of the cells each and a Lipschitz field >= 2x higher at class
boundaries than inside; one 128x128 image in <= 2 s on 2 CPU threads.

Samples and the CPU timing use the model's default sampling (`ModelSpec.true_cfg_scale`: flux-toy
samples with true CFG 2.0 against the empty prompt); the lens check runs one conditional pass per step
(no CFG), so that the last block's decode is the image itself; the neutral-prompt grid needs no CFG.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from flux_ir.analysis.lipschitz import embedding_grid, lipschitz_edges, lipschitz_field
from flux_ir.capture import CaptureOptions, Selection, run_capture
from flux_ir.geometry import pack_latents
from flux_ir.lens.blocks import block_steps, decode_capture
from flux_ir.models.registry import ModelSpec
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.sweep.grid import GridSpec, grid_latents, vertex_latents
from flux_ir.toy.checker import NO_SHAPE, check_images
from flux_ir.toy.scenes import COLOURS, NEUTRAL_CAPTION, SHAPES, caption
from flux_ir.toy.train import vae_psnr

BARS = dict(
    vae_psnr_db=28.0,
    colour_accuracy=0.90,
    shape_accuracy=0.80,
    lens_spearman=0.80,
    phase_min_share=0.10,
    lipschitz_ratio=2.0,
    cpu_seconds=2.0,
)


def device_of(pipe: FluxPipeline) -> torch.device:
    return torch.device(pipe._execution_device)


def generate_images(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    prompts: list[str],
    seeds: list[int],
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] on the CPU, one per prompt, sampled as `opts` says (its true
    CFG included); noise from one CPU generator per seed (or packed `latents` [B, N, 64])."""
    out = generate(pipe, opts, prompts=prompts, seed=seeds, latents=latents, output_type="pt")
    return out.images.float().cpu()


def prompt_adherence(
    pipe: FluxPipeline, opts: SamplingOptions, n: int = 200, *, batch: int = 50, seed: int = 0
) -> dict:
    """Share of `n` samples of random full captions whose asked colour / shape the checker finds
    (sampled as `opts` says, with its true CFG)."""
    rng = random.Random(seed)
    asked = []
    for _ in range(n):
        s, c = rng.randrange(len(SHAPES)), rng.randrange(len(COLOURS))
        b = rng.choice([k for k in range(len(COLOURS)) if k != c])
        asked.append((s, c, b))
    shape_ok = colour_ok = bg_ok = 0
    for start in range(0, n, batch):
        chunk = asked[start : start + batch]
        prompts = [caption(SHAPES[s], COLOURS[c], COLOURS[b]) for s, c, b in chunk]
        seeds = list(range(seed * 100_000 + start, seed * 100_000 + start + len(chunk)))
        images = generate_images(pipe, opts, prompts, seeds)
        found = check_images(images)
        want = torch.tensor(chunk)
        shape_ok += (found.shape == want[:, 0]).sum().item()
        colour_ok += (found.colour == want[:, 1]).sum().item()
        bg_ok += (found.background == want[:, 2]).sum().item()
    return dict(
        shape_accuracy=shape_ok / n, colour_accuracy=colour_ok / n, background_accuracy=bg_ok / n
    )


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by order)."""
    rx = x.argsort().argsort().float()
    ry = y.argsort().argsort().float()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm()).clamp(min=1e-12)).item()


def lens_convergence(
    pipe: FluxPipeline, opts: SamplingOptions, prompts: list[str], *, seed: int = 0
) -> dict:
    """Per prompt: -Spearman(depth, distance of the block's x0 decode at the last step to the final
    image). 1 means the distance falls strictly with depth. Sampled without true CFG (one pass per
    step), so that the last block's decode is the image itself."""
    values, distances = [], []
    last = Selection(steps=(-1,))
    for i, prompt in enumerate(prompts):
        sampling = replace(opts, prompt=prompt, true_cfg_scale=1.0)
        images, cap = run_capture(
            pipe, CaptureOptions(sampling, seed + i), selection=last, progress=False
        )
        final = _pixels(images[0])
        items = block_steps(cap)
        dist = torch.tensor(
            [
                (_pixels(ims[0]) - final).abs().mean().item()
                for _, ims in decode_capture(pipe, cap, items, target="x0", progress=False)
            ]
        )
        values.append(-spearman(torch.arange(len(dist)).float(), dist))
        distances.append(dist.tolist())
    return dict(
        lens_spearman=sum(values) / len(values),
        lens_spearman_per_prompt=values,
        lens_distances=distances,  # per prompt, per block in depth order: mean |pixel| difference
    )


def _pixels(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype="float32") / 255.0)


def phase_grid(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    grid: int = 20,
    *,
    anchor_seeds: tuple[int, int, int] = (0, 1, 2),
    span: tuple[float, float] = (-0.5, 1.5),
    batch: int = 50,
) -> dict:
    """Neutral-prompt sweep over z = z0 + a (z1 - z0) + b (z2 - z0) on a `grid` x `grid` grid, built
    and renormalised to the Gaussian annulus by `flux_ir.sweep`, Lipschitz field by `flux_ir.analysis`
    (4x4-pooled pixels as the embedding, finite differences over the alpha/beta spacing).

    Returns the class share per shape (checker classes, "none" for no shape), and the mean Lipschitz
    value on boundary cells over that on interior cells, where the class is the scene the checker
    reads (shape, colour, background); `shape_only` gives the same with shape classes alone.
    """
    spec = GridSpec(alpha=span, beta=span, n_alpha=grid, n_beta=grid, normalisation="annulus")
    points = spec.points()
    neutral = replace(opts, prompt=NEUTRAL_CAPTION, true_cfg_scale=1.0)
    vertices = vertex_latents(anchor_seeds, neutral.height, neutral.width)
    z, _, _ = grid_latents(vertices, spec, points)
    packed = pack_latents(z)
    images = []
    for start in range(0, len(packed), batch):
        chunk = packed[start : start + batch].to(device_of(pipe), pipe.transformer.dtype)
        images.append(
            generate_images(pipe, neutral, [NEUTRAL_CAPTION] * len(chunk), [0] * len(chunk), chunk)
        )
    images = torch.cat(images)
    rows, cols = [p.row for p in points], [p.col for p in points]
    found = check_images(images)
    classes = torch.zeros(grid, grid, dtype=torch.long)
    scene = torch.zeros(grid, grid, dtype=torch.long)  # shape, colour and background as read
    classes[rows, cols] = found.shape
    scene[rows, cols] = found.shape * 100 + found.colour * 10 + found.background
    emb = F.avg_pool2d(images, 4).flatten(1).double().numpy()
    d_alpha, d_beta = spec.spacing
    field = lipschitz_field(
        lipschitz_edges(embedding_grid(emb, rows, cols, grid, grid), d_alpha, d_beta)
    )
    lip = torch.from_numpy(field)
    names = {NO_SHAPE: "none", **dict(enumerate(SHAPES))}
    share = {names[k]: (classes == k).float().mean().item() for k in names}
    return dict(
        class_share=share,
        classes_over_min_share=sum(v >= BARS["phase_min_share"] for v in share.values()),
        **boundary_ratio(lip, scene),
        shape_only=boundary_ratio(lip, classes),
        class_grid=classes.tolist(),
    )


def boundary_ratio(lip: torch.Tensor, classes: torch.Tensor) -> dict:
    """Mean Lipschitz value on boundary cells (a 4-neighbour of another class) / inside cells."""
    g = classes.shape[0]
    boundary = torch.zeros(g, g, dtype=torch.bool)
    for dy, dx in ((0, 1), (1, 0)):
        a, b = (slice(0, g - dy), slice(0, g - dx)), (slice(dy, g), slice(dx, g))
        differ = classes[a] != classes[b]
        boundary[a] |= differ
        boundary[b] |= differ
    inside = lip[~boundary].mean().item() if (~boundary).any() else float("nan")
    edge = lip[boundary].mean().item() if boundary.any() else float("nan")
    return dict(
        lipschitz_boundary=edge,
        lipschitz_inside=inside,
        lipschitz_ratio=edge / inside if inside > 0 else float("nan"),
        boundary_share=boundary.float().mean().item(),
    )


def cpu_seconds(pipe: FluxPipeline, opts: SamplingOptions, *, threads: int = 2) -> float:
    """Seconds for one image sampled as `opts` says on `threads` CPU threads (after one warm-up)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generate_images(pipe, opts, ["a red circle on a blue background"], [0])
        t0 = time.perf_counter()
        generate_images(pipe, opts, ["a green triangle on a white background"], [1])
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)


def measure_all(
    pipe: FluxPipeline,
    spec: ModelSpec,
    *,
    samples: int = 200,
    grid: int = 20,
    lens_prompts: int = 8,
    batch: int = 50,
    skip_cpu: bool = False,
    progress: bool = True,
) -> dict:
    """Every bar: figures plus `passed` flags, sampled with the model's defaults (`spec`). Runs where
    `pipe` is; the CPU timing moves the pipeline to the CPU. `progress` names each stage as it starts."""
    size = int(pipe.vae.config.sample_size)  # the architecture's native size
    opts = SamplingOptions.from_spec(spec, width=size, height=size)
    report: dict = dict(model=spec.name, size=size, steps=opts.num_steps)
    prompts = [
        caption(SHAPES[i % 3], COLOURS[i % 6], COLOURS[(i + 1 + i // 6) % 6])
        for i in range(lens_prompts)
    ]
    stages = [
        ("VAE PSNR on 512 held-out scenes", lambda: {
            "vae_psnr_db": vae_psnr(pipe, 512, size, seed=12345, device=device_of(pipe))
        }),
        (f"adherence on {samples} samples", lambda: {
            "true_cfg_scale": opts.true_cfg_scale, "negative_prompt": opts.negative_prompt,
            **prompt_adherence(pipe, opts, samples, batch=batch),
        }),
        (f"lens convergence on {lens_prompts} prompts", lambda: lens_convergence(pipe, opts, prompts)),
        (f"{grid}x{grid} neutral-prompt grid", lambda: {
            "phases": phase_grid(pipe, opts, grid, batch=batch)
        }),
    ]  # fmt: skip
    if not skip_cpu:
        stages.append(
            ("CPU time of one image", lambda: {"cpu_seconds": cpu_seconds(pipe.to("cpu"), opts)})
        )
    for name, measure in tqdm(stages, desc="quality bars", unit="bar", disable=not progress):
        if progress:
            tqdm.write(f"measuring {name} ...")
        report.update(measure())
    report["passed"] = passed(report)
    return report


def passed(report: dict) -> dict:
    """Which bars a report meets."""
    out = {
        "vae_psnr_db": report["vae_psnr_db"] >= BARS["vae_psnr_db"],
        "colour_accuracy": report["colour_accuracy"] >= BARS["colour_accuracy"],
        "shape_accuracy": report["shape_accuracy"] >= BARS["shape_accuracy"],
        "lens_spearman": report["lens_spearman"] >= BARS["lens_spearman"],
        "phases": report["phases"]["classes_over_min_share"] >= 2,
        "lipschitz_ratio": report["phases"]["lipschitz_ratio"] >= BARS["lipschitz_ratio"],
    }
    if "cpu_seconds" in report:
        out["cpu_seconds"] = report["cpu_seconds"] <= BARS["cpu_seconds"]
    return out


def table(report: dict) -> str:
    """Markdown table of figure / bar / pass."""
    ph = report["phases"]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in ph["class_share"].items())
    rows = [
        (
            "VAE PSNR (dB)",
            f"{report['vae_psnr_db']:.2f}",
            f">= {BARS['vae_psnr_db']}",
            "vae_psnr_db",
        ),
        (
            "colour found",
            f"{report['colour_accuracy']:.1%}",
            f">= {BARS['colour_accuracy']:.0%}",
            "colour_accuracy",
        ),
        (
            "shape found",
            f"{report['shape_accuracy']:.1%}",
            f">= {BARS['shape_accuracy']:.0%}",
            "shape_accuracy",
        ),
        (
            "lens Spearman",
            f"{report['lens_spearman']:.3f}",
            f">= {BARS['lens_spearman']}",
            "lens_spearman",
        ),
        ("grid classes", shares, ">= 2 with >= 10%", "phases"),
        (
            "Lipschitz boundary/inside (scene classes)",
            f"{ph['lipschitz_ratio']:.2f} (shape classes only: {ph['shape_only']['lipschitz_ratio']:.2f})",
            f">= {BARS['lipschitz_ratio']}",
            "lipschitz_ratio",
        ),
    ]
    if "cpu_seconds" in report:
        rows.append(
            (
                "CPU s / 128² image",
                f"{report['cpu_seconds']:.2f}",
                f"<= {BARS['cpu_seconds']}",
                "cpu_seconds",
            )
        )
    lines = ["| figure | value | bar | passed |", "|---|---|---|---|"]
    lines += [
        f"| {a} | {b} | {c} | {'yes' if report['passed'][k] else 'NO'} |" for a, b, c, k in rows
    ]
    return "\n".join(lines)
