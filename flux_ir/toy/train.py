"""Train flux-toy on shape scenes within a wall-clock budget: the VAE, then the transformer.

    summary = train_toy(TrainConfig(out="toy_weights", time_budget_s=480))

1. VAE: reconstruction (MSE + L1) with a small KL term on freshly rendered scenes; then its
   shift/scaling factors from data the way FLUX's were: shift = mean of the latents, scale = 1 / their
   standard deviation after the shift.
2. Transformer (and both small text encoders, trained jointly): rectified flow. x_t = (1 - t) x0 + t e,
   target e - x0, t = shift(sigmoid(n)), n ~ N(0, 1) (SD3/FLUX logit-normal sampling, shifted like the
   scheduler). Text is encoded as `FluxPipeline.encode_prompt` does (`CaptionEncoder`), latents
   packed by `_pack_latents`, positions from `_prepare_latent_image_ids`. Captions drop to the
   neutral "" (and to partial captions) at random, so the neutral prompt draws every shape. The
   weights exported are an EMA.

Every phase stops on its share of `time_budget_s`; weights are written atomically after the VAE phase,
every `save_every_s` seconds and at the end, so an interrupted run still leaves a loadable model.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from safetensors.torch import save_model

from flux_ir.models.toy import ARCH, CONFIG_FILE, SMOKE_ARCH, build_toy_pipeline
from flux_ir.store.atomic import atomic_path
from flux_ir.toy.scenes import COLOURS, NEUTRAL_CAPTION, SHAPES, caption, make_scenes

LOG_FILE = "losses.json"


@dataclass
class TrainConfig:
    """All knobs of a run; `smoke` shrinks everything for a CPU check."""

    out: str = "toy_weights"
    time_budget_s: float = 480.0
    vae_fraction: float = 0.38  # share of the training budget spent on the VAE
    reserve_s: float = 25.0  # kept back for setup, statistics, the last export
    seed: int = 0
    smoke: bool = False
    device: str | None = None
    vae_batch: int = 64
    vae_lr: float = 6e-4
    vae_kl_weight: float = 1e-4  # on the KL summed over latents / pixel count
    vae_max_steps: int = 1_000_000
    vae_stop_psnr: float = 35.0  # end the VAE phase once its training PSNR (dB) reaches this
    vae_min_psnr: float = 30.5  # stay past the VAE's share while under this ...
    vae_max_fraction: float = 0.5  # ... up to this share of the budget
    num_latents: int = 65536  # scenes encoded once for the transformer phase
    batch: int = 512
    lr: float = 3e-4
    text_lr: float = 1e-4
    warmup: int = 500
    max_steps: int = 1_000_000
    ema_decay: float = 0.999
    p_neutral: float = 0.15  # caption dropout to the neutral prompt
    p_partial: float = 0.15  # "a red circle" / "a circle" / "a red shape" ...
    log_every: int = 100
    save_every_s: float = 90.0
    arch: dict = field(default_factory=lambda: copy.deepcopy(ARCH))

    @classmethod
    def smoke_config(cls, **kw) -> TrainConfig:
        base = dict(
            smoke=True,
            time_budget_s=60.0,
            reserve_s=5.0,
            vae_batch=4,
            vae_max_steps=3,
            num_latents=16,
            batch=4,
            max_steps=3,
            log_every=1,
            arch=copy.deepcopy(SMOKE_ARCH),
        )
        base.update(kw)
        return cls(**base)


class Clock:
    """Wall-clock deadlines measured from construction."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(msg: str) -> None:
    print(msg, flush=True)


