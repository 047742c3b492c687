"""Train flux-toy-2 on the world of several objects, grown from flux-toy; resumable in small files.

    summary = train_toy2(TrainConfig2(out="toy2_weights"))               # ~13 minutes on one H200
    summary = train_toy2(TrainConfig2(out="toy2_weights"), resume=True)   # continue from checkpoint.pt

Warm start (`init_from`, default the package's flux-toy weights): the VAE and both text encoders
start from flux-toy's (new T5 words start from their singular or from the mean word, CLIP's extra
byte positions from its last one), and the transformer grows from 4 + 8 to 6 + 12 blocks: each new
block is a copy of a neighbour with its residual gates zeroed, so the grown model computes exactly
what flux-toy computed (a test checks it) and training starts from there. `init_from` naming
flux-toy-2 weights ("flux-toy-2": the package's, or a directory of this architecture) continues them
instead: every weight loads as it is, the VAE stays frozen, and a new transformer schedule runs.

1. VAE: fine-tuned on world scenes (textures, black and orange are new), then its shift and scale
   measured again, as in `flux_ir.toy.train`.
2. Transformer and text encoders: rectified flow as in `flux_ir.toy.train`, on `num_latents` scenes
   encoded once, each with `variants` captions (the full one and partial ones, `flux_ir.toy.world`),
   tokenised on the device from per-word token tables that reproduce `FluxPipeline.encode_prompt`'s
   tokenisation (a test checks it); each step draws the neutral caption with `p_neutral`, a partial
   one with `p_partial`, else the full one. With `dit_seconds`, the run times its first steps and
   fixes the step count (and the cosine schedule) to what fits that many seconds of transformer
   training over all invocations.

Checkpoints are small enough to travel in 16 MiB files: `checkpoint.pt` holds the run state and the
live weights of the phase's trained modules in float16, `optimizer.pt` Adam's second moments in
bfloat16 (the first moments restart at zero on resume; without the file both do); the EMA weights
and the frozen VAE come back from the exported safetensors. A resumed run therefore follows an uninterrupted one closely, not bit
for bit (flux-toy's trainer keeps that property; this one trades it for files a fraction the size).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import FluxPipeline
from safetensors.torch import load_model

from flux_ir.errors import InvalidArgumentError
from flux_ir.models.toy import ARCH_2, SMOKE_ARCH_2, build_toy_pipeline, toy_weights_dir
from flux_ir.toy.train import (
    CHECKPOINT_FILE,
    Clock,
    DitTraining,
    RunState,
    TrainConfig,
    VaeTraining,
    autocast,
    export_weights,
    finish,
    latent_statistics,
    log,
    setup_device,
    train_vae,
    vae_psnr,
    write_history,
)
from flux_ir.toy.world import NEUTRAL_CAPTION, WORDS, caption, make_world, partial_caption

OPTIMIZER_FILE = "optimizer.pt"
MAX_WORDS = 20  # words in the longest caption, with room to spare
PACKAGE = "package"  # init_from: flux-toy's weights from the package (or $FLUX_IR_TOY_WEIGHTS)
CONTINUE = "flux-toy-2"  # init_from: the package's flux-toy-2 weights (or $FLUX_IR_TOY2_WEIGHTS)


@dataclass
class TrainConfig2(TrainConfig):
    """flux-toy-2's run: `TrainConfig`'s knobs with other defaults, plus the warm start
    (`init_from`: a flux-toy weights directory, "package", "flux-toy-2" or a flux-toy-2 weights
    directory to continue, or None for random weights), caption
    variants per scene and the transformer's time (`dit_seconds`, None: exactly `dit_steps`)."""

    vae_lr: float = 2e-4
    vae_steps: int = 1000
    vae_stop_psnr: float = 34.0
    lr: float = 3e-4
    text_lr: float = 3e-4
    warmup: int = 200
    dit_steps: int = 20000  # a cap; `dit_seconds` sets the count actually trained
    dit_seconds: float | None = 640.0
    p_neutral: float = 0.12
    p_partial: float = 0.3
    variants: int = 4  # captions kept per scene: the full one and variants - 1 partial ones
    init_from: str | None = PACKAGE
    calibrate_steps: tuple[int, int] = (10, 40)  # steps timed (from, to) for `dit_seconds`
    arch: dict = field(default_factory=lambda: copy.deepcopy(ARCH_2))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variants < 1:
            raise InvalidArgumentError(
                f"{{param}} must be at least 1, got {self.variants}", "variants"
            )
        if self.dit_seconds is not None and self.dit_seconds <= 0:
            raise InvalidArgumentError(
                f"{{param}} must be positive (or None), got {self.dit_seconds}", "dit_seconds"
            )

    @classmethod
    def smoke_config(cls, **kw) -> TrainConfig2:
        base = dict(
            smoke=True,
            reserve_s=5.0,
            vae_batch=4,
            vae_steps=3,
            num_latents=16,
            batch=4,
            dit_steps=3,
            dit_seconds=None,
            warmup=2,
            log_every=1,
            init_from=None,
            arch=copy.deepcopy(SMOKE_ARCH_2),
        )
        base.update(kw)
        return cls(**base)

    def signature(self) -> dict:
        sig = super().signature()
        sig.pop("calibrate_steps", None)
        return sig


