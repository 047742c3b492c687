"""Train flux-toy on shape scenes: the VAE, then the transformer; resumable, step-scheduled.

    summary = train_toy(TrainConfig(out="toy_weights"))                # ~25 minutes on one H100
    summary = train_toy(TrainConfig(out="toy_weights"), resume=True)    # continue from checkpoint.pt

1. VAE: reconstruction (MSE + L1) with a small KL term on freshly rendered scenes, for `vae_steps`
   steps (or until its training PSNR reaches `vae_stop_psnr`); then its shift/scaling factors from data
   the way FLUX's were: shift = mean of the latents, scale = 1 / their standard deviation after the shift.
2. Transformer (and both small text encoders, trained jointly): rectified flow for `dit_steps` steps.
   x_t = (1 - t) x0 + t e, target e - x0, t = shift(sigmoid(n)), n ~ N(0, 1) (SD3/FLUX logit-normal
   sampling, shifted like the scheduler). Text is encoded as `FluxPipeline.encode_prompt` does
   (`CaptionEncoder`), latents packed by `pack_latents`, positions from `_prepare_latent_image_ids`.
   Captions drop to the neutral "" (and to partial captions) at random, so the neutral prompt draws
   every shape. The weights exported are an EMA.

Learning rates follow the step count (warm-up, then cosine), so a run is the same however it is split
into invocations: `time_budget_s` only caps one invocation, which then writes `checkpoint.pt` (models,
EMA, optimizer and random-generator states) for `resume=True` to continue from. The transformer loop
never waits for the GPU except to log: caption choice, timestep sampling and the skip of updates with a
non-finite gradient norm (the fused AdamW's `found_inf`) all stay on the device. Weights are exported
atomically after the VAE phase, every `save_every_s` seconds and at the end.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from safetensors.torch import save_model

from flux_ir.errors import InvalidArgumentError
from flux_ir.geometry import PATCH, pack_latents
from flux_ir.io.atomic import atomic_path
from flux_ir.models.toy import ARCH, CONFIG_FILE, SMOKE_ARCH, build_toy_pipeline
from flux_ir.toy.scenes import COLOURS, NEUTRAL_CAPTION, SHAPES, caption, make_scenes

LOG_FILE = "losses.json"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    """All knobs of a run; `smoke` shrinks everything for a CPU check."""

    out: str = "toy_weights"
    seed: int = 0
    smoke: bool = False
    device: str | None = None
    time_budget_s: float = 3600.0  # caps one invocation; a resumed run gets a new budget
    reserve_s: float = 25.0  # kept back for the checkpoint and the last export
    vae_batch: int = 64
    vae_lr: float = 6e-4
    vae_kl_weight: float = 1e-4  # on the KL summed over latents / pixel count
    vae_steps: int = 3000
    vae_stop_psnr: float = 35.0  # end the VAE phase early once its training PSNR (dB) reaches this
    num_latents: int = 131072  # scenes encoded once for the transformer phase
    batch: int = 2048
    lr: float = 5e-4
    text_lr: float = 3e-4
    warmup: int = 500
    dit_steps: int = 6600
    ema_decay: float = 0.999
    p_neutral: float = 0.15  # caption dropout to the neutral prompt
    p_partial: float = 0.15  # "a red circle" / "a circle" / "a red shape" ...
    log_every: int = 100
    save_every_s: float = 120.0
    compile: bool = False  # torch.compile the transformer's repeated blocks (CUDA)
    arch: dict = field(default_factory=lambda: copy.deepcopy(ARCH))

    def __post_init__(self) -> None:
        if self.time_budget_s <= self.reserve_s:
            raise InvalidArgumentError(
                f"{{param}} must exceed the {self.reserve_s:.0f} s kept for the export, "
                f"got {self.time_budget_s}",
                "time_budget_s",
            )
        for name in ("vae_steps", "dit_steps", "batch", "vae_batch", "num_latents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(
                    f"{{param}} must be a positive integer, got {value!r}", name
                )

    @classmethod
    def smoke_config(cls, **kw) -> TrainConfig:
        base = dict(
            smoke=True,  # a few steps: the step counts end it, not the (default) time budget
            reserve_s=5.0,
            vae_batch=4,
            vae_steps=3,
            num_latents=16,
            batch=4,
            dit_steps=3,
            warmup=2,
            log_every=1,
            arch=copy.deepcopy(SMOKE_ARCH),
        )
        base.update(kw)
        return cls(**base)

    def signature(self) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = {
            "out",
            "device",
            "time_budget_s",
            "reserve_s",
            "log_every",
            "save_every_s",
            "compile",
        }
        return {k: v for k, v in asdict(self).items() if k not in keep}


class Clock:
    """Wall-clock deadlines measured from construction."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(msg: str) -> None:
    print(msg, flush=True)


