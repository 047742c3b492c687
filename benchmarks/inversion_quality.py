"""Inversion quality on flux-toy (CPU): invert held-out scenes, regenerate, compare; a grid between three.

    uv run python benchmarks/inversion_quality.py --out benchmarks/results/cpu-inversion \
        --picture docs/flux-toy-inversion.png                       # flux-toy, its shipped weights
    uv run python benchmarks/inversion_quality.py --smoke --out /tmp/inv   # flux-tiny, seconds

What is measured: `--n` held-out scenes (`make_scenes(seed=--seed)`, 128², saved as PNG and read
back, so the input is the 8-bit image a user has) are inverted with `flux_ir.inversion.invert_images`
and regenerated with `flux_ir.sampling.generate` from the inverted noise, under each conditioning:
`caption` (each scene's own caption, no CFG), `empty` (the empty prompt, no CFG) and `caption+cfg`
(the caption with flux-toy's default true CFG 2 against the empty prompt, inverted with the same
guided velocity). Per mode: PSNR (dB, pixels in [0, 1]) of the regenerated image against the input,
mean / median / 10th percentile / min; `same scene`: the share of scenes where the checker
(`flux_ir.toy.checker.check_images`) reads the same shape, colour and background in the regenerated
image as in the input (`same_shape` etc.: each alone); `asked_scene`: the checker reads the scene's
own label (shape and colour); VAE encode -> decode alone: the ceiling an inversion can reach. The
curve repeats the first two modes over `--steps` on the first `--curve_n` scenes (inversion and
sampling with the same step count). `refine`: one row with fixed-point passes, the better-conditioned
variant, on the curve scenes.

The grid: three held-out scenes of three different shapes, written as PNG, made a `flux-ir sweep`
(`run_sweep` with `vertex_images`, the empty prompt, no CFG, `--grid` x `--grid` points); the table
says whether the checker reads each corner's vertex scene at that corner, for the normalisations
`vertex` (the sweep's), `none` and `annulus` (corners only). Wall times are this machine's (threads
`--threads`), not a speed benchmark.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import markdown_table, write_results  # noqa: E402

from flux_ir.geometry import pack_latents  # noqa: E402
from flux_ir.inversion import encode_images, invert_images, load_image, psnr  # noqa: E402
from flux_ir.models import load_pipeline  # noqa: E402
from flux_ir.sampling import SamplingOptions, generate  # noqa: E402
from flux_ir.sweep import GridSpec, SweepConfig, grid_latents, run_sweep  # noqa: E402
from flux_ir.sweep.run import sweep_vertices  # noqa: E402
from flux_ir.sweep.store import SweepStore  # noqa: E402
from flux_ir.toy.checker import check_images  # noqa: E402
from flux_ir.toy.scenes import COLOURS, SHAPES, make_scenes  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--smoke", action="store_true", help="flux-tiny at 32², two scenes, seconds")
    p.add_argument("--n", type=int, default=100, help="held-out scenes for the main table")
    p.add_argument("--seed", type=int, default=12345, help="make_scenes seed (held out)")
    p.add_argument("--modes", default="caption,empty,caption+cfg", help="conditionings to measure")
    p.add_argument("--steps", default="8,16,32,50", help="step counts of the curve")
    p.add_argument("--curve_n", type=int, default=16, help="scenes of the curve")
    p.add_argument("--refine", type=int, default=1, help="fixed-point passes of the refine row")
    p.add_argument("--grid", type=int, default=5, help="points per side of the three-scene grid")
    p.add_argument("--batch", type=int, default=10, help="scenes per inversion / sampling call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--picture", default=None, help="write the figure here (PNG)")
    return p.parse_args(argv)


# -- helpers ----------------------------------------------------------------------------------------
def write_scenes(images: torch.Tensor, folder: Path) -> list[str]:
    """Scenes [B, 3, H, W] in [0, 1] -> PNG files (8-bit, as a user's images are)."""
    paths = []
    for k, x in enumerate(images):
        path = folder / f"scene{k:03d}.png"
        array = (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def read_back(paths: list[str], size: int) -> torch.Tensor:
    return torch.stack([load_image(p, size, size) for p in paths])


def mode_options(base: SamplingOptions, mode: str, steps: int) -> tuple[SamplingOptions, bool]:
    """(options, one caption per scene?) of a conditioning mode."""
    if mode == "empty":
        return replace(base, prompt="", num_steps=steps, true_cfg_scale=1.0), False
    if mode == "caption":
        return replace(base, num_steps=steps, true_cfg_scale=1.0), True
    if mode == "caption+cfg":  # flux-toy's default: true CFG 2 against the empty prompt
        return replace(base, num_steps=steps, negative_prompt="", true_cfg_scale=2.0), True
    raise SystemExit(f"unknown mode {mode!r}; choose from caption, empty, caption+cfg")


def take(obj, index):
    """A SceneBatch or CheckResult restricted to `index` (a slice or a list of indices)."""
    return type(obj)(*(getattr(obj, f.name)[index] for f in fields(obj)))


def same_scene(a, b) -> torch.Tensor:
    """[B] bool: the checker reads the same shape, colour and background in a and b."""
    return (a.shape == b.shape) & (a.colour == b.colour) & (a.background == b.background)


def round_trip(pipe, opts, paths, captions, per_image: bool, batch: int, refine: int = 0):
    """Regenerated images [B, 3, H, W] in [0, 1] from the inverted images, and seconds spent."""
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(paths), batch):
        part = paths[lo : lo + batch]
        prompts = captions[lo : lo + batch] if per_image else None
        noise = invert_images(pipe, opts, part, prompts=prompts, refine=refine, progress=False)
        noise = noise.to(pipe.transformer.dtype)
        images = generate(
            pipe,
            opts,
            latents=noise,
            prompts=prompts,
            output_type="pt",
            progress=False,
        ).images
        out.append(images.float().cpu())
    return torch.cat(out), time.perf_counter() - t0


def summarise(regen: torch.Tensor, inputs: torch.Tensor, checked_inputs, labels) -> dict:
    p = psnr(regen, inputs)
    checked = check_images(regen)
    q = torch.quantile(p, torch.tensor([0.1, 0.5]))
    truth = (checked.shape == labels.shape) & (checked.colour == labels.colour)
    return {
        **{
            f"same_{name}": (getattr(checked, name) == getattr(checked_inputs, name))
            .float()
            .mean()
            .item()
            for name in ("shape", "colour", "background")
        },
        "psnr_mean": p.mean().item(),
        "psnr_median": q[1].item(),
        "psnr_p10": q[0].item(),
        "psnr_min": p.min().item(),
        "share_ge_25dB": (p >= 25).float().mean().item(),
        "same_scene": same_scene(checked, checked_inputs).float().mean().item(),
        "other_scene": torch.nonzero(~same_scene(checked, checked_inputs)).flatten().tolist(),
        "asked_scene": truth.float().mean().item(),
        "psnr_all": p.tolist(),
    }


@torch.inference_mode()
def vae_round_trip(pipe, inputs: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] encoded and decoded by the VAE alone (no inversion), in [0, 1]."""
    from flux_ir.geometry import unpack_latents

    size = inputs.shape[-1]
    clean = encode_images(pipe, inputs)
    cfg = pipe.vae.config
    z = unpack_latents(clean, size, size) / cfg.scaling_factor + cfg.shift_factor
    return ((pipe.vae.decode(z.to(pipe.vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)


def pick_vertices(labels) -> list[int]:
    """The first scenes with three different shapes and three different colours."""
    chosen: list[int] = []
    for k, (s, c) in enumerate(zip(labels.shape.tolist(), labels.colour.tolist())):
        if all(s != labels.shape[j] and c != labels.colour[j] for j in chosen):
            chosen.append(k)
        if len(chosen) == 3:
            return chosen
    raise SystemExit("no three scenes of different shapes and colours; raise --n")


def describe(result, k: int) -> str:
    s = int(result.shape[k])
    shape = "none" if s < 0 else SHAPES[s]
    return f"{COLOURS[int(result.colour[k])]} {shape} on {COLOURS[int(result.background[k])]}"


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = "flux-tiny" if args.smoke else "flux-toy"
    pipe, spec = load_pipeline(model, device="cpu")
    size = 32 if args.smoke else spec.size
    n = 2 if args.smoke else args.n
    curve_n = min(n, 2 if args.smoke else args.curve_n)
    steps_curve = [2] if args.smoke else [int(s) for s in args.steps.split(",")]
    grid_n = 2 if args.smoke else args.grid
    modes = args.modes.split(",")
    base = SamplingOptions.from_spec(spec, width=size, height=size)
    default_steps = 2 if args.smoke else spec.num_steps
    result: dict = {
        "model": model,
        "size": size,
        "default_steps": default_steps,
        "n": n,
        "curve_n": curve_n,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "modes": {},
        "curve": [],
    }
    scenes = make_scenes(max(n, 24), size=size, seed=args.seed)  # the grid picks from 24 at least
    tmp = Path(tempfile.mkdtemp(prefix="inversion_quality_"))
    paths = write_scenes(scenes.images, tmp)
    inputs = read_back(paths, size)
    captions = scenes.captions
    checked_inputs = check_images(inputs)
    labels = scenes
    result["checker_on_inputs"] = (
        ((checked_inputs.shape == labels.shape) & (checked_inputs.colour == labels.colour))
        .float()
        .mean()
        .item()
    )
    decoded = vae_round_trip(pipe, inputs[:n])
    vae = psnr(decoded, inputs[:n])
    result["vae_psnr_mean"] = vae.mean().item()
    result["vae_psnr_min"] = vae.min().item()
    result["vae_same_scene"] = (
        same_scene(check_images(decoded), take(checked_inputs, slice(n))).float().mean().item()
    )
    print(f"VAE encode -> decode: {vae.mean():.2f} dB (min {vae.min():.2f})", flush=True)

    rows = []
    regenerated = {}
    for mode in modes:
        opts, per_image = mode_options(base, mode, default_steps)
        regen, seconds = round_trip(pipe, opts, paths[:n], captions[:n], per_image, args.batch)
        regenerated[mode] = regen
        stats = summarise(regen, inputs[:n], take(checked_inputs, slice(n)), take(labels, slice(n)))
        stats.update(seconds=seconds, steps=default_steps, n=n)
        result["modes"][mode] = stats
        rows.append({"mode": mode, **{k: v for k, v in stats.items() if k != "psnr_all"}})
        rows[-1].pop("other_scene")
        print(f"{mode}: {rows[-1]}", flush=True)

    curve_rows = []
    sub, checked_sub = take(labels, slice(curve_n)), take(checked_inputs, slice(curve_n))
    for mode in [m for m in modes if m in ("caption", "empty")]:
        for steps in steps_curve:
            opts, per_image = mode_options(base, mode, steps)
            regen, seconds = round_trip(
                pipe, opts, paths[:curve_n], captions[:curve_n], per_image, args.batch
            )
            stats = summarise(regen, inputs[:curve_n], checked_sub, sub)
            row = {"mode": mode, "steps": steps, "refine": 0, **stats, "seconds": seconds}
            curve_rows.append(row)
            print(f"curve {mode} {steps}: {stats['psnr_mean']:.2f} dB", flush=True)
        if args.refine:
            opts, per_image = mode_options(base, mode, default_steps)
            regen, seconds = round_trip(
                pipe, opts, paths[:curve_n], captions[:curve_n], per_image, args.batch, args.refine
            )
            stats = summarise(regen, inputs[:curve_n], checked_sub, sub)
            row = {
                "mode": mode,
                "steps": default_steps,
                "refine": args.refine,
                **stats,
                "seconds": seconds,
            }
            curve_rows.append(row)
            print(f"refine {mode}: {stats['psnr_mean']:.2f} dB", flush=True)
    result["curve"] = curve_rows

    # -- the grid between three inverted scenes, as a sweep ---------------------------------------
    chosen = [0, 1, 2] if args.smoke else pick_vertices(checked_inputs)
    grid_opts = {"prompt": "", "true_cfg_scale": 1.0, "width": size, "height": size}
    if args.smoke:
        grid_opts["num_steps"] = 2
    cfg = SweepConfig.from_spec(
        spec,
        grid=GridSpec(n_alpha=grid_n, n_beta=grid_n, normalisation="vertex"),
        vertex_images=[paths[k] for k in chosen],
        **grid_opts,
    )
    sweep_dir = tmp / "grid"
    t0 = time.perf_counter()
    run_sweep(pipe, cfg, sweep_dir, batch_size=args.batch, progress=False)
    grid_seconds = time.perf_counter() - t0
    store = SweepStore(sweep_dir)
    points = cfg.grid.points()
    grid_images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(store.images / p.file).convert("RGB")).copy())
            .permute(2, 0, 1)
            .float()
            / 255
            for p in points
        ]
    )
    last = grid_n - 1
    corners = {
        0: 0,
        1: last * grid_n,
        2: last,
    }  # vertex k -> point index (z0, z1 at a=1, z2 at b=1)
    grid_checked = check_images(grid_images)
    vertex_checked = checked_inputs
    corner_rows = []
    vertices = sweep_vertices(pipe, cfg, store, progress=False)
    for norm in ("vertex", "none", "annulus"):
        spec_n = GridSpec(n_alpha=grid_n, n_beta=grid_n, normalisation=norm)
        corner_points = [points[corners[k]] for k in range(3)]
        if norm == "vertex":
            corner_result = take(grid_checked, [corners[k] for k in range(3)])
        else:
            z, _, _ = grid_latents(vertices, spec_n, corner_points)
            noise = pack_latents(z).to(pipe.transformer.dtype)
            images = generate(pipe, cfg.sampling, latents=noise, output_type="pt", progress=False)
            corner_result = check_images(images.images.float().cpu())
        for k in range(3):
            j = chosen[k]
            ok = bool(
                corner_result.shape[k] == vertex_checked.shape[j]
                and corner_result.colour[k] == vertex_checked.colour[j]
                and corner_result.background[k] == vertex_checked.background[j]
            )
            corner_rows.append(
                {
                    "normalisation": norm,
                    "vertex": f"z{k}",
                    "input": describe(vertex_checked, j),
                    "corner": describe(corner_result, k),
                    "same": ok,
                }
            )
    result["grid"] = {
        "vertices": chosen,
        "points": grid_n * grid_n,
        "seconds": grid_seconds,
        "corners": corner_rows,
        "vertex_norms": vertices.flatten(1).norm(dim=1).tolist(),
        "annulus_radius": float(vertices[0].numel()) ** 0.5,
        "classes": [describe(grid_checked, i) for i in range(len(points))],
    }

    if args.picture:
        picture(
            args.picture, inputs, regenerated, modes, grid_images, grid_n, chosen, checked_inputs
        )
        result["picture"] = args.picture

    columns = ["mode", "steps", "n", "psnr_mean", "psnr_median", "psnr_p10", "psnr_min"]
    columns += ["share_ge_25dB", "same_scene", "same_shape", "same_colour", "same_background"]
    columns += ["asked_scene", "seconds"]
    curve_columns = ["mode", "steps", "refine", "psnr_mean", "psnr_median", "psnr_p10"]
    curve_columns += ["psnr_min", "same_scene", "seconds"]
    note = __doc__.split("What is measured:")[1]
    note += (
        f"\n\nVAE encode -> decode: {result['vae_psnr_mean']:.2f} dB mean (min "
        f"{result['vae_psnr_min']:.2f}); the checker reads the input's scene in "
        f"{result['vae_same_scene']:.0%} of the VAE reconstructions alone, and the asked scene "
        f"in {result['checker_on_inputs']:.0%} of the inputs themselves.\n\n"
        f"## Curve ({curve_n} scenes)\n\n{markdown_table(curve_rows, curve_columns)}\n\n"
        f"## Grid corners ({grid_n}x{grid_n} sweep, vertices: scenes {chosen})\n\n"
        f"{markdown_table(corner_rows, ['normalisation', 'vertex', 'input', 'corner', 'same'])}\n\n"
        f"## Main table ({n} scenes, {default_steps} steps)"
    )
    table = write_results(args.out, "inversion_quality", result, rows, columns, note)
    print(table)
    return result


def picture(path, inputs, regenerated, modes, grid_images, grid_n, chosen, checked) -> None:
    """Inputs over their regenerations (each mode), and the grid between three inverted scenes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(6, len(inputs), *(len(v) for v in regenerated.values()))
    rows = 1 + len(modes)
    fig = plt.figure(figsize=(13, 6.2), dpi=100)
    left = fig.add_gridspec(rows, shown, left=0.035, right=0.50, top=0.92, bottom=0.02, wspace=0.04)
    for r in range(rows):
        images = inputs if r == 0 else regenerated[modes[r - 1]]
        label = "input" if r == 0 else f"{modes[r - 1]}"
        for c in range(shown):
            ax = fig.add_subplot(left[r, c])
            ax.imshow(images[c].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
            if r > 0:
                p = psnr(images[c : c + 1], inputs[c : c + 1]).item()
                ax.set_title(f"{p:.1f} dB", fontsize=8, pad=2)
    fig.text(0.25, 0.96, "held-out scenes, inverted and regenerated", ha="center", fontsize=11)
    right = fig.add_gridspec(
        grid_n, grid_n, left=0.55, right=0.99, top=0.92, bottom=0.02, wspace=0.03, hspace=0.03
    )
    for r in range(grid_n):
        for c in range(grid_n):
            ax = fig.add_subplot(right[r, c])
            ax.imshow(grid_images[r * grid_n + c].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            corner = {(0, 0): "z0", (grid_n - 1, 0): "z1", (0, grid_n - 1): "z2"}.get((r, c))
            if corner:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red"), spine.set_linewidth(2)
                ax.text(
                    0.04,
                    0.96,
                    corner,
                    transform=ax.transAxes,
                    ha="left",
                    va="top",
                    fontsize=9,
                    color="white",
                    bbox={"facecolor": "red", "edgecolor": "none", "pad": 1.5},
                )
    fig.text(
        0.77,
        0.96,
        "grid between three inverted scenes (empty prompt; rows alpha, columns beta)",
        ha="center",
        fontsize=11,
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    with Image.open(path) as im:  # flat colours: a 256-colour palette keeps the file small
        im.convert("RGB").quantize(256).save(path, optimize=True)


if __name__ == "__main__":
    main()
