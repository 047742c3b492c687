"""Edit block outputs while the pipeline runs: a context manager that owns its hooks.

    opts = SamplingOptions.from_spec(spec, width=64, height=64)
    edits = [(Site("double", 0, steps=(0, 1)), zero()), (Site("single", -1), add(torch.ones(32), 0.5))]
    with Intervention(pipe.transformer, edits, num_steps=opts.num_steps):
        images = generate(pipe, opts, seed=1).images

Hooks are registered on the addressed blocks when the context is entered, ahead of any other hook
(so a `BlockTrace` records the edited outputs), and always removed when it exits. Each transformer
call is one pass; with true CFG two run per step, the conditional first (`passes_per_step=2`).
Edited streams are copied before the edit, so nothing else that holds the block's output changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flux_ir.errors import InvalidArgumentError
from flux_ir.intervene.edits import Edit, Site

PASS_NAMES = ("cond", "uncond")


class Intervention:
    """Context manager applying `edits` ([(Site, Edit)], applied in order) to a FLUX transformer.

    `num_steps` resolves negative steps of the sites (needed only when a site has them);
    `passes_per_step` is 2 when the pipeline runs true CFG. `calls` counts transformer passes seen.
    """

    def __init__(
        self,
        transformer: nn.Module,
        edits: Sequence[tuple[Site, Edit]],
        *,
        passes_per_step: int = 1,
        num_steps: int | None = None,
    ):
        if passes_per_step not in (1, 2):
            raise InvalidArgumentError(
                f"{{param}} must be 1 or 2, got {passes_per_step!r}", "passes_per_step"
            )
        self.transformer = transformer
        self.passes_per_step = passes_per_step
        counts = {
            "double": len(transformer.transformer_blocks),
            "single": len(transformer.single_transformer_blocks),
            "temb": 1,
        }
        self.by_block: dict[tuple[str, int], list[tuple[Site, frozenset | None, Edit]]] = {}
        for site, edit in edits:
            if not isinstance(site, Site) or not isinstance(edit, Edit):
                raise InvalidArgumentError(
                    "{param} must be (Site, Edit) pairs, e.g. (Site('single', 3), zero())", "edits"
                )
            n = counts[site.kind]
            if site.kind != "temb" and not -n <= site.block < n:
                raise InvalidArgumentError(
                    f"{{param}} {site.block} is out of range: there are {n} {site.kind} blocks",
                    "block",
                )
            steps = None if site.steps is None else frozenset(_steps(site.steps, num_steps))
            key = (site.kind, 0 if site.kind == "temb" else site.block % n)
            self.by_block.setdefault(key, []).append((site, steps, edit))
        self.edits = list(edits)
        self.calls = 0
        self._pass: tuple[str, int] = ("cond", 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def describe(self) -> list[str]:
        """One line per edit, for a capture's metadata."""
        return [f"{edit.describe()} at {site.describe()}" for site, edit in self.edits]

    def __enter__(self) -> Intervention:
        t = self.transformer
        self._handles.append(t.register_forward_pre_hook(self._on_call))
        blocks = {
            "double": t.transformer_blocks,
            "single": t.single_transformer_blocks,
            "temb": [t.time_text_embed],
        }
        for (kind, index), sites in self.by_block.items():
            hook = self._temb_hook(sites) if kind == "temb" else self._block_hook(sites)
            self._handles.append(blocks[kind][index].register_forward_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_call(self, module: nn.Module, args: tuple) -> None:
        step, which = divmod(self.calls, self.passes_per_step)
        self._pass = (PASS_NAMES[which], step)
        self.calls += 1

    def _block_hook(self, sites: list[tuple[Site, frozenset | None, Edit]]):
        def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]):
            step = self._pass[1]
            txt, img = output  # diffusers blocks return (encoder_hidden_states, hidden_states)
            copied = {"txt": False, "img": False}
            for site, steps, edit in sites:
                if not self._applies(site, steps):
                    continue
                x = img if site.stream == "img" else txt
                if not copied[site.stream]:
                    x = x.clone()
                    copied[site.stream] = True
                tokens = site.token_index(x.shape[1])
                if isinstance(tokens, torch.Tensor):
                    tokens = tokens.to(x.device)
                for b in _batches(site):
                    x[b, tokens] = edit(x[b, tokens], step)
                if site.stream == "img":
                    img = x
                else:
                    txt = x
            return (txt, img)

        return hook

    def _applies(self, site: Site, steps: frozenset | None) -> bool:
        pass_name, step = self._pass
        if steps is not None and step not in steps:
            return False
        return site.passes == "both" or site.passes == pass_name

    def _temb_hook(self, sites: list[tuple[Site, frozenset | None, Edit]]):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = output.clone()
            for site, steps, edit in sites:
                if self._applies(site, steps):
                    for b in (
                        [slice(None)]
                        if site.batch is None
                        else [slice(b, b + 1) for b in site.batch]
                    ):
                        x[b] = edit(x[b].unsqueeze(1), self._pass[1]).squeeze(1)
            return x

        return hook


def _batches(site: Site) -> list[slice]:
    """The batch elements a site edits, as slices (one per element keeps the batch dimension)."""
    return [slice(None)] if site.batch is None else [slice(b, b + 1) for b in site.batch]


def _steps(steps: tuple[int, ...], num_steps: int | None) -> list[int]:
    if any(s < 0 for s in steps):
        if num_steps is None:
            raise InvalidArgumentError(
                "{param}: negative steps need the run's step count (num_steps)", "steps"
            )
        return [s + num_steps if s < 0 else s for s in steps]
    return list(steps)