def lr_at(base: float, step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 5% at step `total`."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(step / max(total, 1), 1.0)
    return base * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """Where a run stands: phase ("vae", "dit" or "done"), steps done per phase, training seconds
    over all invocations, updates skipped for a non-finite gradient, the loss log and the summary."""

    phase: str = "vae"
    vae_step: int = 0
    dit_step: int = 0
    train_s: float = 0.0
    skipped: int = 0
    vae_mse_avg: float = 1.0  # running training MSE of the VAE (its early stop)
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- VAE phase


class VaeTraining:
    """The VAE phase: its optimizer and noise generator, one `step()` at a time."""

    def __init__(self, pipe: FluxPipeline, cfg: TrainConfig, device: torch.device) -> None:
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.vae = pipe.vae.train().requires_grad_(True)
        self.opt = torch.optim.AdamW(
            self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99)
        )
        self.gen = torch.Generator(device).manual_seed(cfg.seed + 1)

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One update on a fresh batch of scenes; returns its loss terms (device tensors)."""
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg.vae_lr, step, cfg.vae_steps)
        x = self.scenes(cfg.vae_batch, cfg.arch["sample_size"]) * 2 - 1
        with autocast(self.device):
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample(generator=self.gen)).sample
        recon = recon.float()
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = mse + 0.1 * (recon - x).abs().mean() + cfg.vae_kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        if torch.isfinite(norm).item():  # the VAE phase is short: a host sync per step is fine
            self.opt.step()
        return dict(loss=loss, mse=mse, kl=kl)

    def scenes(self, n: int, size: int) -> torch.Tensor:
        """A fresh batch of training images [n, 3, size, size] in [0, 1]."""
        return make_scenes(n, size, generator=self.gen, device=self.device).images

    def state_dict(self) -> dict:
        return dict(opt=self.opt.state_dict(), gen=self.gen.get_state())

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])


def train_vae(
    vt: VaeTraining, state: RunState, clock: Clock, deadline: float, base_s: float
) -> None:
    """Run VAE steps until `cfg.vae_steps`, the PSNR stop, or `deadline`; marks the phase done."""
    cfg = vt.cfg
    while state.vae_step < cfg.vae_steps and clock.elapsed() < deadline:
        step = state.vae_step
        terms = vt.step(step)
        if step % 25 == 0:
            mse = terms["mse"].item()
            state.vae_mse_avg = 0.7 * state.vae_mse_avg + 0.3 * mse if step else mse
        if step % cfg.log_every == 0:
            psnr = 10 * math.log10(4.0 / max(terms["mse"].item(), 1e-12))  # pixels in [-1, 1]
            rec = dict(phase="vae", step=step, t=round(base_s + clock.elapsed(), 1), psnr=psnr)
            rec.update({k: v.item() for k, v in terms.items()})
            state.history.append(rec)
            log(
                f"[vae] step {step:5d}  t {rec['t']:6.1f}s  loss {rec['loss']:.5f}  "
                f"psnr {psnr:5.2f} dB  kl {rec['kl']:.3f}"
            )
        state.vae_step += 1
        if step > 500 and 10 * math.log10(4.0 / state.vae_mse_avg) >= cfg.vae_stop_psnr:
            log(f"[vae] training PSNR reached {cfg.vae_stop_psnr} dB at step {step}")
            break
    else:
        if state.vae_step < cfg.vae_steps:
            return  # out of time: the phase goes on after a resume
    state.phase = "dit"
    vt.vae.eval().requires_grad_(False)
    log(f"[vae] done: {state.vae_step} steps")


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


# ----------------------------------------------------------------------------- captions


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


def caption_lookup(index: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """`caption_table`'s index as tensors: full [S, C, C] (same-colour background: -1),
    shape_colour [S, C], shape_only [S], colour_only [C]."""
    s, c = len(SHAPES), len(COLOURS)
    full = torch.full((s, c, c), -1, dtype=torch.long)
    for key, row in index["full"].items():
        full[key] = row
    shape_colour = torch.tensor([[index["shape_colour"][i, j] for j in range(c)] for i in range(s)])
    shape_only = torch.tensor([index["shape_only"][i] for i in range(s)])
    colour_only = torch.tensor([index["colour_only"][j] for j in range(c)])
    out = dict(full=full, shape_colour=shape_colour, shape_only=shape_only, colour_only=colour_only)
    return {k: v.to(device) for k, v in out.items()}


def pick_captions(
    shape: torch.Tensor,
    colour: torch.Tensor,
    bg: torch.Tensor,
    lookup: dict[str, torch.Tensor],
    cfg: TrainConfig,
    gen: torch.Generator,
) -> torch.Tensor:
    """Caption row per sample [B], on the labels' device without a host sync: the neutral caption
    with p_neutral, a partial one with p_partial ("a red circle" twice as often as "a circle" or
    "a red shape"), else the full caption."""
    u = torch.rand(shape.shape, generator=gen, device=shape.device)
    kind = torch.randint(4, shape.shape, generator=gen, device=shape.device)
    sc = lookup["shape_colour"][shape, colour]
    partial = torch.stack([sc, sc, lookup["shape_only"][shape], lookup["colour_only"][colour]], 1)
    partial = partial.gather(1, kind[:, None])[:, 0]
    full = lookup["full"][shape, colour, bg]
    neutral = torch.zeros_like(full)
    return torch.where(
        u < cfg.p_neutral, neutral, torch.where(u < cfg.p_neutral + cfg.p_partial, partial, full)
    )


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
        self, pipe: FluxPipeline, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption rows [K] (None: all) -> (T5 embeds [K, L, D], CLIP pooled [K, P], text ids [L, 3])."""
        clip_ids = self.clip_ids if rows is None else self.clip_ids[rows]
        t5_ids = self.t5_ids if rows is None else self.t5_ids[rows]
        pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        text_ids = torch.zeros(
            embeds.shape[1], 3, device=embeds.device, dtype=pipe.text_encoder.dtype
        )
        return embeds.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder.dtype), text_ids


