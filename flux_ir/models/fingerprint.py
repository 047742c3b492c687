"""A short digest of the weights a pipeline actually holds: which model made a sweep or a capture.

    pipe, _ = load_pipeline("flux-toy")
    weights_fingerprint(pipe)            # '3f9c0a1be2d47c55': 16 hex digits, cached on the pipeline
    weights_fingerprint(pipe, refresh=True)     # after changing weights in place (training)

A model's name says which checkpoint was asked for; the fingerprint says which one was loaded
(`$FLUX_IR_TOY_WEIGHTS` elsewhere, a local directory of the same name, other random weights).

What is hashed (sha256, first 64 bits kept): for every `torch.nn.Module` component of the pipeline
(transformer, VAE, text encoders), its name and class, then for every parameter its name, shape and
dtype and the raw bytes, as stored (a bfloat16 weight hashes as bfloat16: nothing is converted), of a
fixed strided sample of at most `SAMPLE` values (all of them for smaller tensors: biases, norms). The
samples are gathered on the parameter's device and moved to the CPU in one transfer per device, so
the cost is a few thousand values per tensor, however large the weights: for FLUX.1 [dev] with its
text encoders (1,819 tensors, 16.9 B parameters) under 15 MB moved and about 60 ms on an H200 in
bfloat16 (flux-toy on a 2-core CPU: about 40 ms; a cached call: milliseconds). The sample
positions depend only on the shape and the bytes do not depend on the device, so the same weights
give the same fingerprint in every process, on every device and offload mode (weights held by
accelerate's sequential-offload hooks are read from their CPU copies).

Collisions: a different architecture, parameter name, shape or dtype always changes the digest.
Different checkpoints of one architecture (another training run, a fine-tune, other random weights)
agree only if every sampled value of every tensor is bit-identical, which training or random
initialisation leaves essentially impossible (a fine-tune, even a merged LoRA, moves nearly every value
of the matrices it touches, and thousands are sampled from each); two unrelated digests then agree by
chance with probability 2**-64. It identifies checkpoints; it is not a tamper check: an edit confined
to values off the sample goes unseen. Different dtypes of one checkpoint (bfloat16 on CUDA, float32
on the CPU) have different fingerprints, as they make different images.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

SAMPLE = 4096  # values hashed per tensor at most
DIGITS = 16  # hex digits kept (64 bits)
_CACHE = "_flux_ir_weights_fingerprint"  # attribute of the pipeline: (key, fingerprint)


def weights_fingerprint(pipe, refresh: bool = False) -> str:
    """16 hex digits identifying the weights `pipe` holds (see the module's docstring); cached on
    `pipe` (recomputed when its components or their dtypes change, or with `refresh`)."""
    modules = [
        (name, module)
        for name, module in sorted(pipe.components.items())
        if isinstance(module, torch.nn.Module)
    ]
    key = tuple(
        (name, id(module), tuple(sorted({str(p.dtype) for p in module.parameters()})))
        for name, module in modules
    )
    cached = getattr(pipe, _CACHE, None)
    if not refresh and cached is not None and cached[0] == key:
        return cached[1]
    fingerprint = modules_fingerprint(modules)
    try:
        setattr(pipe, _CACHE, (key, fingerprint))
    except AttributeError:  # an object that takes no attributes: no cache
        pass
    return fingerprint


def modules_fingerprint(modules: list[tuple[str, torch.nn.Module]]) -> str:
    """The digest of named modules' parameters (what `weights_fingerprint` hashes)."""
    header: list[str] = [f"flux-ir weights v1 sample={SAMPLE}"]
    samples: dict[torch.device, list[torch.Tensor]] = {}
    where: list[tuple[torch.device, int, int]] = []  # per tensor: device, byte offset, byte length
    offsets: dict[torch.device, int] = {}
    for component, module in modules:
        header.append(f"component {component} {type(module).__name__}")
        for name, value in stored_parameters(module):
            header.append(f"{component}.{name} {tuple(value.shape)} {value.dtype}")
            data = sample_bytes(value)
            dev = data.device
            samples.setdefault(dev, []).append(data)
            start = offsets.get(dev, 0)
            where.append((dev, start, data.numel()))
            offsets[dev] = start + data.numel()
    host = {  # one transfer per device
        dev: torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.uint8)
        for dev, parts in samples.items()
    }
    digest = hashlib.sha256("\n".join(header).encode())
    for dev, start, length in where:  # in parameter order, whatever the devices
        digest.update(host[dev][start : start + length].tobytes())
    return digest.hexdigest()[:DIGITS]


def sample_bytes(value: torch.Tensor) -> torch.Tensor:
    """The raw bytes (uint8, on the tensor's device) of at most SAMPLE values at a fixed stride."""
    flat = value.detach().reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[:: flat.numel() // SAMPLE][:SAMPLE]
    flat = flat.contiguous()
    try:
        return flat.view(torch.uint8)
    except (RuntimeError, TypeError):  # a tensor type without a byte view: its float32 values
        return flat.to(torch.float32).view(torch.uint8)


def stored_parameters(module: torch.nn.Module):
    """(name, tensor) of every parameter once (tied ones under their first name), in module order;
    a parameter that accelerate's offload hooks moved to the meta device is read from the hook's
    weights map, where its values are."""
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        for local, param in sub.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{prefix}.{local}" if prefix else local
            if param.device.type == "meta":
                param = _offloaded(sub, local, name)
            yield name, param


def _offloaded(sub: torch.nn.Module, local: str, name: str) -> torch.Tensor:
    hook = getattr(sub, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", None) or [hook])
    for h in hooks:
        weights = getattr(h, "weights_map", None)
        if weights is not None:
            try:
                return weights[local]
            except KeyError:
                continue
    raise RuntimeError(
        f"cannot fingerprint {name}: it is on the meta device and no offload hook holds its values"
    )
