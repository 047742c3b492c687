"""Intervene: edit block outputs while sampling (patching, steering, ablation, functions of yours),
addressed like a capture selects them."""

from flux_ir.intervene.edits import Edit, Site, add, apply, mean, replace, zero
from flux_ir.intervene.hooks import Intervention
from flux_ir.intervene.patching import patch_edits, recorded
from flux_ir.intervene.steering import SteeringVector, steering_vector

__all__ = [
    "Edit",
    "Intervention",
    "Site",
    "SteeringVector",
    "add",
    "apply",
    "mean",
    "patch_edits",
    "recorded",
    "replace",
    "steering_vector",
    "zero",
]
