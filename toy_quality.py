"""Measure flux-toy's quality bars and print them as a table (JSON and markdown into --out).

    uv run python toy_quality.py                                  # shipped weights, on the CPU
    PYTHONPATH=. python toy_quality.py --weights toy_weights --device cuda --out results/

Figures: VAE PSNR on held-out scenes, checker colour/shape accuracy on 200 samples, lens convergence
(Spearman over depth), a 20x20 neutral-prompt grid's class shares and Lipschitz ratio, CPU seconds per
128x128 image on 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from flux_ir.errors import FluxIRError
from flux_ir.models.toy import WEIGHTS_ENV


def table(report: dict) -> str:
    """Markdown table of figure / bar / pass."""
    from flux_ir.toy.quality import BARS

    ph = report["phases"]
    shares = ", ".join(f"{k} {v:.0%}" for k, v in ph["class_share"].items())
    rows = [
        (
            "VAE PSNR (dB)",
            f"{report['vae_psnr_db']:.2f}",
            f">= {BARS['vae_psnr_db']}",
            "vae_psnr_db",
        ),
        (
            "colour found",
            f"{report['colour_accuracy']:.1%}",
            f">= {BARS['colour_accuracy']:.0%}",
            "colour_accuracy",
        ),
        (
            "shape found",
            f"{report['shape_accuracy']:.1%}",
            f">= {BARS['shape_accuracy']:.0%}",
            "shape_accuracy",
        ),
        (
            "lens Spearman",
            f"{report['lens_spearman']:.3f}",
            f">= {BARS['lens_spearman']}",
            "lens_spearman",
        ),
        ("grid classes", shares, ">= 2 with >= 10%", "phases"),
        (
            "Lipschitz boundary/inside (scene classes)",
            f"{ph['lipschitz_ratio']:.2f} (shape classes only: {ph['shape_only']['lipschitz_ratio']:.2f})",
            f">= {BARS['lipschitz_ratio']}",
            "lipschitz_ratio",
        ),
    ]
    if "cpu_seconds" in report:
        rows.append(
            (
                "CPU s / 128² image",
                f"{report['cpu_seconds']:.2f}",
                f"<= {BARS['cpu_seconds']}",
                "cpu_seconds",
            )
        )
    lines = ["| figure | value | bar | passed |", "|---|---|---|---|"]
    lines += [
        f"| {a} | {b} | {c} | {'yes' if report['passed'][k] else 'NO'} |" for a, b, c, k in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        default=None,
        help=f"weights directory (default ${WEIGHTS_ENV} or the package's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.environ.get("OUT", "toy_quality"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--lens_prompts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--skip_cpu", action="store_true", help="skip the 2-thread CPU timing")
    args = parser.parse_args(argv)
    if args.weights:
        os.environ[WEIGHTS_ENV] = str(Path(args.weights).resolve())

    from flux_ir.models import load_pipeline
    from flux_ir.store.atomic import write_text
    from flux_ir.toy.quality import measure_all

    try:
        pipe, spec = load_pipeline("flux-toy", device=args.device, dtype=torch.float32)
    except FluxIRError as err:
        raise SystemExit(f"error: {err}") from None
    report = measure_all(
        pipe,
        spec,
        samples=args.samples,
        grid=args.grid,
        lens_prompts=args.lens_prompts,
        batch=args.batch,
        skip_cpu=args.skip_cpu,
    )
    md = table(report)
    out = Path(args.out)
    write_text(out / "toy_quality.json", json.dumps(report, indent=1))
    write_text(out / "toy_quality.md", md + "\n")
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
