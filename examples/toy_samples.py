"""A strip of samples from flux-toy or flux-toy-2, one image per prompt, seeded (the README's pictures).

    uv run python examples/toy_samples.py --model flux-toy-2 --out docs/flux-toy-2-samples.png

Not part of the package. Each prompt is sampled with the model's defaults (flux-toy-2: 16 steps,
true CFG 2) from seed 0, on the CPU; the images are placed side by side, prompts in order.
"""

from __future__ import annotations

import argparse

from PIL import Image

from flux_ir.io.atomic import atomic_path
from flux_ir.models import load_pipeline
from flux_ir.sampling import SamplingOptions, generate

PROMPTS = [
    "a red circle on a blue background",
    "a blue circle and a red square on a white background",
    "two green stars on a yellow background",
    "a large purple hexagon with stripes on a white background",
    "",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux-toy-2")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default="|".join(PROMPTS), help="prompts separated by |")
    args = p.parse_args()
    pipe, spec = load_pipeline(args.model, device="cpu")
    images = []
    for prompt in args.prompts.split("|"):
        opts = SamplingOptions.from_spec(spec, prompt=prompt)
        images += generate(pipe, opts, seed=args.seed, progress=False).images
    w, h = images[0].size
    strip = Image.new("RGB", (w * len(images), h))
    for i, img in enumerate(images):
        strip.paste(img, (i * w, 0))
    with atomic_path(args.out) as tmp:
        strip.save(tmp, format="PNG")
    print(f"wrote {args.out}: {len(images)} samples of {spec.name}, seed {args.seed}")


if __name__ == "__main__":
    main()