# ----------------------------------------------------------------------------- transformer phase


def flow_loss(
    pipe: FluxPipeline,
    x0: torch.Tensor,
    text: tuple,
    cap_idx: torch.Tensor,
    gen: torch.Generator,
    shift: float,
    img_ids: torch.Tensor | None = None,
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
    packed = pack_latents(xt)
    target = pack_latents(noise - x0)
    if img_ids is None:
        img_ids = FluxPipeline._prepare_latent_image_ids(
            b, h // PATCH, w // PATCH, device, x0.dtype
        )
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


class DitTraining:
    """The transformer phase: live modules, their EMA, the fused AdamW, caption tables, generator.

    `step()` queues one update without waiting for the GPU: an update whose gradient norm is not
    finite is dropped inside the optimizer (`found_inf`), and counted on the device. Subclasses
    (flux-toy-2's) change how captions are drawn and encoded: `pick` and `encode`.
    """

    def __init__(
        self, pipe: FluxPipeline, data: dict, cfg: TrainConfig, device: torch.device
    ) -> None:
        self.pipe, self.data, self.cfg, self.device = pipe, data, cfg, device
        self.modules = {
            "transformer": pipe.transformer,
            "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2,
        }
        for m in self.modules.values():
            m.train().requires_grad_(True)
        self.ema = {
            k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in self.modules.items()
        }
        self.ema_params = [p for k in self.modules for p in self.ema[k].parameters()]
        self.live_params = [p for k in self.modules for p in self.modules[k].parameters()]
        text_params = list(pipe.text_encoder.parameters()) + list(pipe.text_encoder_2.parameters())
        self.opt = torch.optim.AdamW(
            [
                dict(params=list(pipe.transformer.parameters()), lr=cfg.lr),
                dict(params=text_params, lr=cfg.text_lr),
            ],
            weight_decay=0.01,
            betas=(0.9, 0.99),
            fused=True,
        )
        self.setup_captions()
        self.gen = torch.Generator(device).manual_seed(cfg.seed + 2)
        self.skipped = torch.zeros((), device=device)
        _, _, h, w = data["latents"].shape
        self.img_ids = FluxPipeline._prepare_latent_image_ids(
            cfg.batch, h // 2, w // 2, device, torch.float32
        )
        if cfg.compile:
            pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)

    def setup_captions(self) -> None:
        """flux-toy's caption tables: every caption encoded at each step (a fixed shape)."""
        texts, index = caption_table()
        self.captions = CaptionEncoder(
            self.pipe, texts, self.cfg.arch["max_sequence_length"], self.device
        )
        self.lookup = caption_lookup(index, self.device)

    def pick(self, idx: torch.Tensor):
        """Which caption each sample `idx` [B] is trained with (no host sync)."""
        data = self.data
        return pick_captions(
            data["shape"][idx],
            data["colour"][idx],
            data["background"][idx],
            self.lookup,
            self.cfg,
            self.gen,
        )

    def encode(self, picked) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(text encodings, the row of each sample in them) for `pick`'s choice (under autocast)."""
        return self.captions.encode(self.pipe), picked  # every caption: no host sync

    def step(self, step: int, total: int | None = None) -> torch.Tensor:
        """Queue update number `step` of `total` (default `cfg.dit_steps`); returns its loss (a
        device tensor)."""
        cfg, pipe, data = self.cfg, self.pipe, self.data
        total = cfg.dit_steps if total is None else total
        for g, base in zip(self.opt.param_groups, (cfg.lr, cfg.text_lr)):
            g["lr"] = lr_at(base, step, total, warmup=cfg.warmup)
        n = data["latents"].shape[0]
        idx = torch.randint(n, (cfg.batch,), generator=self.gen, device=self.device)
        scale, shift = pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
        x0 = (data["latents"][idx].float() - shift) * scale
        picked = self.pick(idx)
        with autocast(self.device):
            text, rows = self.encode(picked)
            loss = flow_loss(
                pipe, x0, text, rows, self.gen, float(cfg.arch["scheduler"]["shift"]), self.img_ids
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.live_params, 1.0)
        found_inf = (~torch.isfinite(norm)).float()  # 0-dim, like the step counters
        self.opt.found_inf = found_inf  # the fused AdamW skips the whole update where it is 1
        self.opt.step()
        self.skipped += found_inf
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.live_params, 1 - decay)
        return loss

    def state_dict(self) -> dict:
        return dict(
            opt=self.opt.state_dict(),
            gen=self.gen.get_state(),
            ema={k: m.state_dict() for k, m in self.ema.items()},
        )

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        for k, m in self.ema.items():
            m.load_state_dict(state["ema"][k])


