"""What a capture generates: the sampling settings, the noise seed and the images per prompt.

opts = CaptureOptions.from_spec(spec, seed=1, prompt="a photo of a cat")   # the model's defaults
opts = CaptureOptions(SamplingOptions.from_spec(spec, num_steps=8), seed=1, num_images=2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flux_ir.errors import InvalidArgumentError
from flux_ir.sampling import SamplingOptions

if TYPE_CHECKING:
    from flux_ir.models.registry import ModelSpec

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class CaptureOptions:
    """`sampling` (what to generate), `seed` (one CPU generator: the same seed gives the same capture
    on any device) and `num_images` (images per prompt, the batch B of every captured tensor)."""

    sampling: SamplingOptions
    seed: int
    num_images: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingOptions):
            raise InvalidArgumentError(
                f"{{param}} must be a SamplingOptions, got {type(self.sampling).__name__}",
                "sampling",
            )
        object.__setattr__(self, "seed", check_seed(self.seed))  # -1 is recorded as 2**64 - 1
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int):
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {self.num_images!r}", "num_images"
            )
        if self.num_images < 1:
            raise InvalidArgumentError(
                f"{{param}} must be >= 1, got {self.num_images!r}", "num_images"
            )

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, seed: int, num_images: int = 1, **sampling: Any
    ) -> CaptureOptions:
        """The model's sampling defaults with `sampling` overrides (see `SamplingOptions.from_spec`)."""
        return cls(SamplingOptions.from_spec(spec, **sampling), seed, num_images)


def check_seed(seed, param: str = "seed") -> int:
    """The seed as torch's CPU generator uses it: an integer from -2**63 to 2**64 - 1 (what
    `manual_seed` accepts), reduced modulo 2**64 as `manual_seed` reduces it, so that seeds giving the
    same noise are recorded alike (-1 and 2**64 - 1 both as 18446744073709551615; 0 to 2**64 - 1 stay
    as they are)."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgumentError(f"{{param}} must be an integer, got {seed!r}", param)
    if not lo <= seed <= hi:
        raise InvalidArgumentError(
            f"{{param}} must lie between -2**63 and 2**64 - 1, got {seed}", param
        )
    return int(seed) % 2**64
