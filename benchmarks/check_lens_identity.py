"""How exactly does the lens on the last block reproduce the pipeline's next latent, per device/dtype?

    python benchmarks/check_lens_identity.py --out results/         # CUDA bf16 and CPU fp32

For each step it compares (a) the velocity the transformer returned (a forward hook on the transformer)
with the lens velocity from the captured last-block tokens, and (b) the lens "next" latents with the
next step's `img_state`. Reports max |difference| and the bf16/fp32 spacing at that magnitude.
Writes lens_identity.json and lens_identity.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path

import torch

from flux_ir.capture import CaptureOptions, run_capture
from flux_ir.lens import BlockStep, LensHead, block_latents
from flux_ir.models import load_pipeline
from flux_ir.sampling import SamplingOptions


def check(device: str, dtype: torch.dtype, size: int = 256) -> list[dict]:
    pipe, spec = load_pipeline("flux-tiny", device=device, dtype=dtype)
    outputs: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, o: outputs.append(o[0].detach().cpu())
    )
    sampling = SamplingOptions(
        prompt="a photo of a cat", width=size, height=size, num_steps=4, max_sequence_length=32
    )
    opts = CaptureOptions(sampling, seed=1)
    try:
        _, cap = run_capture(pipe, opts, model_name=spec.name)
    finally:
        handle.remove()
    head = LensHead.from_pipeline(pipe)
    ctx = cap.denoising_context
    last = cap.block_indices["single"][-1]
    rows = []
    for k in cap.captured_steps:
        v = head.velocity(cap.image_tokens("single", last, k), ctx["temb"][k]).cpu()
        z = block_latents(head, cap, BlockStep("single", last, k), "next").cpu()
        ref = ctx["img_state"][k + 1] if k + 1 < len(ctx["img_state"]) else ctx["final_latents"]
        rows.append(
            {
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "step": k,
                "velocity_max_abs_diff": (v.float() - outputs[k].float()).abs().max().item(),
                "velocity_bitwise_equal": bool(torch.equal(v, outputs[k])),
                "latent_max_abs_diff": (z.float() - ref.float()).abs().max().item(),
                "latent_bitwise_equal": bool(torch.equal(z, ref)),
                "latent_max_abs": ref.float().abs().max().item(),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    rows = check("cpu", torch.float32)
    if torch.cuda.is_available():
        rows += check("cuda", torch.bfloat16) + check("cuda", torch.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": dt.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    (out / "lens_identity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += [
        "| "
        + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols)
        + " |"
        for r in rows
    ]
    (out / "lens_identity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