def train_transformer(
    dt: DitTraining, state: RunState, clock: Clock, deadline: float, base_s: float, save
) -> None:
    """Run transformer steps until `cfg.dit_steps` or `deadline`; `save(milestone)` every
    `cfg.save_every_s` seconds. Marks the phase done when all steps are taken."""
    cfg = dt.cfg
    last_save = clock.elapsed()
    while state.dit_step < cfg.dit_steps and clock.elapsed() < deadline:
        step = state.dit_step
        loss = dt.step(step)
        state.dit_step += 1
        if step % cfg.log_every == 0 or state.dit_step == cfg.dit_steps:
            state.skipped = int(dt.skipped.item())
            rec = dict(
                phase="transformer",
                step=step,
                t=round(base_s + clock.elapsed(), 1),
                loss=loss.item(),
                lr=dt.opt.param_groups[0]["lr"],
                skipped=state.skipped,
            )
            state.history.append(rec)
            log(
                f"[dit] step {step:5d}  t {rec['t']:6.1f}s  loss {rec['loss']:.4f}  "
                f"lr {rec['lr']:.2e}  skipped {state.skipped}"
            )
        if clock.elapsed() - last_save > cfg.save_every_s:
            save(f"transformer step {state.dit_step}")
            last_save = clock.elapsed()
    state.skipped = int(dt.skipped.item())
    if state.dit_step >= cfg.dit_steps:
        state.phase = "done"


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
    train = {k: v for k, v in asdict(cfg).items() if k not in ("arch", "out", "device")}
    record = dict(arch=arch, train=train, **info)
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def write_history(out: Path, state: RunState) -> None:
    with atomic_path(out / LOG_FILE) as tmp:
        tmp.write_text(json.dumps(dict(summary=state.summary, history=state.history), indent=1))


