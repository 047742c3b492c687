"""`flux-ir geometry`: the Fisher metric of a sweep (posterior, free energy, metric), geodesics and the
images along them."""

from __future__ import annotations

from flux_ir.cli import flags
from flux_ir.errors import InvalidArgumentError

RANDOM_SUFFIX = " (random weights)"


def parse_geodesics(value) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """ "a_alpha,a_beta:b_alpha,b_beta", several joined by ";" -> [((a_alpha, a_beta), (b_alpha,
    b_beta)), ...]; None or "" -> []."""
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"{{param}} must look like 0.2,0.3:0.8,0.7 (alpha,beta of both ends), got {value!r}",
            "geodesic",
        )
    pairs = []
    for part in value.split(";"):
        ends = part.strip().split(":")
        try:
            if len(ends) != 2:
                raise ValueError
            a, b = (tuple(float(x) for x in end.split(",")) for end in ends)
            if len(a) != 2 or len(b) != 2:
                raise ValueError
        except ValueError as err:
            raise InvalidArgumentError(
                f"{{param}} must look like 0.2,0.3:0.8,0.7 (alpha,beta of both ends; several joined "
                f"by ';'), got {part!r}",
                "geodesic",
            ) from err
        pairs.append((a, b))
    return pairs


@flags()
def geometry(
    sweep_dir: str,
    embedder: str = "clip",
    clip_model: str = "openai/clip-vit-large-patch14",
    device: str | None = None,
    resolution: int | None = None,
    n_samples: float | None = None,
    width: int = 512,
    depth: int = 4,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    metric_resolution: int = 128,
    geodesic: str | None = None,
    geodesic_points: int = 10,
    geodesic_iterations: int = 5000,
    images: bool = True,
    model: str | None = None,
    weights: str | None = None,
    image_batch_size: int = 8,
    seed: int = 0,
    refit: bool = False,
    cell: int = 64,
    progress: bool = True,
) -> None:
    """The Fisher metric of a sweep, the Hessian-geometry way: each image's posterior over the
    (alpha, beta) box from CLIP embeddings, a free-energy network fitted to the posteriors, and the
    metric g = Hessian of log Z; writes fisher_<embedder>.{npz,json,safetensors} and heatmaps of det g
    and its larger eigenvalue in <sweep_dir>/analysis/. With --geodesic, the geodesics between point
    pairs, drawn over the grid, and the images along each geodesic and along the straight line.

    Args:
        sweep_dir: a directory written by `flux-ir sweep` (a grid, not a 1-D path).
        embedder: clip (transformers CLIP vision, --clip_model), clip-tiny (random miniature), or
            pixel (the image at 32x32; no weights).
        clip_model: hub id or local directory of a CLIP model.
        device: where the embeddings, the fit and the metric (and the images) run: cuda, cuda:N or
            cpu (default: cuda when available).
        resolution: cells per side of the posterior grid (default 128, or the points along the
            sweep's longer axis when fewer).
        n_samples: N of the exponential-family posterior exp(-N D_F); sets the metric's scale
            (default: 1 / mean posterior variance per axis).
        width: hidden width of the free-energy network (the paper: 512).
        depth: hidden layers of the free-energy network (the paper: 4).
        steps: Adam steps of the fit.
        batch_size: posteriors per fitting step.
        lr: Adam learning rate of the fit.
        metric_resolution: points per side of the grid on which the metric is evaluated.
        geodesic: "a_alpha,a_beta:b_alpha,b_beta": a geodesic between two points of the box
            (several joined by ";"; default: none).
        geodesic_points: metric-equidistant points (and images) along each geodesic.
        geodesic_iterations: Adam iterations of each geodesic.
        images: with --geodesic, generate the images along each geodesic and along the straight
            line (loads the sweep's model).
        model: the model for the images (default: the sweep's own).
        weights: "pretrained" or "random" (default: as the sweep was made).
        image_batch_size: images per pipeline call.
        seed: seed of the fit (initialisation, split, batches).
        refit: fit again even when a network fitted with the same settings exists.
        cell: thumbnail size in the geodesic overlay, pixels.
        progress: show progress bars.
    """
    from flux_ir.analysis.embed import check_embedder, make_embedder
    from flux_ir.analysis.fisher_sweep import fisher_geometry, geodesic_images
    from flux_ir.analysis.sweep import open_sweep
    from flux_ir.models.loading import check_device
    from flux_ir.plots.fisher import geodesic_strip, plot_fisher
    from flux_ir.plots.sweep import save_figure

    check_embedder(embedder)
    pairs = parse_geodesics(geodesic)
    if not isinstance(cell, int) or cell < 4:
        raise InvalidArgumentError(f"{{param}} must be an integer >= 4, got {cell!r}", "cell")
    store, cfg, rows = open_sweep(sweep_dir)  # not a sweep: fail before loading CLIP
    device = check_device(device)
    load = _load_options(store, cfg, model, weights, device) if pairs and images else None
    emb = make_embedder(embedder, clip_model=clip_model, device=device)
    result = fisher_geometry(
        sweep_dir,
        emb,
        resolution=resolution,
        n_samples=n_samples,
        width=width,
        depth=depth,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        metric_resolution=metric_resolution,
        geodesics=pairs,
        geodesic_points=geodesic_points,
        geodesic_iterations=geodesic_iterations,
        seed=seed,
        device=device,
        refit=refit,
        progress=progress,
    )
    paths = dict(result.paths)
    paths.update(plot_fisher(sweep_dir, rows, result, cell=cell))
    print(
        f"N = {result.n_samples:.4g}; best validation loss {min(result.losses['val_loss']):.4f} at "
        f"step {result.losses['best_step']}" + (" (network reused)" if result.reused else "")
    )
    for k, geo in enumerate(result.geodesics):
        print(
            f"geodesic {k}: {geo.start} -> {geo.end}: metric length {geo.length:.4g} (straight line "
            f"{geo.line_length:.4g}); largest deviation from the line {geo.deviation:.3f} of the box"
        )
    if load is not None:
        from flux_ir.models import load_pipeline

        print(f"loading {load.spec.name} on {load.device} for the geodesic images ...", flush=True)
        pipe, _ = load_pipeline(load)
        _check_weights(store, pipe)
        for k, geo in enumerate(result.geodesics):
            out = result.out_dir / f"geodesic_{emb.name}_{k}"
            ims = geodesic_images(pipe, sweep_dir, geo, batch_size=image_batch_size, out_dir=out)
            title = f"geodesic {k} (top) and straight line (bottom): {geo.start} -> {geo.end}"
            paths[f"geodesic_{k}_images"] = save_figure(
                geodesic_strip(ims, title), result.out_dir / f"fisher_geodesic_{emb.name}_{k}.png"
            )
    for name, path in paths.items():
        print(f"{name}: {path}")