# ----------------------------------------------------------------------------- warm start


def _zero_gates(linear: torch.nn.Linear, chunks: int, gates: tuple[int, ...]) -> None:
    """Zero the rows of an adaptive-norm projection that produce the residual gates."""
    d = linear.out_features // chunks
    with torch.no_grad():
        for g in gates:
            linear.weight[g * d : (g + 1) * d] = 0
            if linear.bias is not None:
                linear.bias[g * d : (g + 1) * d] = 0


def grow_transformer(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Fill `new` (a FluxTransformer2DModel of the same width, more blocks) from `old`: shared
    layers copied, block j of n from old block floor(j * m / n) of m; a block repeating its
    predecessor's source gets zero residual gates, so `new` computes what `old` does."""
    own = {k: v for k, v in old.state_dict().items() if "transformer_blocks." not in k}
    missing, unexpected = new.load_state_dict(own, strict=False)
    assert not unexpected, unexpected
    assert all("transformer_blocks." in k for k in missing), missing
    for name, chunks, gates, norms in (
        ("transformer_blocks", 6, (2, 5), ("norm1", "norm1_context")),
        ("single_transformer_blocks", 3, (2,), ("norm",)),
    ):
        src, dst = getattr(old, name), getattr(new, name)
        last = -1
        for j, block in enumerate(dst):
            i = j * len(src) // len(dst)
            block.load_state_dict(src[i].state_dict())
            if i == last:
                for norm in norms:
                    _zero_gates(getattr(block, norm).linear, chunks, gates)
            last = i


def grow_text_encoders(new: FluxPipeline, old: FluxPipeline) -> None:
    """CLIP: copied, positions past the old ones start as its last. T5: copied; each word embedding
    row moves to its piece's new id; new words start from their singular (a plural) or the mean
    word row."""
    sd = old.text_encoder.state_dict()
    key = next(k for k in sd if k.endswith("position_embedding.weight"))
    pos_old = sd[key]
    pos_new = new.text_encoder.state_dict()[key].clone()
    n = min(len(pos_old), len(pos_new))
    pos_new[:n] = pos_old[:n]
    pos_new[n:] = pos_old[n - 1]
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    sd[key] = pos_new
    new.text_encoder.load_state_dict(sd, strict=False)

    old_vocab, new_vocab = old.tokenizer_2.get_vocab(), new.tokenizer_2.get_vocab()
    old_emb = old.text_encoder_2.get_input_embeddings().weight.detach()
    words = [i for p, i in old_vocab.items() if p.startswith("\u2581") and len(p) > 2]
    mean = old_emb[words].mean(0)
    rows = torch.empty(len(new_vocab), old_emb.shape[1])
    for piece, i in new_vocab.items():
        if piece in old_vocab:
            rows[i] = old_emb[old_vocab[piece]]
        elif piece.endswith("s") and piece[:-1] in old_vocab:
            rows[i] = old_emb[old_vocab[piece[:-1]]]
        elif piece.endswith("es") and piece[:-2] in old_vocab:
            rows[i] = old_emb[old_vocab[piece[:-2]]]
        else:
            rows[i] = mean
    sd = {k: v for k, v in old.text_encoder_2.state_dict().items() if "shared" not in k}
    sd = {k: v for k, v in sd.items() if "embed_tokens" not in k}
    new.text_encoder_2.load_state_dict(sd, strict=False)
    with torch.no_grad():
        new.text_encoder_2.get_input_embeddings().weight.copy_(rows)


def warm_start(pipe: FluxPipeline, source: FluxPipeline) -> None:
    """`pipe` (flux-toy-2's architecture) from `source` (flux-toy): VAE, text encoders, transformer."""
    pipe.vae.load_state_dict(source.vae.state_dict())
    pipe.vae.register_to_config(
        shift_factor=source.vae.config.shift_factor, scaling_factor=source.vae.config.scaling_factor
    )
    grow_text_encoders(pipe, source)
    grow_transformer(pipe.transformer, source.transformer)


def load_init(cfg: TrainConfig2):
    """The pipeline a run starts from (flux-toy to grow from, or flux-toy-2 weights of this run's
    architecture to continue), or None."""
    from flux_ir.models.toy import load_toy_pipeline

    if cfg.init_from is None:
        return None
    if cfg.init_from == CONTINUE:
        return load_toy_pipeline(toy_weights_dir(None, "flux-toy-2"))
    where = None if cfg.init_from == PACKAGE else cfg.init_from
    return load_toy_pipeline(toy_weights_dir(where, "flux-toy"))


def same_architecture(pipe: FluxPipeline, source: FluxPipeline) -> bool:
    """Whether `source` holds weights of `pipe`'s exact architecture (a run to continue)."""
    return all(
        {k: v.shape for k, v in getattr(pipe, c).state_dict().items()}
        == {k: v.shape for k, v in getattr(source, c).state_dict().items()}
        for c in ("transformer", "vae", "text_encoder", "text_encoder_2")
    )


def continue_from(pipe: FluxPipeline, source: FluxPipeline) -> None:
    """`pipe` takes every weight of `source` (flux-toy-2 weights), the VAE's shift and scale too."""
    for c in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, c).load_state_dict(getattr(source, c).state_dict())
    pipe.vae.register_to_config(
        shift_factor=source.vae.config.shift_factor, scaling_factor=source.vae.config.scaling_factor
    )


