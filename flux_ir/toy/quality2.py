"""flux-toy-2's bars: adherence per attribute and binding, each beside the checker's own accuracy.

    pipe, spec = load_pipeline("flux-toy-2", device="cpu")
    report = measure_world2(pipe, spec, samples=200)     # dict of figures
    print(table2(report))

Prompts are full captions of random scenes (`flux_ir.toy.world`; 40% one object, 40% pairs in a
relation, 20% "two ..." / "three ..."), sampled with the model's defaults. The checker
(`flux_ir.toy.world_checker`) reads each image, and every prompt is scored on: background; count;
shape, colour, texture and size (one-object and counted prompts: every object read has the asked
value; pairs: each asked object's best-matching object read has it); relation (pairs: the objects
read with the asked shapes and colours stand in the asked relation); binding (pairs whose objects
differ in shape and in colour: both asked shape-colour pairs are read, each on its own object) and
swapped binding (the colours read on each other's shapes). The same scoring on renders of the asked
scenes, clean and through the model's VAE, is the checker's own accuracy: the ceiling a perfect
model would reach.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from flux_ir.models.registry import ModelSpec
from flux_ir.sampling import SamplingOptions
from flux_ir.toy.quality import cpu_seconds, device_of, generate_images
from flux_ir.toy.train import autocast, vae_psnr
from flux_ir.toy.world import KINDS, caption, make_world, render, sample_layout
from flux_ir.toy.world_checker import (
    WorldReading,
    checker_accuracy,
    read_world,
    relation_of,
)

PROMPT_KINDS = (0.4, 0.4, 0.1, 0.1)  # one, pair, two, three
ATTRIBUTES = ("shape", "colour", "texture", "size")
FIGURES = (
    "background",
    "count",
    *ATTRIBUTES,
    "relation",
    "binding",
    "binding_swapped",
)


def world_prompts(n: int, seed: int = 0):
    """`n` prompt scenes (a `Layout`) and their full captions."""
    gen = torch.Generator().manual_seed(seed)
    layout = sample_layout(n, generator=gen, kinds=PROMPT_KINDS)
    return layout, [caption(r) for r in layout.records()]


def _agreement(a: dict, b: dict) -> int:
    return sum(a[k] == b[k] for k in ATTRIBUTES)


def score_prompt(record: dict, read: list[dict], background: int) -> dict:
    """One prompt's scores (True / False, or None where a figure does not apply) from the objects
    read (`WorldReading.objects`) and the background read."""
    asked = record["objects"]
    kind = KINDS[record["kind"]]
    out: dict = dict.fromkeys(FIGURES)
    out["background"] = background == record["background"]
    out["count"] = len(read) == len(asked)
    if kind != "pair":
        for key in ATTRIBUTES:
            out[key] = bool(read) and all(r[key] == asked[0][key] for r in read)
        return out
    # pairs: each asked object's best match among the objects read (greedy, best agreement first)
    options = sorted(
        ((_agreement(a, r), i, j) for i, a in enumerate(asked) for j, r in enumerate(read)),
        reverse=True,
    )
    match: list[dict | None] = [None, None]
    used: set[int] = set()
    for _, i, j in options:
        if match[i] is None and j not in used:
            match[i] = read[j]
            used.add(j)
    for key in ATTRIBUTES:
        out[key] = all(m is not None and m[key] == a[key] for a, m in zip(asked, match))

    def find(shape: int, colour: int, exclude: dict | None = None) -> dict | None:
        return next(
            (r for r in read if r is not exclude and r["shape"] == shape and r["colour"] == colour),
            None,
        )

    a, b = asked
    ra = find(a["shape"], a["colour"])
    rb = find(b["shape"], b["colour"], exclude=ra)
    out["relation"] = (
        ra is not None and rb is not None and relation_of(ra, rb) == record["relation"]
    )
    if a["shape"] != b["shape"] and a["colour"] != b["colour"]:
        out["binding"] = ra is not None and rb is not None
        sa = find(a["shape"], b["colour"])
        sb = find(b["shape"], a["colour"], exclude=sa)
        out["binding_swapped"] = sa is not None and sb is not None
    return out


def score_readings(records: list[dict], reading: WorldReading) -> dict:
    """Share of prompts passing each figure (over the prompts it applies to) and those counts."""
    scores = [
        score_prompt(r, reading.objects(i), int(reading.background[i]))
        for i, r in enumerate(records)
    ]
    out = {}
    for key in FIGURES:
        vals = [s[key] for s in scores if s[key] is not None]
        out[key] = sum(vals) / len(vals) if vals else float("nan")
        out[f"{key}_n"] = len(vals)
    return out


@torch.no_grad()
def vae_round_trip(pipe: FluxPipeline, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] through the pipeline's VAE (encode, mode, decode), on the CPU."""
    device = device_of(pipe)
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device, pipe.vae.dtype) * 2 - 1
        with autocast(device):
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        out.append(((y.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


def checker_report(pipe: FluxPipeline | None, n: int = 200, size: int = 128, seed: int = 0) -> dict:
    """The checker's accuracy (`checker_accuracy`) on `n` random world scenes, clean and (with a
    pipeline) through its VAE: {"clean": {...}, "vae": {...}}."""
    world = make_world(n, size, seed=seed)
    report = {"clean": checker_accuracy(world, read_world(world.images))}
    if pipe is not None:
        recon = vae_round_trip(pipe, world.images)
        report["vae"] = checker_accuracy(world, read_world(recon))
    return report


def adherence2(
    pipe: FluxPipeline,
    opts: SamplingOptions,
    n: int = 200,
    *,
    batch: int = 50,
    seed: int = 0,
) -> dict:
    """Figures for `n` prompts sampled as `opts` says ("model"), and the same scoring on renders of
    the asked scenes, clean ("checker_clean") and through the model's VAE ("checker_vae")."""
    layout, prompts = world_prompts(n, seed)
    records = layout.records()
    images = []
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        seeds = list(range(seed * 100_000 + start, seed * 100_000 + start + len(chunk)))
        images.append(generate_images(pipe, opts, chunk, seeds))
    images = torch.cat(images)
    truth, _ = render(layout, images.shape[-1])
    return dict(
        model=score_readings(records, read_world(images)),
        checker_clean=score_readings(records, read_world(truth)),
        checker_vae=score_readings(records, read_world(vae_round_trip(pipe, truth))),
        prompts=prompts[:8],
    )


def measure_world2(
    pipe: FluxPipeline,
    spec: ModelSpec,
    *,
    samples: int = 200,
    batch: int = 50,
    checker_scenes: int = 200,
    skip_cpu: bool = False,
) -> dict:
    """flux-toy-2's figures, sampled with the model's defaults (`spec`); last, unless `skip_cpu`,
    the seconds of one image on 2 CPU threads (the pipeline moves to the CPU)."""
    size = int(pipe.vae.config.sample_size)
    opts = SamplingOptions.from_spec(spec, width=size, height=size)
    report: dict = dict(model=spec.name, size=size, steps=opts.num_steps)
    report["true_cfg_scale"] = opts.true_cfg_scale
    report["vae_psnr_db"] = vae_psnr(
        pipe, min(512, checker_scenes), size, seed=12345, device=device_of(pipe), scenes=make_world
    )
    report["checker"] = checker_report(pipe, checker_scenes, size, seed=4321)
    report["adherence"] = adherence2(pipe, opts, samples, batch=batch)
    if not skip_cpu:
        report["cpu_seconds"] = cpu_seconds(pipe.to("cpu"), opts)
    return report


def table2(report: dict) -> str:
    """Markdown: each adherence figure beside the checker's own score on clean and VAE renders."""
    adh = report["adherence"]
    lines = [
        f"{report['model']}: {adh['model']['count_n']} prompts, {report['steps']} steps, "
        f"true CFG {report['true_cfg_scale']}; VAE PSNR {report['vae_psnr_db']:.2f} dB"
        + (
            f"; {report['cpu_seconds']:.2f} s per image on 2 CPU threads"
            if "cpu_seconds" in report
            else ""
        ),
        "",
        "| figure | model | checker on clean renders | checker on VAE renders | prompts |",
        "|---|---|---|---|---|",
    ]
    for key in FIGURES:
        m, c, v = adh["model"], adh["checker_clean"], adh["checker_vae"]
        lines.append(
            f"| {key.replace('_', ' ')} | {m[key]:.1%} | {c[key]:.1%} | {v[key]:.1%} | {m[key + '_n']} |"
        )
    ck = report["checker"]
    lines += [
        "",
        "| checker on random scenes | clean | through the VAE |",
        "|---|---|---|",
    ]
    for key in ("background", "count", *ATTRIBUTES, "relation", "scene", "rejected"):
        vae = ck.get("vae", {}).get(key, float("nan"))
        lines.append(f"| {key} | {ck['clean'][key]:.1%} | {vae:.1%} |")
    return "\n".join(lines)
