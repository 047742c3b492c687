"""Sampling schedulers: FLUX's flow-matching Euler (the default) and the diffusers solvers that run in
FluxPipeline in their flow-matching configurations, by name.

    scheduler = use_scheduler(pipe, "dpm++2m")       # pipe.scheduler is now DPM-Solver++ (2M)
    opts = SamplingOptions.from_spec(spec, scheduler="unipc", width=32, height=32)
    generate(pipe, opts, seed=1)                     # or per call: generate puts it in place
    use_scheduler(pipe, "euler") is base_scheduler(pipe)                         # back to FLUX's own

Every solver is built from the pipeline's own Euler scheduler's configuration, so it follows the same
noise levels: the same shift (schnell 1, flux-toy 2) or the same resolution-dependent shift (dev,
flux-tiny), with sigmas from 1 to 0 and the model's velocity read as a flow prediction. What differs
is how a step combines the model's outputs:

| name     | diffusers class                                   | next latent from one output |
|----------|---------------------------------------------------|-----------------------------|
| euler    | FlowMatchEulerDiscreteScheduler (FLUX's own)      | yes: x + (s' - s) v        |
| dpm++2m  | DPMSolverMultistepScheduler (dpmsolver++, order 2) | no: multistep              |
| dpm++3m  | DPMSolverMultistepScheduler (dpmsolver++, order 3) | no: multistep              |
| unipc    | UniPCMultistepScheduler (bh2, order 2)            | no: predictor-corrector    |

Each evaluates the transformer once per step at `scheduler.sigmas[k]`, so a capture's step k is one
model call (two with true CFG) as with Euler, and its clean-image estimate x0 = x - s v is the one each
solver computes itself (`convert_model_output` in diffusers). Their last step goes to sigma 0 with a
first-order update, which returns that estimate: the final latent is the x0 of the last step.

Refused, with the reason (`UNSUPPORTED`): diffusers' flow-matching Heun (its `set_timesteps` takes
neither the sigmas nor the shift FluxPipeline passes, and it calls the model twice per step), DEIS
(its flow-sigma schedule ends at the last sigma, not 0: the image keeps noise), SA-Solver (no shift
argument) and the stochastic samplers (flow-matching LCM, SDE-DPM-Solver++: FluxPipeline passes them
no generator, so a seed does not fix the image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flux_ir.errors import InvalidArgumentError

if TYPE_CHECKING:
    from diffusers import FluxPipeline

DEFAULT_SCHEDULER = "euler"
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


@dataclass(frozen=True)
class SchedulerChoice:
    """A scheduler flux-ir offers: its diffusers class, the configuration that makes it a
    flow-matching solver, and whether its step can be computed from one model output (`one_output`:
    then the lens target "next" reproduces it)."""

    name: str
    cls: str
    options: dict[str, Any] = field(default_factory=dict)
    one_output: bool = False
    description: str = ""


SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice(
        "euler",
        "FlowMatchEulerDiscreteScheduler",
        one_output=True,
        description="FLUX's flow-matching Euler (first order)",
    ),
    "dpm++2m": SchedulerChoice(
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        {**FLOW, "algorithm_type": "dpmsolver++", "solver_order": 2},
        description="DPM-Solver++ multistep, second order",
    ),
    "dpm++3m": SchedulerChoice(
        "dpm++3m",
        "DPMSolverMultistepScheduler",
        {**FLOW, "algorithm_type": "dpmsolver++", "solver_order": 3},
        description="DPM-Solver++ multistep, third order",
    ),
    "unipc": SchedulerChoice(
        "unipc",
        "UniPCMultistepScheduler",
        {**FLOW, "solver_order": 2, "solver_type": "bh2"},
        description="UniPC multistep predictor-corrector, second order",
    ),
}

UNSUPPORTED: dict[str, str] = {
    "heun": "diffusers' FlowMatchHeunDiscreteScheduler cannot run in FluxPipeline: its set_timesteps "
    "takes neither the sigmas nor the shift (mu) the pipeline passes, and it calls the model twice per step",
    "deis": "DEISMultistepScheduler's flow-matching schedule ends at its last sigma instead of 0, so "
    "the image keeps noise",
    "sa-solver": "SASolverScheduler's set_timesteps takes no shift (mu), which FluxPipeline passes",
    "lcm": "FlowMatchLCMScheduler adds fresh noise each step and FluxPipeline passes it no generator, "
    "so a seed does not fix the image",
    "dpm++2m-sde": "SDE-DPM-Solver++ adds fresh noise each step and FluxPipeline passes it no "
    "generator, so a seed does not fix the image",
}


def check_scheduler(name, param: str = "scheduler") -> str:
    """`name` if flux-ir offers it, else InvalidArgumentError saying which are (or why not)."""
    if isinstance(name, str) and name in SCHEDULERS:
        return name
    choices = ", ".join(SCHEDULERS)
    if isinstance(name, str) and name.lower() in UNSUPPORTED:
        raise InvalidArgumentError(
            f"{{param}} {name!r} is not offered: {UNSUPPORTED[name.lower()]}; choose one of {choices}",
            param,
        )
    raise InvalidArgumentError(f"{{param}} {name!r} is unknown; choose one of {choices}", param)


def check_lens_target(target: str, scheduler: str | None) -> None:
    """Refuse the "next" lens for a scheduler whose step needs more than one model output."""
    name = scheduler or DEFAULT_SCHEDULER
    choice = SCHEDULERS.get(name)
    if target == "next" and (choice is None or not choice.one_output):
        why = choice.description if choice else "a scheduler flux-ir does not know"
        raise InvalidArgumentError(
            f"{{param}} next reproduces one scheduler step from one model output, but "
            f"{name} ({why}) combines several model outputs per step; use the x0 lens (valid "
            "for every scheduler)",
            "target",
        )


def _flux_adapter(base: type) -> type:
    """`base` with a `set_timesteps` that takes FluxPipeline's arguments: the pipeline passes
    `mu` (its resolution-dependent shift) always; it is used only when the configuration asks for
    dynamic shifting, as FLUX's Euler scheduler does, else the configured `flow_shift` holds."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, **kw):
        if sigmas is not None:
            raise ValueError(f"{type(self).__name__} computes its own flow-matching sigmas")
        if not self.config.get("use_dynamic_shifting", False):
            mu = None
        if mu is not None:
            kw["mu"] = mu
        return base.set_timesteps(self, num_inference_steps, device, **kw)

    # the same name: metadata and reprs name the diffusers solver that runs
    return type(base.__name__, (base,), {"set_timesteps": set_timesteps, "__module__": __name__})


