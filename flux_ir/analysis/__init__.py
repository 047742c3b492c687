"""Analysis: image embeddings, the Lipschitz field between grid neighbours, per-step phase maps, the
Fisher metric of a sweep and its geodesics."""

from flux_ir.analysis.embed import (
    EMBEDDERS,
    ClipEmbedder,
    PixelEmbedder,
    embed_files,
    make_embedder,
)
from flux_ir.analysis.fisher import (
    FreeEnergyFit,
    FreeEnergyNet,
    MetricField,
    UnitBox,
    fit_free_energy,
    kernel_posteriors,
    load_free_energy,
    metric_field,
    metric_tensor,
)
from flux_ir.analysis.fisher_sweep import (
    FisherGeometry,
    SweepGeodesic,
    boundary_contrast,
    class_boundaries,
    fisher_geometry,
    geodesic_images,
)
from flux_ir.analysis.geodesic import Geodesic, geodesic
from flux_ir.analysis.lipschitz import Edges, embedding_grid, lipschitz_edges, lipschitz_field
from flux_ir.analysis.sweep import SweepAnalysis, analyze_sweep, open_sweep

__all__ = [
    "EMBEDDERS",
    "ClipEmbedder",
    "Edges",
    "FisherGeometry",
    "FreeEnergyFit",
    "FreeEnergyNet",
    "Geodesic",
    "MetricField",
    "PixelEmbedder",
    "SweepAnalysis",
    "SweepGeodesic",
    "UnitBox",
    "analyze_sweep",
    "boundary_contrast",
    "class_boundaries",
    "embed_files",
    "embedding_grid",
    "fisher_geometry",
    "fit_free_energy",
    "geodesic",
    "geodesic_images",
    "kernel_posteriors",
    "lipschitz_edges",
    "lipschitz_field",
    "load_free_energy",
    "make_embedder",
    "metric_field",
    "metric_tensor",
    "open_sweep",
]
