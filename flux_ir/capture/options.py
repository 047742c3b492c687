"""Generation settings, validated before any model loads."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from flux_ir.errors import InvalidArgumentError

# FLUX's VAE downsamples 8x and the transformer packs 2x2 latent patches: sizes are multiples of 16.
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate. `guidance` None means the model's default; `seed` must be set."""

    prompt: str
    width: int
    height: int
    num_steps: int
    seed: int
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 512
    num_images: int = 1

    def __post_init__(self) -> None:
        validate_size(self.width, self.height)
        if not isinstance(self.num_steps, int) or self.num_steps <= 0:
            raise InvalidArgumentError(
                f"--num_steps must be a positive integer, got {self.num_steps!r}"
            )
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError(f"--prompt must be text, got {self.prompt!r}")
        if not isinstance(self.seed, int):
            raise InvalidArgumentError(f"--seed must be an integer, got {self.seed!r}")
        if self.num_images < 1:
            raise InvalidArgumentError(f"--num_images must be >= 1, got {self.num_images!r}")
        if self.true_cfg_scale < 1.0:
            raise InvalidArgumentError(
                f"--true_cfg_scale must be >= 1 (1 disables it), got {self.true_cfg_scale}"
            )

    @property
    def true_cfg(self) -> bool:
        """diffusers runs a second (unconditional) pass only with a negative prompt and scale > 1."""
        return self.true_cfg_scale > 1.0 and self.negative_prompt is not None

    def to_dict(self) -> dict:
        return asdict(self)


def validate_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            lo = (
                max(SIZE_MULTIPLE, (value // SIZE_MULTIPLE) * SIZE_MULTIPLE)
                if isinstance(value, int)
                else 256
            )
            raise InvalidArgumentError(
                f"--{name} must be a positive multiple of {SIZE_MULTIPLE} (8x VAE downsampling and 2x2 "
                f"patch packing), got {value!r}; try {lo} or {lo + SIZE_MULTIPLE}."
            )


def validate_output_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that it is writable."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidArgumentError(
            f"--output_dir {path} cannot be created: {err.strerror}"
        ) from err
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"--output_dir {path} is not a writable directory; choose another with --output_dir."
        )
    return path
