"""Load a FLUX pipeline by registry name or local directory, on a device, optionally offloaded.

    pipe, spec = load_pipeline("flux-tiny")                       # built in code, CPU, float32
    load = LoadOptions.create("flux-toy", device="cpu")           # checked before anything loads
    pipe, spec = load_pipeline(load)
    # load_pipeline("flux-dev", device="cuda", offload="group")   # or "model", "sequential"

Weights load in bfloat16 on CUDA and float32 elsewhere unless `dtype` says otherwise; errors name
the ways out (logging in, a local directory, the offline models).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline

from flux_ir.errors import InvalidArgumentError, ModelUnavailableError
from flux_ir.models.fingerprint import weights_fingerprint
from flux_ir.models.random_init import build_random_pipeline
from flux_ir.models.registry import ModelSpec, resolve_model, write_sidecar
from flux_ir.models.tiny import build_tiny_pipeline
from flux_ir.models.toy import load_toy_pipeline

OFFLOAD_MODES = ("none", "model", "sequential", "group")
WEIGHTS = ("pretrained", "random")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA (FLUX's training dtype), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def normalize_offload(offload: bool | str | None) -> str:
    """`offload` as one of OFFLOAD_MODES (False/None: "none"; True: "model", as the original tool)."""
    if offload is None or offload is False:
        return "none"
    if offload is True:
        return "model"
    if isinstance(offload, str) and offload in OFFLOAD_MODES:
        return offload
    raise InvalidArgumentError(
        f"{{param}} {offload!r} is unknown; use one of {', '.join(OFFLOAD_MODES)} (True means 'model').",
        "offload",
    )


def check_device(device: str | None) -> str:
    """A device flux-ir runs on: "cpu", "cuda" or "cuda:N" (default: cuda when available)."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidArgumentError(
            f"{{param}} {device!r} is not a device name; use cuda, cuda:0 or cpu.", "device"
        ) from err
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(
            f"{{param}} {device!r}: flux-ir runs on cpu or cuda (cuda:N), not {dev.type}.", "device"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"{{param}} {device!r} was asked for but CUDA is not available; use cpu.", "device"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"{{param}} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s).",
                "device",
            )
    return str(dev)


