"""Activation patching between two prompts: the block x step causal map.

    target = CaptureOptions.from_spec(spec, seed=0, prompt="a red circle on a blue background")
    source = CaptureOptions.from_spec(spec, seed=0, prompt="a green circle on a blue background")
    cmap = causal_map(pipe, target, source, selection=Selection(single_blocks=(-1,), steps=(0, 1)))
    cmap.effect            # [rows, steps]: how far each patch moves the target's image to the source's
    cmap.save("output/patch")   # causal_map.json / .csv, heatmap and image grid

The source run is captured once; then, for every (block, step) site, the target run is repeated with
that one site's image tokens (or text tokens: `stream="txt"`) replaced by the source's (with `span="from"`: at
that step and every later one), under true CFG in both passes. Sites are batched: one pipeline call patches `batch_size` sites, one per batch element,
each element starting from the target's noise. The effect of a site is
`mean |patched - target| / mean |source - target|` over the final image's pixels (0: nothing changes,
1: as far as the source), and `classify` (e.g. flux-toy's checker) reads each patched image.

Several processes (`dist=Distributed.from_env()` under torchrun, one pipeline each on
`cuda:LOCAL_RANK` or the CPU) share the batches out: every process captures the source and runs the
two plain images itself, patches every `world`-th batch of sites, and the per-site results are gathered
into the same map on every process. The batches are those of a one-process run (the same sites in the
same batch positions), so each site's effect, readings and thumbnail are computed exactly as there.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from flux_ir.capture import CaptureOptions, Selection, run_capture
from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene import Intervention, Site, patch_edits
from flux_ir.io.atomic import write_text
from flux_ir.io.png import write_png
from flux_ir.sampling import generate
from flux_ir.sweep.shard import Distributed

SPANS = ("step", "from", "until")
Classifier = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # images [B, 3, H, W] -> [B] each


@dataclass(frozen=True)
class PatchOptions:
    """How sites are patched: `stream` "img" or "txt"; `span` "step", "from" or "until" (see
    `causal_map`); `batch_size` patched runs per pipeline call."""

    stream: str = "img"
    span: str = "step"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.stream not in ("img", "txt"):
            raise InvalidArgumentError(f"{{param}} {self.stream!r}: choose img or txt", "stream")
        if self.span not in SPANS:
            raise InvalidArgumentError(
                f"{{param}} {self.span!r}: choose one of {', '.join(SPANS)}", "span"
            )
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {b!r}", "batch_size"
            )


@dataclass
class CausalMap:
    """Per site (row = block in depth order, column = denoising step): the patch's effect on the
    final image, the classifier's readings, and a thumbnail of the patched image."""

    rows: list[tuple[str, int]]
    steps: list[int]
    effect: np.ndarray  # [rows, steps] float
    readings: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [rows, steps]
    thumbs: np.ndarray | None = None  # [rows, steps, h, w, 3] uint8
    target: np.ndarray | None = None  # [H, W, 3] uint8
    source: np.ndarray | None = None
    target_readings: dict[str, int] = field(default_factory=dict)
    source_readings: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        r, c = np.unravel_index(np.nanargmax(self.effect), self.effect.shape)
        kind, block = self.rows[r]
        return (
            f"CausalMap({len(self.rows)} blocks x {len(self.steps)} steps, effect "
            f"{np.nanmin(self.effect):.2f}-{np.nanmax(self.effect):.2f}, strongest at {kind} "
            f"{block} step {self.steps[c]})"
        )

    def table(self) -> list[dict]:
        """One row per site: kind, block, step, effect and each reading."""
        out = []
        for r, (kind, block) in enumerate(self.rows):
            for c, step in enumerate(self.steps):
                row = {
                    "kind": kind,
                    "block": block,
                    "step": step,
                    "effect": float(self.effect[r, c]),
                }
                row.update({k: int(v[r, c]) for k, v in self.readings.items()})
                out.append(row)
        return out

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """causal_map.json (everything but pixels), causal_map.csv (one row per site), the images."""
        from flux_ir.plots.causal import causal_grid, plot_causal_map

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.table()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        summary = {
            "rows": [list(r) for r in self.rows],
            "steps": self.steps,
            "effect": self.effect.tolist(),
            "readings": {k: v.tolist() for k, v in self.readings.items()},
            "target_readings": self.target_readings,
            "source_readings": self.source_readings,
            "settings": self.settings,
        }
        paths = {
            "json": write_text(out / "causal_map.json", json.dumps(summary, indent=1)),
            "csv": write_text(out / "causal_map.csv", buf.getvalue()),
            "heatmap": plot_causal_map(self, out / "causal_map.png"),
        }
        if self.thumbs is not None:
            paths["grid"] = write_png(out / "causal_grid.png", causal_grid(self))
        return paths


