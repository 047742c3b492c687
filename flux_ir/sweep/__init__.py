"""Sweep: latent grids (and 1-D paths) between seeded vertex latents, generated in batches, resumable,
sharded over processes."""

from flux_ir.sweep.config import PRESETS, SweepConfig
from flux_ir.sweep.generate import generate_batch
from flux_ir.sweep.grid import (
    NORMALISATIONS,
    GridPoint,
    GridSpec,
    grid_latents,
    normalise,
    vertex_latents,
)
from flux_ir.sweep.paths import (
    direction_at,
    direction_path,
    lerp_path,
    path_latents,
    slerp_path,
    sweep_latents,
)
from flux_ir.sweep.run import SweepResult, SweepRunOptions, run_sweep
from flux_ir.sweep.shard import Distributed
from flux_ir.sweep.store import SweepStore

__all__ = [
    "NORMALISATIONS",
    "PRESETS",
    "Distributed",
    "GridPoint",
    "GridSpec",
    "SweepRunOptions",
    "SweepConfig",
    "SweepResult",
    "SweepStore",
    "direction_at",
    "direction_path",
    "generate_batch",
    "grid_latents",
    "lerp_path",
    "normalise",
    "path_latents",
    "run_sweep",
    "slerp_path",
    "sweep_latents",
    "vertex_latents",
]