@dataclass(frozen=True)
class LoadOptions:
    """Which pipeline to load and where, validated before anything loads (`LoadOptions.create`).

    spec: the model. device: "cpu", "cuda" or "cuda:N". offload: one of OFFLOAD_MODES. weights:
    "pretrained" or "random" (the exact architecture, random weights, no download). dtype: None for
    bfloat16 on CUDA, float32 elsewhere. weights_dir: flux-toy only, a directory of its safetensors
    (default: $FLUX_IR_TOY_WEIGHTS, else the package's). multi_gpu: place the pipeline's components
    over every visible GPU with diffusers' `device_map="balanced"` (whole components per GPU, for
    weights loaded by `FluxPipeline.from_pretrained`: a hub model or a local directory); `device`
    is then "cuda", the device of the pipeline's inputs.
    """

    spec: ModelSpec
    device: str
    offload: str = "none"
    weights: str = "pretrained"
    dtype: torch.dtype | None = None
    weights_dir: str | None = None
    multi_gpu: bool = False

    @classmethod
    def create(
        cls,
        model: str | ModelSpec,
        device: str | None = None,
        offload: bool | str | None = None,
        weights: str = "pretrained",
        dtype: torch.dtype | None = None,
        weights_dir: str | None = None,
        multi_gpu: bool = False,
    ) -> LoadOptions:
        spec = resolve_model(str(model)) if not isinstance(model, ModelSpec) else model
        if weights not in WEIGHTS:
            raise InvalidArgumentError(
                f"{{param}} {weights!r} is unknown; use one of {', '.join(WEIGHTS)}.", "weights"
            )
        if weights_dir is not None and spec.source != "package":
            raise InvalidArgumentError(
                f"{{param}} is for flux-toy's weights; {spec.name} loads its own", "weights_dir"
            )
        offload = normalize_offload(offload)
        if multi_gpu:
            device = cls._multi_gpu_device(multi_gpu, spec, weights, offload, device)
        device = check_device(device)
        if offload != "none" and torch.device(device).type == "cpu":
            raise InvalidArgumentError(
                f"{{param}} {offload} moves weights between host memory and a GPU; on the CPU "
                "there is nothing to offload: leave it off",
                "offload",
            )
        return cls(spec, device, offload, weights, dtype, weights_dir, bool(multi_gpu))

    @staticmethod
    def _multi_gpu_device(
        multi_gpu: bool, spec: ModelSpec, weights: str, offload: str, device: str | None
    ) -> str:
        """The device of a pipeline spread over the GPUs ("cuda"), or InvalidArgumentError(multi_gpu)
        saying why it cannot be: device maps apply to `FluxPipeline.from_pretrained` only (flux-tiny,
        flux-toy and random weights are built in code), they exclude offloading, and they need 2 GPUs."""
        if multi_gpu is not True:
            raise InvalidArgumentError(
                f"{{param}} is True or False, got {multi_gpu!r}", "multi_gpu"
            )
        if weights == "random" or spec.source in ("builtin", "package"):
            what = "random weights are" if weights == "random" else f"{spec.name} is"
            raise InvalidArgumentError(
                f"{{param}} spreads weights loaded from the hub or a local directory over the GPUs, "
                f"but {what} built in code: run it on one device",
                "multi_gpu",
            )
        if offload != "none":
            raise InvalidArgumentError(
                f"{{param}} places every component on a GPU; it cannot be combined with "
                f"offload={offload!r}",
                "multi_gpu",
            )
        if device is not None and device != "cuda":
            raise InvalidArgumentError(
                f"{{param}} uses every visible GPU; leave the device out (got {device!r}) and choose "
                "the GPUs with CUDA_VISIBLE_DEVICES",
                "multi_gpu",
            )
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < 2:
            raise InvalidArgumentError(
                f"{{param}} needs at least 2 visible CUDA devices; this machine has {n}",
                "multi_gpu",
            )
        return "cuda"

    @property
    def weights_text(self) -> str:
        """What the weights are, in words: "random weights built in code", "shipped weights", ..."""
        if self.spec.source == "builtin":
            return "random weights built in code"
        if self.weights == "random":
            return "random weights"
        if self.spec.source == "package":
            return f"weights from {self.weights_dir}" if self.weights_dir else "shipped weights"
        return "pretrained weights"

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype or default_dtype(self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")


def load_pipeline(
    model: str | ModelSpec | LoadOptions,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    offload: bool | str | None = None,
    weights: str = "pretrained",
    multi_gpu: bool = False,
) -> tuple[FluxPipeline, ModelSpec]:
    """Return `(pipe, spec)`: the pipeline on `device` (or offloaded to it) in `dtype`.

    `model` is a registry name, a local pipeline directory, a `ModelSpec`, or `LoadOptions` (then
    the other arguments are not used). `weights="random"` builds the exact architecture with random
    weights (no download). `multi_gpu=True` spreads the components over the visible GPUs
    (`device_map="balanced"`; `pipe.hf_device_map` says where each went). The weights'
    fingerprint is computed here and cached on the pipeline. Raises ModelUnavailableError with the
    ways out when weights cannot be had.
    """
    if isinstance(model, LoadOptions):
        opts = model
    else:
        opts = LoadOptions.create(model, device, offload, weights, dtype, multi_gpu=multi_gpu)
    spec, device, mode, dtype = opts.spec, opts.device, opts.offload, opts.torch_dtype
    if opts.weights == "random":
        # filled on the device it runs on (seconds on a GPU); offloaded pipelines then rest on the
        # CPU, one parameter at a time; for group offloading on a GPU the resident components stay
        # there and the others go straight into the page-locked memory diffusers offloads them to
        group = mode == "group" and torch.device(device).type == "cuda"
        pipe = build_random_pipeline(
            spec,
            device if mode == "none" else "cpu",
            dtype,
            init_device=device,
            resident=GroupOffload().resident if group else (),
            host="pinned" if group else "pageable",
        )
    elif spec.source == "builtin":
        pipe = build_tiny_pipeline()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif spec.source == "package":
        pipe = load_toy_pipeline(opts.weights_dir, spec.name)  # None: its variable or the package's
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        pipe = _from_pretrained(spec, dtype, device_map="balanced" if opts.multi_gpu else None)
    pipe.set_progress_bar_config(disable=True)
    if not opts.multi_gpu:  # a device-mapped pipeline is placed already (and refuses `.to`)
        place_pipeline(pipe, device, mode)
    weights_fingerprint(pipe)  # cached on the pipeline: a first capture or sweep does not pay it
    return pipe, spec


def transformer_config(opts: LoadOptions) -> dict | None:
    """The transformer's config entries as `load_pipeline(opts)` will build it, read without
    loading a weight (None where that is not cheap: flux-tiny, or no local config to read). Callers
    size host memory with it before the model loads (`flux_ir.capture.prepare_capture`)."""
    spec = opts.spec
    if spec.source == "builtin":
        return None
    if spec.source == "package":
        from flux_ir.models.toy import ARCH, ARCH_2

        return dict((ARCH_2 if spec.name == "flux-toy-2" else ARCH)["transformer"])
    if opts.weights == "random":
        from flux_ir.models.random_init import TRANSFORMER

        return dict(TRANSFORMER)
    from diffusers import FluxTransformer2DModel

    try:  # a local directory, or the hub's cache: never the network
        return dict(
            FluxTransformer2DModel.load_config(
                spec.source, subfolder="transformer", local_files_only=True
            )
        )
    except Exception:  # not downloaded yet: the capture sizes itself when it starts
        return None


def place_pipeline(
    pipe: FluxPipeline, device: str, offload: str = "none", group: GroupOffload | None = None
) -> None:
    """Move `pipe` to `device`, or offload it there with diffusers' CPU offload hooks (`group`
    configures `offload="group"`)."""
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif offload == "group":
        enable_group_offload(pipe, device, group)
    else:
        raise InvalidArgumentError(f"{{param}} {offload!r} is unknown", "offload")


@dataclass(frozen=True)
class GroupOffload:
    """How `--offload group` places a pipeline (diffusers group offloading, per component).

    resident: components kept on the device whole (small ones: the VAE and CLIP are ~0.3 GB in bf16;
        offloading them block by block costs more time than the memory it saves).
    num_blocks_per_group: transformer blocks moved together without streams (on CUDA diffusers uses a
        stream and then moves one block at a time whatever this says).
    record_stream: mark onloaded weights as used by the compute stream instead of synchronising the
        host after every group (lets the CPU run ahead while the next group is prefetched).
    text_encoder_2_level: "leaf_level" (default) or "block_level" for T5. T5 has no block list at
        its top level, so at "block_level" diffusers moves the whole T5 as one group without a
        stream, through pageable memory (8.5 s per prompt for T5-XXL on an H100 host, against
        0.24 s leaf by leaf on the stream).
    """

    resident: tuple[str, ...] = ("vae", "text_encoder")
    num_blocks_per_group: int = 1
    record_stream: bool = True
    text_encoder_2_level: str = "leaf_level"


def enable_group_offload(
    pipe: FluxPipeline, device: str, config: GroupOffload | None = None
) -> None:
    """diffusers group offloading: the transformer (and T5) run one group of blocks at a time on the
    device, the next group prefetched on a side CUDA stream while the current one computes (weights
    rest in pinned CPU memory); `config.resident` components move to the device whole.
    """
    from diffusers.hooks import apply_group_offloading

    config = config or GroupOffload()
    onload = torch.device(device)
    stream = onload.type == "cuda"
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        if name in config.resident:
            component.to(onload)
            continue
        level = config.text_encoder_2_level if name == "text_encoder_2" else "block_level"
        kwargs = dict(
            onload_device=onload,
            offload_device=torch.device("cpu"),
            offload_type=level,
            num_blocks_per_group=config.num_blocks_per_group if level == "block_level" else None,
            use_stream=stream,
            record_stream=stream and config.record_stream,
        )
        if hasattr(component, "enable_group_offload"):
            component.enable_group_offload(**kwargs)
        else:
            apply_group_offloading(component, **kwargs)


def _from_pretrained(
    spec: ModelSpec, dtype: torch.dtype, device_map: str | None = None
) -> FluxPipeline:
    """`FluxPipeline.from_pretrained`; `device_map="balanced"` places whole components over the
    visible GPUs (diffusers' pipeline-level device map) as they load."""
    local = Path(spec.source).is_dir()
    kwargs = {} if device_map is None else {"device_map": device_map}
    try:
        return FluxPipeline.from_pretrained(spec.source, dtype=dtype, **kwargs)
    except Exception as err:  # hub/network/gating errors come in many classes
        if local:
            raise ModelUnavailableError(
                f"could not load the pipeline in {spec.source}: {err}. Is it a complete "
                "FluxPipeline saved with save_pretrained?"
            ) from err
        raise ModelUnavailableError(
            f"could not load {spec.name} ({spec.source}) weights: {type(err).__name__}. Ways out:\n"
            f"  - log in (`hf auth login`) and accept the model's licence on its hub page, with network access;\n"
            f"  - download it elsewhere and pass the local directory: --model /path/to/{spec.source.split('/')[-1]};\n"
            f"  - or run offline: --model flux-toy (a small trained FLUX, shipped) or flux-tiny "
            "(random weights, built in code)"
        ) from err


def save_pipeline(pipe: FluxPipeline, directory: str | Path, spec: ModelSpec) -> Path:
    """`save_pretrained` plus a sidecar with flux-ir's defaults; `--model <directory>` loads it."""
    directory = Path(directory)
    pipe.save_pretrained(directory)
    write_sidecar(spec, directory)
    return directory
