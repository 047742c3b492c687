"""flux-toy's command lines: `train_toy.py` (training) and `toy_quality.py` (the quality bars)."""

from __future__ import annotations

import json
from pathlib import Path

from flux_ir.cli import flags


@flags()
def train(
    out: str,
    seed: int = 0,
    resume: bool = False,
    compile: bool = False,
    smoke: bool = False,
    device: str | None = None,
    time_budget_s: float | None = None,
    vae_steps: int | None = None,
    dit_steps: int | None = None,
    batch: int | None = None,
    save_every_s: float | None = None,
    world: int = 1,
    dit_seconds: float | None = None,
    init_from: str | None = None,
    num_latents: int | None = None,
) -> None:
    """Train flux-toy (VAE, then transformer and text encoders) on shape scenes, resumably; with
    --world 2, flux-toy-2 on scenes of one to three objects, grown from flux-toy.

    Writes transformer/vae/text_encoder/text_encoder_2 .safetensors (float16), toy.json and
    losses.json to --out, after the VAE phase, every --save_every_s seconds and at the end;
    checkpoint.pt (for --resume) when the time budget stops a run early (--world 2: checkpoint.pt
    and optimizer.pt, each under 16 MiB).

    Args:
        out: directory for the weights and logs.
        seed: seed of the weights, the scenes and the sampling of timesteps.
        resume: continue from --out/checkpoint.pt (same settings).
        compile: torch.compile the transformer's blocks (CUDA).
        smoke: a tiny model for a few steps (a CPU check).
        device: cuda or cpu (default: cuda when available).
        time_budget_s: wall-clock cap of this invocation (default one hour); a resumed run gets a new one.
        vae_steps: VAE steps; it may stop earlier at its PSNR target (default 3000; 3 with
            --smoke).
        dit_steps: transformer steps (default 6600; 3 with --smoke).
        batch: transformer batch size (default 2048; 4 with --smoke).
        save_every_s: seconds between weight exports (default 120).
        world: 1 (flux-toy, one shape per scene) or 2 (flux-toy-2, one to three objects).
        dit_seconds: --world 2: seconds of transformer training over all invocations; the first
            steps are timed and fix the step count (default 640; 0: exactly --dit_steps).
        init_from: --world 2: flux-toy weights directory to grow from (default the package's;
            "none": random weights), or flux-toy-2 weights to continue ("flux-toy-2": the
            package's, or a directory of the same architecture; the VAE stays frozen).
        num_latents: scenes encoded for the transformer phase (default 131072; 16 with --smoke).
    """
    from flux_ir.errors import InvalidArgumentError

    if world not in (1, 2):
        raise InvalidArgumentError(f"{{param}} must be 1 or 2, got {world!r}", "world")
    given = dict(
        time_budget_s=time_budget_s,
        vae_steps=vae_steps,
        dit_steps=dit_steps,
        batch=batch,
        save_every_s=save_every_s,
        num_latents=num_latents,
    )
    kw = dict(out=str(out), seed=seed, device=device, compile=bool(compile))
    kw.update({k: v for k, v in given.items() if v is not None})
    if world == 1:
        if dit_seconds is not None or init_from is not None:
            flag = "dit_seconds" if dit_seconds is not None else "init_from"
            raise InvalidArgumentError("{param} is for --world 2", flag)
        from flux_ir.toy.train import TrainConfig, train_toy

        cfg = TrainConfig.smoke_config(**kw) if smoke else TrainConfig(**kw)
        summary = train_toy(cfg, resume=bool(resume))
    else:
        from flux_ir.toy.train2 import TrainConfig2, train_toy2

        if dit_seconds is not None:
            kw["dit_seconds"] = float(dit_seconds) or None
        if init_from is not None:
            kw["init_from"] = None if str(init_from).lower() == "none" else str(init_from)
        cfg = TrainConfig2.smoke_config(**kw) if smoke else TrainConfig2(**kw)
        summary = train_toy2(cfg, resume=bool(resume))
    print(json.dumps(summary, indent=2), flush=True)