def _load_options(store, cfg, model, weights, device):
    """The sweep's own model (name, weights, dtype) unless --model / --weights say otherwise."""
    from pathlib import Path

    import torch

    from flux_ir.models import LoadOptions

    meta = store.read_metadata() or {}
    name = cfg.model.removesuffix(RANDOM_SUFFIX)
    source = meta.get("model_source")
    if isinstance(source, str) and Path(source).is_dir():  # a local pipeline directory
        name = source
    if weights is None:
        weights = meta.get("weights") or (
            "random" if cfg.model.endswith(RANDOM_SUFFIX) else "pretrained"
        )
    dtype = meta.get("pipeline_dtype") or cfg.dtype
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    return LoadOptions.create(model or name, device, None, weights, dtype)


def _check_weights(store, pipe) -> None:
    """The images along a geodesic must come from the weights that made the sweep."""
    from flux_ir.models.fingerprint import weights_fingerprint
    from flux_ir.sweep.store import FINGERPRINT

    recorded = (store.read_metadata() or {}).get(FINGERPRINT)
    if recorded is not None and weights_fingerprint(pipe) != recorded:
        raise InvalidArgumentError(
            f"the loaded weights (fingerprint {weights_fingerprint(pipe)}) are not those of the "
            f"sweep ({recorded}); pass the --model and --weights that made it",
            "model",
        )
