"""Harvest flux-toy's single block 6 image tokens over many captions, train a tiny top-k sparse
autoencoder on them on the CPU, and show the images that most activate its top features.

    uv run python examples/harvest_sae.py --prompts 500 --seconds 60    # docs/flux-toy-sae.png

Not part of the package: it shows that a harvest is a dataset a training loop can read
(`TokenDataset` through a `DataLoader`). Captions come from flux-toy's scenes; each image keeps every
one of its 64 image tokens at the last 4 of 16 steps (single block 6, conditional pass). The SAE:
z = TopK(W_enc (x - b_dec) + b_enc), x_hat = W_dec z + b_dec, with unit-norm decoder columns, trained
with Adam on the mean squared error. A feature's score on an image is its mean activation over the
image's tokens; the figure shows, for the features that fire most often, the images that score
highest, with the tokens where the feature is silent darkened.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flux_ir.capture import Selection
from flux_ir.models import load_pipeline
from flux_ir.sampling import generate
from flux_ir.store.dataset import TokenDataset, open_dataset
from flux_ir.toy.scenes import make_scenes
from flux_ir.workflows.harvest import HarvestOptions, read_prompts, run_harvest

ROOT = Path(__file__).resolve().parents[1]


class TopKSAE(nn.Module):
    def __init__(self, d: int, n: int, k: int):
        super().__init__()
        self.k = k
        self.enc = nn.Linear(d, n)
        self.dec = nn.Linear(n, d)
        with torch.no_grad():
            self.dec.weight.copy_(self.enc.weight.T)
            self.normalise()

    def normalise(self) -> None:
        with torch.no_grad():
            self.dec.weight /= self.dec.weight.norm(dim=0, keepdim=True).clamp(min=1e-8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.enc(x - self.dec.bias)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.dec(z), z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=60.0, help="training time on the CPU")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--output_dir", default="output/harvest-sae")
    ap.add_argument("--figure", default=str(ROOT / "docs" / "flux-toy-sae.png"))
    args = ap.parse_args()
    torch.manual_seed(0)

    pipe, spec = load_pipeline("flux-toy", device="cpu")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = make_scenes(args.prompts, size=32, seed=0).captions
    prompt_file = out / "captions.txt"
    prompt_file.write_text("\n".join(captions) + "\n")
    entries = read_prompts(prompt_file, spec)  # seed i for caption i
    opts = HarvestOptions(Selection.parse("none", "6", "-4--1", "img"), batch_size=24, shard_mb=16)
    t0 = time.perf_counter()
    result = run_harvest(pipe, entries, out / "dataset", opts, model_name=spec.name)
    print(f"{result!r} ({time.perf_counter() - t0:.0f} s)")
    ds = open_dataset(out / "dataset")
    print(ds)

    data = TokenDataset(out / "dataset", block="single.6")
    sample = torch.stack(data.__getitems__(list(range(0, len(data), max(1, len(data) // 4096)))))
    mean, scale = sample.mean(0), sample.norm(dim=1).mean() / sample.shape[1] ** 0.5
    sae = TopKSAE(data[0].shape[0], args.features, args.k)
    optim = torch.optim.Adam(sae.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=512, shuffle=True, drop_last=True)
    start, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - start < args.seconds:
        for batch in loader:
            x = (batch - mean) / scale
            x_hat, _ = sae(x)
            loss = (x_hat - x).pow(2).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            sae.normalise()
            steps += 1
            if time.perf_counter() - start >= args.seconds:
                break
        epochs += 1
    with torch.no_grad():
        x = (sample - mean) / scale
        fvu = ((sae(x)[0] - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    print(
        f"SAE: {steps} steps ({epochs} epochs) in {args.seconds:.0f} s, explained variance {1 - fvu:.2f}"
    )
    figure(pipe, ds, sae, mean, scale, captions, entries, Path(args.figure))


@torch.no_grad()
def figure(pipe, ds, sae, mean, scale, captions, entries, path: Path, features=4, per=5):
    """Top features (by how often they fire) x the images where they fire most (silent tokens
    darkened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ds.select("single.6", step=15)  # the last step: one record per image
    acts = []
    for r in rows.itertuples(index=False):
        x = (ds.activations(r.shard)[r.offset : r.offset + r.count].float() - mean) / scale
        acts.append(sae.encode(x))  # [64 tokens, features]
    acts = torch.stack(acts)  # [images, 64, features]
    fires = (acts > 0).float().mean((0, 1))
    top = fires.argsort(descending=True)[:features]
    items = rows["item"].tolist()
    best = {f: acts[:, :, f].mean(1).argsort(descending=True)[:per].tolist() for f in top.tolist()}
    wanted = sorted({items[i] for b in best.values() for i in b})
    sampling = entries[wanted[0]].sampling  # the captions share flux-toy's settings
    images = generate(  # the images, in one batch
        pipe,
        sampling,
        prompts=[entries[j].sampling.prompt for j in wanted],
        seed=[entries[j].seeds[0] for j in wanted],
    ).images
    image_of = dict(zip(wanted, images))
    fig, axes = plt.subplots(features, per, figsize=(per * 1.6, features * 1.75))
    for row, f in enumerate(top.tolist()):
        for col, i in enumerate(best[f]):
            ax = axes[row, col]
            ax.imshow(np.asarray(image_of[items[i]]))
            mask = (acts[i, :, f] > 0).view(8, 8).numpy()
            ax.imshow(np.kron(mask, np.ones((16, 16))), alpha=0.3, cmap="Greys_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                captions[items[i]].removeprefix("a ").replace(" on a ", "\non "), fontsize=6
            )
            if col == 0:
                ax.set_ylabel(f"feature {f}\nfires {fires[f]:.0%}", fontsize=7)
    fig.suptitle("flux-toy single block 6, last step: top-k SAE features (k=8 of 256)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