def lr_at(base: float, step: int, progress: float, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay over the phase's time `progress` in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def skip_nonfinite(loss: torch.Tensor, step: int, phase: str) -> bool:
    """True if `loss` is finite; otherwise log it so the caller skips this update."""
    if torch.isfinite(loss).item():
        return True
    log(f"[{phase}] step {step}: non-finite loss {loss.item()}, update skipped")
    return False


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- VAE phase


def train_vae(
    pipe: FluxPipeline,
    cfg: TrainConfig,
    device: torch.device,
    deadline: float,
    hard_deadline: float,
    clock: Clock,
    history: list,
) -> None:
    """Train `pipe.vae` in place until `deadline` (seconds on `clock`), or on to `hard_deadline`
    while its training PSNR is under `cfg.vae_min_psnr`; at most `cfg.vae_max_steps`."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    size = cfg.arch["sample_size"]
    start, step, mse_avg = clock.elapsed(), 0, 1.0
    while step < cfg.vae_max_steps and clock.elapsed() < hard_deadline:
        psnr_avg = 10 * math.log10(4.0 / mse_avg)
        if clock.elapsed() >= deadline and psnr_avg >= cfg.vae_min_psnr:
            break
        if step > 500 and psnr_avg >= cfg.vae_stop_psnr:
            log(
                f"[vae] training PSNR reached {cfg.vae_stop_psnr} dB: the rest goes to the transformer"
            )
            break
        progress = (clock.elapsed() - start) / max(deadline - start, 1e-6)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.vae_lr, step, progress)
        x = make_scenes(cfg.vae_batch, size, generator=gen, device=device).images * 2 - 1
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
        recon = recon.float()
        mse = F.mse_loss(recon, x)
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = mse + 0.1 * l1 + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        if not skip_nonfinite(loss, step, "vae"):
            step += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:  # one host sync every 25 steps
            mse_avg = 0.7 * mse_avg + 0.3 * mse.item() if step else mse.item()
        if step % cfg.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))  # pixels in [-1, 1]
            rec = dict(
                phase="vae",
                step=step,
                t=round(clock.elapsed(), 1),
                loss=loss.item(),
                mse=mse.item(),
                kl=kl.item(),
                psnr=psnr,
            )
            history.append(rec)
            log(
                f"[vae] step {step:5d}  t {rec['t']:6.1f}s  loss {loss.item():.5f}  psnr {psnr:5.2f} dB  kl {kl.item():.3f}"
            )
        step += 1
    vae.eval().requires_grad_(False)
    log(f"[vae] done: {step} steps in {clock.elapsed() - start:.1f}s")


@torch.no_grad()
def encode_scenes(
    pipe: FluxPipeline, n: int, size: int, seed: int, device: torch.device, batch: int = 512
) -> dict:
    """Render `n` scenes and encode them: raw latents [n, 16, h, w] (bf16 on CUDA) and labels [n]."""
    gen = torch.Generator(device).manual_seed(seed)
    lat, shape, colour, bg = [], [], [], []
    for start in range(0, n, batch):
        s = make_scenes(min(batch, n - start), size, generator=gen, device=device)
        with autocast(device):
            z = pipe.vae.encode(s.images * 2 - 1).latent_dist.mode()
        lat.append(z.to(torch.bfloat16 if device.type == "cuda" else torch.float32))
        shape.append(s.shape)
        colour.append(s.colour)
        bg.append(s.background)
    return dict(
        latents=torch.cat(lat),
        shape=torch.cat(shape),
        colour=torch.cat(colour),
        background=torch.cat(bg),
    )


def latent_statistics(latents: torch.Tensor) -> tuple[float, float]:
    """(shift, scale): shift = mean of all latent values, scale = 1 / std after the shift."""
    z = latents.float()
    shift = z.mean().item()
    return shift, 1.0 / (z - shift).std().item()


# ----------------------------------------------------------------------------- transformer phase


def caption_table() -> tuple[list[str], dict]:
    """Every caption the training can ask for, and index helpers (full, partial, neutral)."""
    texts: list[str] = [NEUTRAL_CAPTION]
    full, shape_colour, shape_only, colour_only = {}, {}, {}, {}
    for s, sh in enumerate(SHAPES):
        shape_only[s] = len(texts)
        texts.append(f"a {sh}")
        for c, co in enumerate(COLOURS):
            shape_colour[s, c] = len(texts)
            texts.append(caption(sh, co))
            for b, bo in enumerate(COLOURS):
                if b != c:
                    full[s, c, b] = len(texts)
                    texts.append(caption(sh, co, bo))
    for c, co in enumerate(COLOURS):
        colour_only[c] = len(texts)
        texts.append(f"a {co} shape")
    return texts, dict(
        full=full, shape_colour=shape_colour, shape_only=shape_only, colour_only=colour_only
    )


def pick_captions(
    shape: list[int],
    colour: list[int],
    bg: list[int],
    index: dict,
    cfg: TrainConfig,
    rng: random.Random,
) -> list[int]:
    """Caption index per sample: neutral with p_neutral, a partial caption with p_partial, else full."""
    out = []
    for s, c, b in zip(shape, colour, bg):
        u = rng.random()
        if u < cfg.p_neutral:
            out.append(0)
        elif u < cfg.p_neutral + cfg.p_partial:
            kind = rng.choice(("shape_colour", "shape_colour", "shape_only", "colour_only"))
            key = {"shape_colour": (s, c), "shape_only": s, "colour_only": c}[kind]
            out.append(index[kind][key])
        else:
            out.append(index["full"][s, c, b])
    return out


def sample_t(n: int, shift: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """FLUX/SD3 timesteps: sigmoid of a standard normal, then the scheduler's shift."""
    t = torch.sigmoid(torch.randn(n, generator=gen, device=device))
    return shift * t / (1 + (shift - 1) * t)


class CaptionEncoder:
    """Every training caption tokenised once, exactly as `FluxPipeline.encode_prompt` tokenises it.

    `encode(pipe, rows)` then runs the text encoders as `encode_prompt` does (CLIP pooled output, T5
    last hidden state, zero text ids) without re-tokenising each step; tests check the identity.
    """

    def __init__(
        self, pipe: FluxPipeline, texts: list[str], max_sequence_length: int, device: torch.device
    ) -> None:
        self.clip_ids = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        self.t5_ids = pipe.tokenizer_2(
            texts,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    def encode(
        self, pipe: FluxPipeline, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption rows [K] -> (T5 embeds [K, L, D], CLIP pooled [K, P], text ids [L, 3])."""
        pooled = pipe.text_encoder(self.clip_ids[rows], output_hidden_states=False).pooler_output
        embeds = pipe.text_encoder_2(self.t5_ids[rows], output_hidden_states=False)[0]
        text_ids = torch.zeros(
            embeds.shape[1], 3, device=embeds.device, dtype=pipe.text_encoder.dtype
        )
        return embeds.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder.dtype), text_ids


def flow_loss(
    pipe: FluxPipeline,
    x0: torch.Tensor,
    text: tuple,
    cap_idx: torch.Tensor,
    gen: torch.Generator,
    shift: float,
) -> torch.Tensor:
    """Rectified-flow loss for normalised latents x0 [B, 16, h, w]; `text` = (embeds [K, L, D],
    pooled [K, P], text ids [L, 3]) of K captions, `cap_idx` [B] picks each sample's caption."""
    b, c, h, w = x0.shape
    device = x0.device
    prompt_embeds, pooled, text_ids = text
    t = sample_t(b, shift, gen, device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    tt = t[:, None, None, None]
    xt = (1 - tt) * x0 + tt * noise
    packed = FluxPipeline._pack_latents(xt, b, c, h, w)
    target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, x0.dtype)
    pred = pipe.transformer(
        hidden_states=packed,
        timestep=t,
        guidance=None,
        pooled_projections=pooled[cap_idx],
        encoder_hidden_states=prompt_embeds[cap_idx],
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), target.float())


def train_transformer(
    pipe: FluxPipeline,
    data: dict,
    cfg: TrainConfig,
    device: torch.device,
    deadline: float,
    clock: Clock,
    history: list,
    save,
) -> dict:
    """Train transformer + text encoders until `deadline`; returns the EMA modules' state dicts."""
    modules = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    for m in modules.values():
        m.train().requires_grad_(True)
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    ema_params = [p for k in modules for p in ema[k].parameters()]
    live_params = [p for k in modules for p in modules[k].parameters()]
    opt = torch.optim.AdamW(
        [
            dict(params=list(pipe.transformer.parameters()), lr=cfg.lr),
            dict(
                params=list(pipe.text_encoder.parameters())
                + list(pipe.text_encoder_2.parameters()),
                lr=cfg.text_lr,
            ),
        ],
        weight_decay=0.01,
        betas=(0.9, 0.99),
    )
    texts, index = caption_table()
    captions = CaptionEncoder(pipe, texts, cfg.arch["max_sequence_length"], device)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)
    n = data["latents"].shape[0]
    scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    start, step, last_save, skipped = clock.elapsed(), 0, clock.elapsed(), 0
    while step < cfg.max_steps and clock.elapsed() < deadline:
        progress = (clock.elapsed() - start) / max(deadline - start, 1e-6)
        for g, base in zip(opt.param_groups, (cfg.lr, cfg.text_lr)):
            g["lr"] = lr_at(base, step, progress, warmup=cfg.warmup)
        idx = torch.randint(n, (cfg.batch,), generator=gen, device=device)
        x0 = (data["latents"][idx].float() - shift) * scale
        cap = pick_captions(
            data["shape"][idx].tolist(),
            data["colour"][idx].tolist(),
            data["background"][idx].tolist(),
            index,
            cfg,
            rng,
        )
        used = sorted(set(cap))  # encode each distinct caption once
        where = {c: i for i, c in enumerate(used)}
        cap_idx = torch.tensor([where[c] for c in cap], device=device)
        with autocast(device):
            text = captions.encode(pipe, torch.tensor(used, device=device))
            loss = flow_loss(pipe, x0, text, cap_idx, gen, float(cfg.arch["scheduler"]["shift"]))
        opt.zero_grad(set_to_none=True)
        if not skip_nonfinite(loss, step, "dit"):
            step += 1
            continue
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(live_params, 1.0)
        if not torch.isfinite(norm).item():  # clipping turns inf into NaN: never apply such a step
            opt.zero_grad(set_to_none=True)
            skipped += 1
            if skipped <= 5 or skipped % 100 == 0:
                log(
                    f"[dit] step {step}: non-finite gradient norm, update skipped ({skipped} so far)"
                )
            step += 1
            continue
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        if step % cfg.log_every == 0:
            rec = dict(
                phase="transformer",
                step=step,
                t=round(clock.elapsed(), 1),
                loss=loss.item(),
                lr=opt.param_groups[0]["lr"],
            )
            history.append(rec)
            log(
                f"[dit] step {step:5d}  t {rec['t']:6.1f}s  loss {loss.item():.4f}  lr {rec['lr']:.2e}"
            )
        step += 1
        if clock.elapsed() - last_save > cfg.save_every_s:
            save(ema, f"transformer step {step}")
            last_save = clock.elapsed()
    log(f"[dit] done: {step} steps ({skipped} skipped) in {clock.elapsed() - start:.1f}s")
    return ema


# ----------------------------------------------------------------------------- export


def export_weights(
    pipe: FluxPipeline, out: Path, cfg: TrainConfig, info: dict, modules: dict | None = None
) -> None:
    """Write the four components as float16 safetensors plus `toy.json`, each file atomically.

    `modules` overrides pipeline components (the EMA copies). toy.json is written last: a reader that
    finds it finds weights of the same or a later milestone.
    """
    out.mkdir(parents=True, exist_ok=True)
    parts = {
        "transformer": pipe.transformer,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
        **(modules or {}),
    }
    for name, module in parts.items():
        half = torch.nn.Module.to(
            copy.deepcopy(module), "cpu", torch.float16
        )  # no diffusers warning
        with atomic_path(out / f"{name}.safetensors") as tmp:
            save_model(half, str(tmp))
            tmp.chmod(0o644)
    arch = copy.deepcopy(cfg.arch)
    arch["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    arch["shift_factor"] = float(pipe.vae.config.shift_factor)
    record = dict(
        arch=arch, train=dict(**{k: v for k, v in asdict(cfg).items() if k != "arch"}), **info
    )
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def write_history(out: Path, history: list, summary: dict) -> None:
    with atomic_path(out / LOG_FILE) as tmp:
        tmp.write_text(json.dumps(dict(summary=summary, history=history), indent=1))


@torch.no_grad()
def vae_psnr(
    pipe: FluxPipeline, n: int, size: int, seed: int, device: torch.device, batch: int = 128
) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of VAE reconstructions of `n` held-out scenes."""
    gen = torch.Generator(device).manual_seed(seed)
    values = []
    for start in range(0, n, batch):
        x = make_scenes(min(batch, n - start), size, generator=gen, device=device).images
        with autocast(device):
            y = pipe.vae.decode(pipe.vae.encode(x * 2 - 1).latent_dist.mode()).sample
        y = ((y.float() + 1) / 2).clamp(0, 1)
        mse = ((y - x) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        values.append(10 * torch.log10(1 / mse))
    return torch.cat(values).mean().item()


# ----------------------------------------------------------------------------- driver


def train_toy(cfg: TrainConfig) -> dict:
    """Run both phases within `cfg.time_budget_s` and write the weights to `cfg.out`; return a summary."""
    clock = Clock()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        # cuDNN's fused attention backward fails on these shapes (torch 2.11, H100: "mha_graph.execute"
        # errors or silent NaN); the flash and memory-efficient kernels train fine
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_toy_pipeline(cfg.arch, seed=cfg.seed).to(device)
    pipe.set_progress_bar_config(disable=True)
    history: list = []
    summary: dict = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    size = cfg.arch["sample_size"]
    train_s = max(cfg.time_budget_s - cfg.reserve_s, 1.0)
    log(
        f"flux-toy training on {summary['device']}: budget {cfg.time_budget_s:.0f}s, {size}x{size} scenes, out {out}"
    )

    now = clock.elapsed()
    train_vae(
        pipe,
        cfg,
        device,
        now + cfg.vae_fraction * train_s,
        now + cfg.vae_max_fraction * train_s,
        clock,
        history,
    )
    data = encode_scenes(pipe, cfg.num_latents, size, cfg.seed + 3, device)
    shift, scale = latent_statistics(data["latents"])
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    summary.update(vae_shift_factor=shift, vae_scaling_factor=scale)
    summary["vae_psnr_db"] = vae_psnr(pipe, 64 if cfg.smoke else 512, size, cfg.seed + 4, device)
    log(
        f"[vae] latents: shift {shift:.4f}  scale {scale:.4f}  held-out PSNR {summary['vae_psnr_db']:.2f} dB  (t {clock.elapsed():.1f}s)"
    )
    export_weights(pipe, out, cfg, dict(milestone="vae", summary=summary))
    write_history(out, history, summary)

    def save(ema: dict, milestone: str) -> None:
        export_weights(pipe, out, cfg, dict(milestone=milestone, summary=summary), ema)
        write_history(out, history, summary)
        log(f"[save] {milestone} -> {out}  (t {clock.elapsed():.1f}s)")

    ema = train_transformer(
        pipe, data, cfg, device, cfg.time_budget_s - cfg.reserve_s, clock, history, save
    )
    summary["final_loss"] = history[-1]["loss"] if history else None
    summary["train_s"] = round(clock.elapsed(), 1)
    save(ema, "final")
    return summary
