"""Plots: pictures made from captures, lens decodes and sweeps."""

from flux_ir.plots.mosaic import labelled_grid

__all__ = ["labelled_grid"]
