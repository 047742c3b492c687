"""Plots: pictures made from captures, lens decodes and sweeps."""

from flux_ir.plots.attention import attention_overlay, heatmap_overlay
from flux_ir.plots.mosaic import labelled_grid, lens_grid, lens_mosaic

__all__ = ["labelled_grid", "lens_grid", "lens_mosaic", "attention_overlay", "heatmap_overlay"]
