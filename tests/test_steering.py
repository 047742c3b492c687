"""Steering on flux-toy: a red-to-blue vector of single block 5, added on the shape's tokens, turns
red shapes blue and leaves the white background white (a second-stage test: about 30 images)."""

import pytest
import torch

from flux_ir.intervene import Intervention, Site, SteeringVector, add, steering_vector
from flux_ir.models.toy import has_toy_weights
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.toy.checker import check_images, shape_token_mask
from flux_ir.toy.scenes import COLOURS

SHAPES = ("circle", "square", "triangle")


@pytest.mark.slow
@pytest.mark.skipif(not has_toy_weights(), reason="no flux-toy weights")
def test_a_red_to_blue_vector_on_the_shape_turns_it_blue_and_keeps_the_background(
    toy_pipe, tmp_path
):
    pipe, spec = toy_pipe
    opts = SamplingOptions.from_spec(spec)
    vec = steering_vector(
        pipe, opts,
        toward=[f"a blue {s} on a white background" for s in SHAPES],
        away=[f"a red {s} on a white background" for s in SHAPES],
        kind="single", block=5, seeds=(0, 1),
    )  # fmt: skip
    again = SteeringVector.load(vec.save(tmp_path / "red_to_blue.safetensors"))
    assert torch.equal(again.vectors, vec.vectors) and (again.kind, again.block) == ("single", 5)

    prompts = [f"a red {SHAPES[i % 3]} on a white background" for i in range(8)]
    seeds = list(range(100, 108))
    plain = generate(pipe, opts, prompts=prompts, seed=seeds, output_type="pt").images.float()
    masks = shape_token_mask(plain)
    blue, white = COLOURS.index("blue"), COLOURS.index("white")
    read = check_images(plain)
    assert (read.colour == COLOURS.index("red")).float().mean() >= 0.75
    edits = [
        (Site("single", 5, tokens=masks[j], batch=(j,)), add(lambda k: again.vectors[k], 64.0))
        for j in range(len(prompts))
    ]
    with Intervention(pipe.transformer, edits, passes_per_step=opts.passes_per_step):
        steered = generate(pipe, opts, prompts=prompts, seed=seeds, output_type="pt").images.float()
    read = check_images(steered)
    assert (read.colour == blue).float().mean() >= 0.75
    assert (read.background == white).float().mean() >= 0.75