@torch.no_grad()
def vae_psnr(
    pipe: FluxPipeline,
    n: int,
    size: int,
    seed: int,
    device: torch.device,
    batch: int = 128,
    scenes=make_scenes,
) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of VAE reconstructions of `n` held-out scenes (`scenes`:
    `make_scenes` or `flux_ir.toy.world.make_world`)."""
    gen = torch.Generator(device).manual_seed(seed)
    values = []
    for start in range(0, n, batch):
        x = scenes(min(batch, n - start), size, generator=gen, device=device).images
        with autocast(device):
            y = pipe.vae.decode(pipe.vae.encode(x * 2 - 1).latent_dist.mode()).sample
        y = ((y.float() + 1) / 2).clamp(0, 1)
        mse = ((y - x) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        values.append(10 * torch.log10(1 / mse))
    return torch.cat(values).mean().item()


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    out: Path, cfg: TrainConfig, pipe: FluxPipeline, state: RunState, phase_state: dict
) -> None:
    """Everything a resumed run needs, in one file loadable with `weights_only=True`."""
    modules = ("transformer", "vae", "text_encoder", "text_encoder_2")
    record = dict(
        signature=json.dumps(cfg.signature(), sort_keys=True),
        state=json.dumps(asdict(state)),
        vae_config=dict(
            shift_factor=float(pipe.vae.config.shift_factor),
            scaling_factor=float(pipe.vae.config.scaling_factor),
        ),
        models={k: getattr(pipe, k).state_dict() for k in modules},
        phase_state=phase_state,
    )
    with atomic_path(out / CHECKPOINT_FILE) as tmp:
        torch.save(record, tmp)


def load_checkpoint(out: Path, cfg: TrainConfig, pipe: FluxPipeline) -> tuple[RunState, dict]:
    """Restore `pipe`'s weights from `out/checkpoint.pt`; returns the run state and phase state."""
    record = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    mine = json.dumps(cfg.signature(), sort_keys=True)
    if record["signature"] != mine:
        theirs, ours = json.loads(record["signature"]), json.loads(mine)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise InvalidArgumentError(
            f"{out / CHECKPOINT_FILE} belongs to a run with other settings ({', '.join(diff)}): "
            "resume with the same settings, or start over without --resume"
        )
    for k, sd in record["models"].items():
        getattr(pipe, k).load_state_dict(sd)
    pipe.vae.register_to_config(**record["vae_config"])
    return RunState(**json.loads(record["state"])), record["phase_state"]


# ----------------------------------------------------------------------------- driver