def _pixels(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8, as diffusers' PIL output rounds."""
    return images.permute(0, 2, 3, 1).float().mul(255).round().clamp(0, 255).byte().cpu().numpy()


def causal_map(
    pipe: FluxPipeline,
    target: CaptureOptions,
    source: CaptureOptions,
    *,
    selection: Selection | None = None,
    stream: str = "img",
    span: str = "step",
    batch_size: int = 8,
    classify: Classifier | None = None,
    thumb: int = 48,
    progress: bool = True,
    dist: Distributed | None = None,
) -> CausalMap:
    """Patch every selected (block, step) of the target run with the source run's activations, one
    site at a time (batched); see the module docstring. `selection` picks blocks and steps (default:
    all); `span` says which steps a site patches: "step" (its step alone), "from" (its step and every
    later one) or "until" (every step up to its own); `classify` maps images [B, 3, H, W] in [0, 1]
    to named readings [B]. `dist`: share the batches of sites out over processes (module docstring;
    the returned map is whole on every process)."""
    PatchOptions(stream, span, batch_size)
    dist = dist or Distributed()
    t, s = target.sampling, source.sampling
    if (t.width, t.height, t.num_steps) != (s.width, s.height, s.num_steps):
        raise InvalidArgumentError(
            "{param}: the source must have the target's size and steps, got "
            f"{s.width}x{s.height}, {s.num_steps} steps against {t.width}x{t.height}, {t.num_steps}",
            "source",
        )
    transformer = pipe.transformer
    sel = (selection or Selection()).resolve(
        len(transformer.transformer_blocks), len(transformer.single_transformer_blocks), t.num_steps
    )
    # the source is recorded at every step a site may patch
    sel = Selection(sel.double_blocks, sel.single_blocks, sel.steps, streams=stream, resolved=True)
    record = Selection(
        sel.double_blocks, sel.single_blocks, None if span != "step" else sel.steps, streams=stream
    )
    rows = [("double", i) for i in sel.double_blocks] + [("single", i) for i in sel.single_blocks]
    steps = list(sel.steps)
    if not rows or not steps:
        raise InvalidArgumentError("{param} picks no block or no step", "selection")

    def images_of(opts: CaptureOptions, n: int = 1, edits=()) -> torch.Tensor:
        with Intervention(transformer, list(edits), passes_per_step=opts.sampling.passes_per_step):
            out = generate(
                pipe, opts.sampling, prompts=[opts.sampling.prompt] * n, seed=[opts.seed] * n,
                output_type="pt",
            )  # fmt: skip
        return out.images.float().cpu()

    _, source_cap = run_capture(pipe, source, selection=record, progress=False)
    source_px = images_of(source)
    target_px = images_of(target)
    scale = float((source_px - target_px).abs().mean())
    sites = [(r, c) for r in range(len(rows)) for c in range(len(steps))]
    batches = [sites[lo : lo + batch_size] for lo in range(0, len(sites), batch_size)]
    mine = dist.shard(
        batches
    )  # whole batches: each site patched in the batch position it has alone
    done: list[
        tuple[int, int, float, np.ndarray, dict[str, int]]
    ] = []  # r, c, effect, thumb, readings
    bar = tqdm(
        total=sum(len(chunk) for chunk in mine),
        desc=f"patching {dist.rank}/{dist.world}" if dist.world > 1 else "patching",
        unit="site",
        disable=not progress,
        position=dist.rank,
    )
    for chunk in mine:
        edits = []
        for j, (r, c) in enumerate(chunk):
            kind, block = rows[r]
            patched_steps = {
                "step": (steps[c],),
                "from": tuple(range(steps[c], t.num_steps)),
                "until": tuple(range(steps[c] + 1)),
            }[span]
            site = Site(kind, block, steps=patched_steps, stream=stream, batch=(j,))
            edits += patch_edits(source_cap, [site])
        patched = images_of(target, len(chunk), edits)
        diff = (patched - target_px).abs().flatten(1).mean(1) / max(scale, 1e-12)
        small = _pixels(torch.nn.functional.interpolate(patched, size=(thumb, thumb), mode="area"))
        found = classify(patched) if classify is not None else {}
        for j, (r, c) in enumerate(chunk):
            read = {name: int(values[j]) for name, values in found.items()}
            done.append((r, c, float(diff[j]), small[j], read))
        bar.update(len(chunk))
    bar.close()
    effect = np.full((len(rows), len(steps)), np.nan)
    readings: dict[str, np.ndarray] = {}
    thumbs = np.zeros((len(rows), len(steps), thumb, thumb, 3), dtype=np.uint8)
    for part in dist.gather(done):
        for r, c, value, small_px, read in part:
            effect[r, c] = value
            thumbs[r, c] = small_px
            for name, v in read.items():
                readings.setdefault(name, np.full(effect.shape, -1, dtype=np.int64))[r, c] = v
    first = {k: int(v[0]) for k, v in (classify(target_px).items() if classify else [])}
    second = {k: int(v[0]) for k, v in (classify(source_px).items() if classify else [])}
    return CausalMap(
        rows=rows,
        steps=steps,
        effect=effect,
        readings=readings,
        thumbs=thumbs,
        target=_pixels(target_px)[0],
        source=_pixels(source_px)[0],
        target_readings=first,
        source_readings=second,
        settings={
            "target": {**t.to_dict(), "seed": target.seed},
            "source": {**s.to_dict(), "seed": source.seed},
            "stream": stream,
            "span": span,
            "pixel_distance_source_target": scale,
        },
    )