# ----------------------------------------------------------------------------- captions


class CaptionTokens:
    """Captions as token ids, made on the device from per-word tables: words [N, MAX_WORDS]
    (indices into `world.WORDS`, -1 after the last) -> CLIP ids [N, clip length] and T5 ids
    [N, T5 length], exactly as `FluxPipeline.encode_prompt` tokenises the same text (padded to the
    pipeline's lengths; no caption is long enough to be truncated)."""

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int, device: torch.device) -> None:
        self.clip_len = pipe.tokenizer_max_length
        self.t5_len = max_sequence_length
        clip, t5 = pipe.tokenizer, pipe.tokenizer_2
        self.clip_bos, self.clip_eos = clip.bos_token_id, clip.eos_token_id
        self.clip_pad = clip.pad_token_id
        self.t5_eos, self.t5_pad = t5.eos_token_id, t5.pad_token_id
        t5_ids, clip_ids = [], []
        for w in WORDS:
            ids = t5(w, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"caption word {w!r} is not one T5 token: {ids}")
            t5_ids.append(ids[0])
            clip_ids.append(clip(w, add_special_tokens=False).input_ids)
        width = max(len(c) for c in clip_ids)
        self.t5_word = torch.tensor(t5_ids, device=device)
        self.clip_word = torch.tensor(
            [c + [0] * (width - len(c)) for c in clip_ids], device=device
        )  # [W, width]
        self.clip_word_len = torch.tensor([len(c) for c in clip_ids], device=device)
        self.index = {w: i for i, w in enumerate(WORDS)}
        self.device = device

    def words(self, captions: list[str]) -> torch.Tensor:
        """Captions -> word indices [N, MAX_WORDS] (-1 padded)."""
        rows = [[self.index[w] for w in text.split()] for text in captions]
        return torch.tensor([r + [-1] * (MAX_WORDS - len(r)) for r in rows], dtype=torch.long)

    def encode(self, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word indices [N, MAX_WORDS] -> (CLIP ids [N, clip_len], T5 ids [N, t5_len]), int64."""
        words = words.to(self.device)
        n = words.shape[0]
        valid = words >= 0
        w = words.clamp(min=0)
        count = valid.sum(1)  # [N]
        t5 = torch.full((n, self.t5_len), self.t5_pad, dtype=torch.long, device=self.device)
        m = min(MAX_WORDS, self.t5_len)
        t5[:, :m] = torch.where(valid, self.t5_word[w], self.t5_pad)[:, :m]
        t5.scatter_(1, count[:, None], self.t5_eos)
        width = self.clip_word.shape[1]
        pieces = self.clip_word[w]  # [N, MAX_WORDS, width]
        keep = (torch.arange(width, device=self.device) < self.clip_word_len[w][..., None]) & valid[
            ..., None
        ]
        keep = keep.flatten(1)
        pos = keep.long().cumsum(1)  # position after BOS
        clip = torch.full((n, self.clip_len), self.clip_pad, dtype=torch.long, device=self.device)
        clip[:, 0] = self.clip_bos
        flat = pieces.flatten(1)
        target = torch.where(keep, pos, 0)  # dropped pieces write BOS's slot, rewritten below
        clip.scatter_(1, target, torch.where(keep, flat, self.clip_bos))
        clip[:, 0] = self.clip_bos
        clip.scatter_(1, (keep.sum(1) + 1)[:, None], self.clip_eos)
        return clip, t5


def caption_words(records: list[dict], rng: random.Random, variants: int) -> list[list[str]]:
    """Per scene: its full caption, then `variants - 1` partial ones."""
    return [[caption(r)] + [partial_caption(r, rng) for _ in range(variants - 1)] for r in records]


@torch.no_grad()
def encode_world(
    pipe: FluxPipeline,
    tokens: CaptionTokens,
    n: int,
    size: int,
    seed: int,
    variants: int,
    device: torch.device,
    batch: int = 512,
) -> dict:
    """Render `n` world scenes and encode them: raw latents [n, 16, h, w] (bf16 on CUDA) and caption
    ids per variant: clip [n, variants, clip_len], t5 [n, variants, t5_len] (int32)."""
    gen = torch.Generator(device).manual_seed(seed)
    rng = random.Random(seed)
    lat, clip, t5 = [], [], []
    for start in range(0, n, batch):
        world = make_world(min(batch, n - start), size, generator=gen, device=device)
        with autocast(device):
            z = pipe.vae.encode(world.images * 2 - 1).latent_dist.mode()
        lat.append(z.to(torch.bfloat16 if device.type == "cuda" else torch.float32))
        texts = caption_words(world.layout.records(), rng, variants)
        words = tokens.words([t for row in texts for t in row])
        c, t = tokens.encode(words)
        clip.append(c.to(torch.int32).view(len(texts), variants, -1))
        t5.append(t.to(torch.int32).view(len(texts), variants, -1))
    neutral_c, neutral_t = tokens.encode(tokens.words([NEUTRAL_CAPTION]))
    return dict(
        latents=torch.cat(lat),
        clip=torch.cat(clip),
        t5=torch.cat(t5),
        neutral_clip=neutral_c[0],
        neutral_t5=neutral_t[0],
    )


def encode_ids(
    pipe: FluxPipeline, clip_ids: torch.Tensor, t5_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids [B, Lc], [B, Lt] -> (T5 embeds [B, Lt, D], CLIP pooled [B, P], text ids [Lt, 3]),
    as `FluxPipeline.encode_prompt` computes them."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=pipe.text_encoder.dtype)
    return embeds.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder.dtype), text_ids


# ----------------------------------------------------------------------------- phases


class VaeTraining2(VaeTraining):
    """The VAE phase on world scenes."""

    def scenes(self, n: int, size: int) -> torch.Tensor:
        return make_world(n, size, generator=self.gen, device=self.device).images


class DitTraining2(DitTraining):
    """flux-toy-2's transformer phase: `DitTraining` with each scene's caption variants, tokenised
    on the device (`encode_world`), instead of flux-toy's caption tables."""

    def setup_captions(self) -> None:
        pass  # the captions come tokenised with the scenes (data["clip"], data["t5"])

    def pick(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids for samples `idx` [B]: neutral with p_neutral, a partial variant with
        p_partial, else the full caption (no host sync)."""
        cfg, data = self.cfg, self.data
        b = idx.shape[0]
        u = torch.rand(b, generator=self.gen, device=self.device)
        v = cfg.variants
        partial = 1 + torch.randint(max(v - 1, 1), (b,), generator=self.gen, device=self.device)
        partial = partial.clamp(max=v - 1)
        variant = torch.where(u < cfg.p_neutral + cfg.p_partial, partial, 0)
        clip = data["clip"][idx, variant].long()
        t5 = data["t5"][idx, variant].long()
        neutral = (u < cfg.p_neutral)[:, None]
        clip = torch.where(neutral, data["neutral_clip"], clip)
        t5 = torch.where(neutral, data["neutral_t5"], t5)
        return clip, t5

    def encode(self, picked) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Each sample's own caption, encoded: row i is sample i."""
        clip, t5 = picked
        return encode_ids(self.pipe, clip, t5), torch.arange(clip.shape[0], device=self.device)


# ----------------------------------------------------------------------------- small checkpoints


def _second_moments(opt: torch.optim.Optimizer) -> dict:
    """Adam's step counts and second moments, in parameter order, bfloat16 on the CPU."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            out[f"{i}.v"] = st["exp_avg_sq"].detach().to("cpu", torch.bfloat16)
            out[f"{i}.step"] = st["step"].detach().float().cpu().reshape(())
    return out


def _restore_moments(opt: torch.optim.Optimizer, saved: dict) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"{i}.v" not in saved:
            continue
        opt.state[p] = dict(
            step=saved[f"{i}.step"].to(p.device, torch.float32),
            exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
            exp_avg_sq=saved[f"{i}.v"].to(p.device, p.dtype),
        )


def save_small_checkpoint(
    out: Path, cfg: TrainConfig2, pipe: FluxPipeline, state: RunState, phase: dict
) -> None:
    """checkpoint.pt (run state, float16 live weights of the modules the phase trains) and
    optimizer.pt (bfloat16 second moments); both load with `weights_only=True`."""
    from flux_ir.io.atomic import atomic_path

    names = ("vae",) if state.phase == "vae" else ("transformer", "text_encoder", "text_encoder_2")
    record = dict(
        signature=json.dumps(cfg.signature(), sort_keys=True),
        state=json.dumps(asdict(state)),
        vae_config=dict(
            shift_factor=float(pipe.vae.config.shift_factor),
            scaling_factor=float(pipe.vae.config.scaling_factor),
        ),
        models={
            k: {
                n: t.detach().to("cpu", torch.float16)
                for n, t in getattr(pipe, k).state_dict().items()
            }
            for k in names
        },
        gen=phase["gen"],
    )
    with atomic_path(out / CHECKPOINT_FILE) as tmp:
        torch.save(record, tmp)
    with atomic_path(out / OPTIMIZER_FILE) as tmp:
        torch.save(_second_moments(phase["opt"]), tmp)


def load_small_checkpoint(
    out: Path, cfg: TrainConfig2, pipe: FluxPipeline
) -> tuple[RunState, dict]:
    """Restore the run state and live weights; in the transformer phase the VAE (frozen) comes from
    `vae.safetensors`. Returns the state and {"gen", "moments"} for the phase to restore."""
    record = torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    mine = json.dumps(cfg.signature(), sort_keys=True)
    if record["signature"] != mine:
        theirs, ours = json.loads(record["signature"]), json.loads(mine)
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise InvalidArgumentError(
            f"{out / CHECKPOINT_FILE} belongs to a run with other settings ({', '.join(diff)}): "
            "resume with the same settings, or start over without --resume"
        )
    state = RunState(**json.loads(record["state"]))
    if state.phase != "vae":
        load_model(pipe.vae, str(out / "vae.safetensors"), strict=True)
    for k, sd in record["models"].items():
        module = getattr(pipe, k)
        module.load_state_dict({n: t.to(torch.float32) for n, t in sd.items()}, strict=False)
    pipe.vae.register_to_config(**record["vae_config"])
    moments = {}
    if (out / OPTIMIZER_FILE).is_file():
        moments = torch.load(out / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    else:
        log(f"no {OPTIMIZER_FILE} in {out}: Adam's moments start again from zero")
    return state, dict(gen=record["gen"], moments=moments)


# ----------------------------------------------------------------------------- driver


def train_transformer2(
    dt: DitTraining2, state: RunState, clock: Clock, deadline: float, base_s: float, save
) -> None:
    """Transformer steps until the step count or `deadline`; with `dit_seconds`, the count is fixed
    once the calibration steps are timed (kept in the run state's summary across invocations)."""
    cfg = dt.cfg
    last_save = clock.elapsed()
    total = state.summary.get("dit_total") or cfg.dit_steps
    first = state.dit_step
    t_from = None
    lo, hi = cfg.calibrate_steps
    while state.dit_step < total and clock.elapsed() < deadline:
        step = state.dit_step
        if cfg.dit_seconds is not None and "dit_total" not in state.summary:
            if step == first + lo or step == first + hi:
                if dt.device.type == "cuda":
                    torch.cuda.synchronize(dt.device)
                if step == first + lo:
                    t_from = clock.elapsed()
                else:
                    rate = (hi - lo) / max(clock.elapsed() - t_from, 1e-6)
                    done_s = state.summary.get("dit_s", 0.0)
                    total = int(
                        min(cfg.dit_steps, max(step + 1, rate * (cfg.dit_seconds - done_s)))
                    )
                    state.summary.update(dit_total=total, dit_steps_per_s=rate)
                    log(f"[dit] {rate:.2f} steps/s: {total} transformer steps in all")
        loss = dt.step(step, total)
        state.dit_step += 1
        if step % cfg.log_every == 0 or state.dit_step == total:
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
                f"[dit] step {step:5d}/{total}  t {rec['t']:6.1f}s  loss {rec['loss']:.4f}  "
                f"lr {rec['lr']:.2e}  skipped {state.skipped}"
            )
        if clock.elapsed() - last_save > cfg.save_every_s:
            save(f"transformer step {state.dit_step}")
            last_save = clock.elapsed()
    state.skipped = int(dt.skipped.item())
    if state.dit_step >= total:
        state.phase = "done"


def train_toy2(cfg: TrainConfig2, resume: bool = False) -> dict:
    """Train (or, with `resume`, continue) flux-toy-2 into `cfg.out`; returns the run's summary
    (`finished` False when the time budget ended this invocation first)."""
    clock = Clock()
    device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_toy_pipeline(cfg.arch, seed=cfg.seed)
    state, restored = RunState(), {}
    if resume and (out / CHECKPOINT_FILE).is_file():
        state, restored = load_small_checkpoint(out, cfg, pipe)
        log(
            f"resuming {out}: phase {state.phase}, VAE step {state.vae_step}, DiT step {state.dit_step}"
        )
    else:
        source = load_init(cfg)
        if source is not None and same_architecture(pipe, source):
            continue_from(pipe, source)  # its VAE is trained: straight to the transformer
            state.phase = "dit"
            log(f"continuing flux-toy-2 weights ({cfg.init_from}); the VAE stays as it is")
        elif source is not None:
            warm_start(pipe, source)
            log(f"warm start from flux-toy ({cfg.init_from})")
    pipe.to(device).set_progress_bar_config(disable=True)
    base_s = state.train_s
    state.summary.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
    )
    size = cfg.arch["sample_size"]
    deadline = max(cfg.time_budget_s - cfg.reserve_s, 1.0)
    dit = f"{cfg.dit_seconds:.0f} s" if cfg.dit_seconds else f"{cfg.dit_steps} steps"
    log(
        f"flux-toy-2 training on {state.summary['device']}: up to {cfg.vae_steps} VAE steps, "
        f"transformer {dit}, {size}x{size} scenes, budget {cfg.time_budget_s:.0f}s, out {out}"
    )

    def checkpoint(opt, gen) -> None:
        state.train_s = round(base_s + clock.elapsed(), 1)
        save_small_checkpoint(out, cfg, pipe, state, dict(opt=opt, gen=gen.get_state()))

    vae_phase = state.phase == "vae"
    if vae_phase:
        vt = VaeTraining2(pipe, cfg, device)
        if restored:
            vt.gen.set_state(restored["gen"])
            _restore_moments(vt.opt, restored["moments"])
        train_vae(vt, state, clock, deadline, base_s)
        if state.phase == "vae":
            checkpoint(vt.opt, vt.gen)
            return finish(state, out, clock, base_s, finished=False)
        restored = {}
    pipe.vae.eval().requires_grad_(False)
    t0 = clock.elapsed()
    tokens = CaptionTokens(pipe, cfg.arch["max_sequence_length"], device)
    data = encode_world(pipe, tokens, cfg.num_latents, size, cfg.seed + 3, cfg.variants, device)
    log(f"[data] {cfg.num_latents} scenes encoded in {clock.elapsed() - t0:.1f}s")
    if vae_phase:
        shift, scale = latent_statistics(data["latents"])
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        state.summary.update(vae_shift_factor=shift, vae_scaling_factor=scale)
        state.summary["vae_psnr_db"] = vae_psnr(
            pipe, 64 if cfg.smoke else 512, size, cfg.seed + 4, device, scenes=make_world
        )
        log(
            f"[vae] shift {shift:.4f}  scale {scale:.4f}  held-out PSNR {state.summary['vae_psnr_db']:.2f} dB"
        )
        export_weights(pipe, out, cfg, dict(milestone="vae", summary=state.summary))
        write_history(out, state)

    dt = DitTraining2(pipe, data, cfg, device)
    if restored:
        dt.gen.set_state(restored["gen"])
        _restore_moments(dt.opt, restored["moments"])
        for k, m in dt.ema.items():  # the EMA comes back from the last export
            load_model(m, str(out / f"{k}.safetensors"), strict=True)

    def save(milestone: str) -> None:
        export_weights(pipe, out, cfg, dict(milestone=milestone, summary=state.summary), dt.ema)
        write_history(out, state)
        log(f"[save] {milestone} -> {out}  (t {base_s + clock.elapsed():.1f}s)")

    if state.phase == "dit":
        t_dit = clock.elapsed()
        train_transformer2(dt, state, clock, deadline, base_s, save)
        state.summary["dit_s"] = round(state.summary.get("dit_s", 0.0) + clock.elapsed() - t_dit, 1)
    state.summary["final_loss"] = next(
        (r["loss"] for r in reversed(state.history) if r["phase"] == "transformer"), None
    )
    done = state.phase == "done"
    state.summary.update(dit_steps_done=state.dit_step, skipped_updates=state.skipped)
    save("final" if done else f"transformer step {state.dit_step}")
    if state.phase != "done":  # the export is the EMA the next invocation restores: same moment
        checkpoint(dt.opt, dt.gen)
    return finish(state, out, clock, base_s, finished=done)