def setup_device(cfg: TrainConfig) -> torch.device:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        # cuDNN's fused attention backward fails on these shapes (torch 2.11, H100: "mha_graph.execute"
        # errors or silent NaN); the flash and memory-efficient kernels train fine
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def train_toy(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train (or, with `resume`, continue) flux-toy into `cfg.out`; returns the run's summary.

    The summary's `finished` is False when the time budget ended the invocation first: run again
    with `resume=True` to go on.
    """
    clock = Clock()
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_toy_pipeline(cfg.arch, seed=cfg.seed)
    state, phase_state = RunState(), {}
    if resume and (out / CHECKPOINT_FILE).is_file():
        state, phase_state = load_checkpoint(out, cfg, pipe)
        log(
            f"resuming {out}: phase {state.phase}, VAE step {state.vae_step}, DiT step {state.dit_step}"
        )
    pipe.to(device).set_progress_bar_config(disable=True)
    base_s = state.train_s  # training seconds of earlier invocations
    state.summary.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    size = cfg.arch["sample_size"]
    deadline = max(cfg.time_budget_s - cfg.reserve_s, 1.0)
    log(
        f"flux-toy training on {state.summary['device']}: {cfg.vae_steps} VAE + {cfg.dit_steps} "
        f"transformer steps, {size}x{size} scenes, budget {cfg.time_budget_s:.0f}s, out {out}"
    )

    def checkpoint(phase_state: dict) -> None:
        state.train_s = round(base_s + clock.elapsed(), 1)
        save_checkpoint(out, cfg, pipe, state, phase_state)

    vae_phase = state.phase == "vae"
    if vae_phase:
        vt = VaeTraining(pipe, cfg, device)
        if phase_state:
            vt.load_state_dict(phase_state)
        train_vae(vt, state, clock, deadline, base_s)
        if state.phase == "vae":
            checkpoint(vt.state_dict())
            return finish(state, out, clock, base_s, finished=False)
        phase_state = {}  # the transformer phase starts fresh
    pipe.vae.eval().requires_grad_(False)
    data = encode_scenes(pipe, cfg.num_latents, size, cfg.seed + 3, device)
    if vae_phase:  # the VAE's latent statistics, once, right after its training
        shift, scale = latent_statistics(data["latents"])
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        state.summary.update(vae_shift_factor=shift, vae_scaling_factor=scale)
        state.summary["vae_psnr_db"] = vae_psnr(
            pipe, 64 if cfg.smoke else 512, size, cfg.seed + 4, device
        )
        log(
            f"[vae] latents: shift {shift:.4f}  scale {scale:.4f}  held-out PSNR "
            f"{state.summary['vae_psnr_db']:.2f} dB  (t {base_s + clock.elapsed():.1f}s)"
        )
        export_weights(pipe, out, cfg, dict(milestone="vae", summary=state.summary))
        write_history(out, state)

    dt = DitTraining(pipe, data, cfg, device)
    if phase_state:
        dt.load_state_dict(phase_state)

    def save(milestone: str) -> None:
        export_weights(pipe, out, cfg, dict(milestone=milestone, summary=state.summary), dt.ema)
        write_history(out, state)
        log(f"[save] {milestone} -> {out}  (t {base_s + clock.elapsed():.1f}s)")

    if state.phase == "dit":
        train_transformer(dt, state, clock, deadline, base_s, save)
    if state.phase != "done":
        checkpoint(dt.state_dict())
    state.summary["final_loss"] = next(
        (r["loss"] for r in reversed(state.history) if r["phase"] == "transformer"), None
    )
    done = state.phase == "done"
    state.summary.update(dit_steps_done=state.dit_step, skipped_updates=state.skipped)
    save("final" if done else f"transformer step {state.dit_step}")
    return finish(state, out, clock, base_s, finished=done)


def finish(state: RunState, out: Path, clock: Clock, base_s: float, finished: bool) -> dict:
    state.summary.update(finished=finished, train_s=round(base_s + clock.elapsed(), 1))
    write_history(out, state)
    if not finished:
        log(f"time budget reached: continue with --resume (checkpoint in {out / CHECKPOINT_FILE})")
    return state.summary
