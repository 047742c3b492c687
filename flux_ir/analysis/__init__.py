"""Analysis: image embeddings, the Lipschitz field between grid neighbours, per-step phase maps."""

from flux_ir.analysis.embed import (
    EMBEDDERS,
    ClipEmbedder,
    PixelEmbedder,
    embed_files,
    make_embedder,
)
from flux_ir.analysis.lipschitz import Edges, embedding_grid, lipschitz_edges, lipschitz_field
from flux_ir.analysis.sweep import SweepAnalysis, analyze_sweep, open_sweep

__all__ = [
    "EMBEDDERS",
    "ClipEmbedder",
    "Edges",
    "PixelEmbedder",
    "SweepAnalysis",
    "analyze_sweep",
    "embed_files",
    "embedding_grid",
    "lipschitz_edges",
    "lipschitz_field",
    "make_embedder",
    "open_sweep",
]
