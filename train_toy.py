"""Train flux-toy (VAE, then transformer and text encoders) on shape scenes, resumably.

    PYTHONPATH=. python train_toy.py --out toy_weights                      # one GPU, ~25 minutes
    PYTHONPATH=. python train_toy.py --out toy_weights --time_budget_s 590  # stop after ~10 minutes ...
    PYTHONPATH=. python train_toy.py --out toy_weights --resume             # ... and go on from there
    uv run python train_toy.py --out /tmp/toy --smoke                        # CPU check, seconds

Learning rates follow the step count, so a run split by --time_budget_s and --resume follows the
same schedule as one uninterrupted run. Writes transformer/vae/text_encoder/text_encoder_2
.safetensors (float16), toy.json and losses.json to --out, after the VAE phase, every --save_every_s
seconds and at the end; checkpoint.pt (for --resume) when the budget stops a run early. Copy the four
.safetensors files and toy.json to flux_ir/models/toy_weights/ to ship them, or point
$FLUX_IR_TOY_WEIGHTS at --out.
"""

from __future__ import annotations

import argparse
import json

from flux_ir.toy.train import TrainConfig, train_toy

OPTIONAL = {
    "time_budget_s": (float, "wall-clock cap of this invocation (default: one hour)"),
    "vae_steps": (int, "VAE steps (it may stop earlier at its PSNR target)"),
    "dit_steps": (int, "transformer steps"),
    "batch": (int, "transformer batch size"),
    "save_every_s": (float, "seconds between weight exports"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the weights and logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (CUDA)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CPU check)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    for name, (kind, text) in OPTIONAL.items():
        parser.add_argument(f"--{name}", type=kind, default=None, help=text)
    args = parser.parse_args(argv)
    kw = {"out": args.out, "seed": args.seed, "device": args.device, "compile": args.compile}
    kw.update({k: getattr(args, k) for k in OPTIONAL if getattr(args, k) is not None})
    cfg = TrainConfig.smoke_config(**kw) if args.smoke else TrainConfig(**kw)
    if cfg.time_budget_s <= cfg.reserve_s:
        parser.error(f"--time_budget_s must exceed the {cfg.reserve_s:.0f}s kept for export")
    for name in ("vae_steps", "dit_steps", "batch"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(cfg, name)}")
    summary = train_toy(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