@flags()
def quality(
    weights: str | None = None,
    device: str = "cpu",
    out: str = "toy_quality",
    samples: int = 200,
    grid: int = 20,
    lens_prompts: int = 8,
    batch: int = 50,
    skip_cpu: bool = False,
    world: int = 1,
    checker_scenes: int = 200,
    science: bool | None = None,
    science_only: bool = False,
    lens_steps: str | None = None,
    settle_points: int = 64,
    reader_train: int = 1024,
) -> None:
    """Measure flux-toy's quality bars and print them as a table (JSON and markdown into --out);
    with --world 2, flux-toy-2's adherence per attribute and binding beside the checker's own
    accuracy.

    Figures: VAE PSNR on held-out scenes, checker colour/shape accuracy on --samples samples, lens
    convergence (Spearman over depth), a --grid x --grid neutral-prompt grid's class shares and
    Lipschitz ratio, CPU seconds per 128x128 image on 2 threads. Then the science bars
    (`flux_ir.toy.bars`): each block's x0 lens against decoding the current latent x_k at
    --lens_steps, the neutral grid's phases read by the checker and by a classifier of the latents,
    and when background, colour and shape settle over denoising (science.json, science.md, CSV
    tables and two figures in --out).

    Args:
        weights: weights directory (default: $FLUX_IR_TOY_WEIGHTS, else the package's).
        device: cpu or cuda.
        out: directory for toy_quality.json and toy_quality.md (and the science bars' files).
        samples: samples for the adherence bars.
        grid: points along each side of the neutral-prompt grid.
        lens_prompts: prompts for the lens bar.
        batch: images per pipeline call.
        skip_cpu: skip the 2-thread CPU timing.
        world: 1 (flux-toy) or 2 (flux-toy-2; weights default to $FLUX_IR_TOY2_WEIGHTS, else the
            package's).
        checker_scenes: --world 2: random scenes for the checker's own accuracy.
        science: measure the science bars after the quality bars (default: with --world 1;
            they read flux-toy's world of one shape and are not defined for --world 2).
        science_only: measure only the science bars (--world 1).
        lens_steps: denoising steps at which blocks are decoded against x_k, e.g. 4,8,12,-1 or
            8-10 (negative: from the end; all: every step; default: from a quarter of the
            run on, every eighth of it, and the last step: 4,6,...,14,15 for 16 steps).
        settle_points: grid points whose every step's x0 is decoded for the settling bar.
        reader_train: VAE-encoded renders the latent classifier trains on.
    """
    import torch

    from flux_ir.errors import InvalidArgumentError
    from flux_ir.io.atomic import write_text
    from flux_ir.models import LoadOptions, load_pipeline, resolve_model
    from flux_ir.sampling import SamplingOptions
    from flux_ir.toy.bars import (
        default_lens_steps,
        measure_science,
        resolve_steps,
        science_table,
    )

    if world not in (1, 2):
        raise InvalidArgumentError(f"{{param}} must be 1 or 2, got {world!r}", "world")
    if world == 2 and (science or science_only):
        flag = "science_only" if science_only else "science"
        raise InvalidArgumentError(
            "{param}: the science bars read flux-toy's world (one of three shapes per scene); "
            "they are not defined for --world 2: leave it out",
            flag,
        )
    science = world == 1 if science is None else bool(science)
    model = "flux-toy" if world == 1 else "flux-toy-2"
    load = LoadOptions.create(
        model,
        device,
        dtype=torch.float32,
        weights_dir=None if weights is None else str(weights),
    )
    n_steps = resolve_model(model).num_steps
    steps = (
        default_lens_steps(n_steps)
        if lens_steps is None
        else resolve_steps(lens_steps, n_steps, "lens_steps")
    )
    pipe, spec = load_pipeline(load)
    if world == 2 and not science_only:
        from flux_ir.toy.quality2 import measure_world2, table2

        report = measure_world2(
            pipe,
            spec,
            samples=samples,
            batch=batch,
            checker_scenes=checker_scenes,
            skip_cpu=bool(skip_cpu),
        )
        md = table2(report)
        write_text(Path(out) / "toy2_quality.json", json.dumps(report, indent=1))
        write_text(Path(out) / "toy2_quality.md", md + "\n")
        print(md, flush=True)
    elif not science_only:
        from flux_ir.toy.quality import measure_all, table

        report = measure_all(
            pipe,
            spec,
            samples=samples,
            grid=grid,
            lens_prompts=lens_prompts,
            batch=batch,
            skip_cpu=bool(skip_cpu),
        )
        md = table(report)
        write_text(Path(out) / "toy_quality.json", json.dumps(report, indent=1))
        write_text(Path(out) / "toy_quality.md", md + "\n")
        print(md, flush=True)
    if science or science_only:
        size = int(pipe.vae.config.sample_size)
        summary = measure_science(
            pipe,
            SamplingOptions.from_spec(spec, width=size, height=size),
            out,
            model_name=spec.name,
            lens_prompts_n=lens_prompts,
            lens_steps=steps,
            grid=grid,
            settle_points=settle_points,
            reader_train=reader_train,
            batch_size=min(batch, 16),
        )
        md = science_table(summary)
        write_text(Path(out) / "science.md", md + "\n")
        print(md, flush=True)


if __name__ == "__main__":  # python -m flux_ir.toy.cli train|quality ...
    import sys

    from flux_ir.cli import run_fire

    sys.exit(run_fire({"train": train, "quality": quality}, name="python -m flux_ir.toy.cli"))
