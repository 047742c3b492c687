"""Train flux-toy (VAE, then transformer and text encoders) on shape scenes within a time budget.

    PYTHONPATH=. python train_toy.py --out toy_weights --time_budget_s 480    # one GPU, ~8.5 minutes
    uv run python train_toy.py --out /tmp/toy --smoke                          # CPU check, seconds

Writes transformer/vae/text_encoder/text_encoder_2 .safetensors (float16), toy.json and losses.json to
--out, after the VAE phase, every --save_every_s seconds and at the end. Copy them to
flux_ir/models/toy_weights/ to ship them, or point $FLUX_IR_TOY_WEIGHTS at --out.
"""

from __future__ import annotations

import argparse
import json

from flux_ir.toy.train import TrainConfig, train_toy


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the weights and logs")
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="wall-clock budget for training and export",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (CPU check)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=None, help="transformer batch size")
    parser.add_argument("--save_every_s", type=float, default=None)
    args = parser.parse_args(argv)
    kw = {"out": args.out, "seed": args.seed, "device": args.device}
    for name in ("time_budget_s", "batch", "save_every_s"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    cfg = TrainConfig.smoke_config(**kw) if args.smoke else TrainConfig(**kw)
    if cfg.time_budget_s <= cfg.reserve_s:
        parser.error(f"--time_budget_s must exceed the {cfg.reserve_s:.0f}s kept for export")
    summary = train_toy(cfg)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    main()