_CLASSES: dict[str, type] = {}


def scheduler_class(choice: SchedulerChoice) -> type:
    import diffusers

    base = getattr(diffusers, choice.cls)
    if choice.name == DEFAULT_SCHEDULER:
        return base
    if choice.cls not in _CLASSES:
        _CLASSES[choice.cls] = _flux_adapter(base)
    return _CLASSES[choice.cls]


def build_scheduler(euler, name: str):
    """A new scheduler `name` with the noise levels of `euler` (a FlowMatchEulerDiscreteScheduler)."""
    choice = SCHEDULERS[check_scheduler(name)]
    cfg = euler.config
    cls = scheduler_class(choice)
    if choice.name == DEFAULT_SCHEDULER:
        return cls.from_config(cfg)
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    if dynamic and cfg.get("time_shift_type", "exponential") != "exponential":
        raise InvalidArgumentError(
            f"{{param}} {name} supports the exponential time shift only; this model's scheduler "
            f"uses {cfg.time_shift_type!r}",
            "scheduler",
        )
    options = {
        "num_train_timesteps": cfg.num_train_timesteps,
        "flow_shift": float(cfg.get("shift", 1.0)),
        "use_dynamic_shifting": dynamic,
        **choice.options,
    }
    scheduler = cls(**options)
    return scheduler


def base_scheduler(pipe: FluxPipeline):
    """The pipeline's own FLUX Euler scheduler (kept when another one is put in its place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cache = pipe.__dict__.setdefault("_flux_ir_schedulers", {})
    if DEFAULT_SCHEDULER not in cache:
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise InvalidArgumentError(
                f"{{param}}: the pipeline's scheduler is a {type(pipe.scheduler).__name__}, not "
                "FLUX's FlowMatchEulerDiscreteScheduler, so flux-ir cannot derive the noise levels "
                "of the others from it",
                "scheduler",
            )
        cache[DEFAULT_SCHEDULER] = pipe.scheduler
    return cache[DEFAULT_SCHEDULER]


def scheduler_name(scheduler) -> str | None:
    """The flux-ir name of a scheduler instance (None: not one flux-ir built or FLUX's own)."""
    name = getattr(scheduler, "_flux_ir_name", None)
    if name is not None:
        return name
    return DEFAULT_SCHEDULER if type(scheduler).__name__ == SCHEDULERS["euler"].cls else None


def use_scheduler(pipe: FluxPipeline, name: str):
    """Put scheduler `name` in the pipeline (one instance per name and pipeline, made once);
    returns it. `"euler"` puts back the pipeline's own."""
    check_scheduler(name)
    if scheduler_name(pipe.scheduler) == name and (
        name != DEFAULT_SCHEDULER or pipe.scheduler is base_scheduler(pipe)
    ):
        return pipe.scheduler
    base = base_scheduler(pipe)
    cache = pipe.__dict__["_flux_ir_schedulers"]
    if name not in cache:
        scheduler = build_scheduler(base, name)
        scheduler._flux_ir_name = name
        cache[name] = scheduler
    # not through the pipeline's register_modules: its saved configuration keeps FLUX's scheduler
    object.__setattr__(pipe, "scheduler", cache[name])
    return cache[name]
