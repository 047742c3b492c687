r"""Batch capture into an activation dataset: many prompts and seeds, chosen blocks' token vectors,
streamed into safetensors shards with an index table (`flux_ir.store.dataset`), resumable.

    Path("prompts.txt").write_text("a red circle\na blue square\n")    # or .csv, .yaml
    entries = read_prompts("prompts.txt", spec, seeds_per_prompt=2, width=32, height=32, num_steps=2)
    opts = HarvestOptions(Selection.parse(single_blocks="3", streams="img"), tokens_per_image=4)
    plan = plan_harvest(entries, opts, pipeline_architecture(pipe), "float32")
    print(plan.describe())                        # the size, before any work
    result = run_harvest(pipe, entries, "output/harvest", opts, model_name=spec.name)
    ds = open_dataset("output/harvest")           # see flux_ir.store.dataset

The prompts and their seeds make the items (one image each: entry by entry, seed by seed); items with
the same sampling settings are generated together in batches of `batch_size`, and consecutive batches
fill shards of about `shard_mb` MiB. The plan is a function of the prompts and the options, so the
shards have the same contents whatever processes make them: launched with torchrun (one process per
GPU, over one or several nodes: `torchrun --nnodes N --node_rank R --master_addr HOST ...`, every
process writing to one shared directory), the pending shards are shared out by rank. Re-running the
same command resumes: shards with a commit are skipped, a partial one is generated again.

Token subsampling (`tokens_per_image` k) keeps k image tokens per image, the same positions at every
step and block, drawn without replacement from a generator seeded by (`token_seed`, item); the
positions are stored beside the vectors. Text tokens are kept whole (T5's length, padding included).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flux_ir.capture.copy import AsyncCopier, SyncCopier
from flux_ir.capture.options import check_seed
from flux_ir.capture.select import Selection
from flux_ir.capture.trace import BlockTrace
from flux_ir.errors import InvalidArgumentError
from flux_ir.io.atomic import human_bytes, remove_stale_temporaries, write_text
from flux_ir.models.fingerprint import weights_fingerprint
from flux_ir.models.registry import ModelSpec
from flux_ir.sampling import SamplingOptions, generate
from flux_ir.store.dataset import (
    COMMITS,
    FORMAT,
    MANIFEST,
    PASSES,
    SHARDS,
    STREAMS,
    VERSION,
    StreamingShard,
    committed_shards,
    read_manifest,
    shard_name,
    write_commit,
    write_index,
)
from flux_ir.sweep.shard import Distributed
from flux_ir.sweep.writer import BackgroundWriter
from flux_ir.version import library_versions

SAMPLING_FIELDS = (
    "width",
    "height",
    "num_steps",
    "guidance",
    "negative_prompt",
    "true_cfg_scale",
    "max_sequence_length",
    "scheduler",
)
# names of the sampling notes' YAML (and other spellings) for the same settings
ALIASES = {
    "steps": "num_steps",
    "sample_steps": "num_steps",
    "guidance_scale": "guidance",
    "negative": "negative_prompt",
    "sampler": "scheduler",
    "text": "prompt",
    "caption": "prompt",
}
IGNORED = ("sample_every",)  # training settings of the sampling notes' YAML
PASS_CHOICES = ("cond", "both")
DISK_MARGIN = 1.02  # a harvest is refused unless the disk holds its size and 2% more


@dataclass(frozen=True)
class HarvestEntry:
    """One prompt with its sampling settings (`sampling.prompt` is the prompt) and its seeds."""

    sampling: SamplingOptions
    seeds: tuple[int, ...]

    def to_dict(self) -> dict:
        return {**self.sampling.to_dict(), "seeds": list(self.seeds)}


# -- prompt files ----------------------------------------------------------------------------------
def read_prompts(
    path: str | Path,
    spec: ModelSpec,
    *,
    seeds: Sequence[int] | None = None,
    seeds_per_prompt: int = 1,
    first_seed: int = 0,
    **sampling: Any,
) -> list[HarvestEntry]:
    """Entries of a prompt file: `.txt` (one prompt a line; blank lines and lines starting with #
    skipped), `.csv` (a `prompt` column, optional `seed`/`seeds` ("1;2;3"), width, height,
    num_steps, guidance, negative_prompt, true_cfg_scale, max_sequence_length, scheduler) or
    `.yaml`/`.yml` (a list of prompts or entries with those fields, or a mapping with `prompts:` and
    defaults for every entry, also under `sample:` as in the sampling notes: sample_steps,
    guidance_scale, sampler, width, height, prompts).

    Settings not given by an entry come from the file's defaults, then `sampling` (e.g. the
    command line's), then the model's. Seeds not given by an entry: `seeds` (the same list for every
    prompt), else `seeds_per_prompt` seeds per prompt, numbered from `first_seed` across the file
    (entry i gets first_seed + i * n ... + n - 1).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{{param}} {path} is not a file", "prompts")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        raw, defaults = _yaml_entries(path)
    elif suffix == ".csv":
        raw, defaults = _csv_entries(path), {}
    else:
        lines = path.read_text().splitlines()
        raw = [{"prompt": t.strip()} for t in lines if t.strip() and not t.lstrip().startswith("#")]
        defaults = {}
    if not raw:
        raise InvalidArgumentError(f"{{param}} {path} holds no prompts", "prompts")
    n = seeds_per_prompt
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(
            f"{{param}} must be a positive integer, got {n!r}", "seeds_per_prompt"
        )
    if seeds is not None:
        seeds = tuple(check_seed(int(s), "seeds") for s in _as_list(seeds))
        if not seeds:
            raise InvalidArgumentError("{param} must list at least one seed", "seeds")
    base = {k: v for k, v in sampling.items() if v is not None}
    entries = []
    for i, item in enumerate(raw):
        where = f"{path.name} entry {i + 1}"
        fields = {**defaults, **{k: v for k, v in item.items() if v not in (None, "")}}
        entry_seeds = fields.pop("seeds", None)
        if "seed" in fields:
            entry_seeds = [fields.pop("seed")]
        if entry_seeds is not None:
            entry_seeds = tuple(check_seed(_int(s, where), "seeds") for s in _as_list(entry_seeds))
        elif seeds is not None:
            entry_seeds = seeds
        else:
            entry_seeds = tuple(check_seed(first_seed + i * n + j, "first_seed") for j in range(n))
        prompt = fields.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgumentError(f"{{param}} {where} has no prompt", "prompts")
        unknown = sorted(set(fields) - set(SAMPLING_FIELDS))
        if unknown:
            raise InvalidArgumentError(
                f"{{param}} {where}: unknown field(s) {', '.join(unknown)}; entries take prompt, "
                f"seed(s), {', '.join(SAMPLING_FIELDS)}",
                "prompts",
            )
        for key in ("width", "height", "num_steps", "max_sequence_length"):
            if key in fields:
                fields[key] = _int(fields[key], f"{where}: {key}")
        for key in ("guidance", "true_cfg_scale"):
            if key in fields and isinstance(fields[key], str):
                fields[key] = _float(fields[key], f"{where}: {key}")
        opts = SamplingOptions.from_spec(spec, **{**base, **fields, "prompt": prompt})
        entries.append(HarvestEntry(opts, entry_seeds))
    return entries


def _as_list(value) -> list:
    if isinstance(value, str):
        return [v for v in value.replace(";", ",").split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return list(value)


def _int(value, where: str) -> int:
    try:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool):
            raise ValueError
        return int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{{param}} {where}: {value!r} is not an integer", "prompts"
        ) from err


def _float(value, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{{param}} {where}: {value!r} is not a number", "prompts"
        ) from err


def _normalise(entry: dict, where: str) -> dict:
    out = {}
    for key, value in entry.items():
        key = ALIASES.get(str(key), str(key))
        if key in IGNORED:
            continue
        out[key] = value
    return out


def _yaml_entries(path: Path) -> tuple[list[dict], dict]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InvalidArgumentError(f"{{param}} {path} is not valid YAML: {err}", "prompts") from err
    if isinstance(doc, dict) and set(doc) == {"sample"} and isinstance(doc["sample"], dict):
        doc = doc["sample"]  # the sampling notes' layout
    defaults: dict = {}
    if isinstance(doc, dict):
        defaults = _normalise({k: v for k, v in doc.items() if k != "prompts"}, path.name)
        doc = doc.get("prompts")
    if not isinstance(doc, list):
        raise InvalidArgumentError(
            f"{{param}} {path}: write a list of prompts, or a mapping with a 'prompts' list",
            "prompts",
        )
    out = []
    for i, item in enumerate(doc):
        if isinstance(item, str):
            out.append({"prompt": item})
        elif isinstance(item, dict):
            out.append(_normalise(item, f"{path.name} entry {i + 1}"))
        else:
            raise InvalidArgumentError(
                f"{{param}} {path.name} entry {i + 1}: a prompt or a mapping, got {item!r}",
                "prompts",
            )
    return out, defaults


def _csv_entries(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in [ALIASES.get(c, c) for c in reader.fieldnames]:
            raise InvalidArgumentError(f"{{param}} {path} needs a 'prompt' column", "prompts")
        return [_normalise(row, path.name) for row in reader]


# -- options and plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HarvestOptions:
    """What a harvest keeps and how it writes: `selection` (blocks, steps, streams, dtype, reduction,
    as for captures; default: image tokens of every block at every step), `tokens_per_image` (k
    random image tokens per image, None: all), `token_seed`, `passes` ("cond": the conditional pass;
    "both": with true CFG also the unconditional one), `batch_size` images per pipeline call and
    `shard_mb` (MiB a shard grows to, in whole batches)."""

    selection: Selection = field(default_factory=lambda: Selection(streams="img"))
    tokens_per_image: int | None = None
    token_seed: int = 0
    passes: str = "cond"
    batch_size: int = 8
    shard_mb: float = 256.0

    def __post_init__(self) -> None:
        k = self.tokens_per_image
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer or None, got {k!r}", "tokens_per_image"
            )
        if k is not None and self.selection.streams == "txt":
            raise InvalidArgumentError(
                "{param} subsamples image tokens; the selection keeps only text", "tokens_per_image"
            )
        if self.passes not in PASS_CHOICES:
            raise InvalidArgumentError(
                f"{{param}} {self.passes!r}: choose one of {', '.join(PASS_CHOICES)}", "passes"
            )
        b = self.batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidArgumentError(
                f"{{param}} must be a positive integer, got {b!r}", "batch_size"
            )
        if (
            isinstance(self.shard_mb, bool)
            or not isinstance(self.shard_mb, int | float)
            or not self.shard_mb > 0
        ):
            raise InvalidArgumentError(
                f"{{param}} must be a positive number of MiB, got {self.shard_mb!r}", "shard_mb"
            )
        check_seed(self.token_seed, "token_seed")

    def identity(self) -> dict:
        sel = self.selection
        return {
            "double_blocks": None if sel.double_blocks is None else list(sel.double_blocks),
            "single_blocks": None if sel.single_blocks is None else list(sel.single_blocks),
            "steps": None if sel.steps is None else list(sel.steps),
            **sel.metadata(),
            "tokens_per_image": self.tokens_per_image,
            "token_seed": self.token_seed,
            "passes": self.passes,
            "batch_size": self.batch_size,
            "shard_mb": float(self.shard_mb),
        }


@dataclass(frozen=True)
class Architecture:
    """What a plan needs of the model: its block counts and hidden width."""

    num_double: int
    num_single: int
    hidden_size: int


def pipeline_architecture(pipe) -> Architecture:
    t = pipe.transformer
    return Architecture(
        len(t.transformer_blocks),
        len(t.single_transformer_blocks),
        t.config.num_attention_heads * t.config.attention_head_dim,
    )


def model_architecture(spec: ModelSpec) -> Architecture | None:
    """A model's architecture without loading it (None when it cannot be told)."""
    known = {"flux-tiny": (2, 4, 32), "flux-toy": (4, 8, 128)}
    if spec.name in known:
        return Architecture(*known[spec.name])
    if spec.source.startswith("black-forest-labs/"):
        return Architecture(19, 38, 3072)
    config = Path(spec.source) / "transformer" / "config.json"
    try:
        c = json.loads(config.read_text())
        return Architecture(
            c["num_layers"],
            c["num_single_layers"],
            c["num_attention_heads"] * c["attention_head_dim"],
        )
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Record:
    """Rows of one image at one (step, pass, block, stream)."""

    item: int
    step: int
    pass_index: int
    kind: int
    block: int
    stream: int
    count: int


@dataclass
class BatchPlan:
    """Items generated in one pipeline call, with one `SamplingOptions` (its prompt: the first's)."""

    sampling: SamplingOptions
    items: list[int]
    prompts: list[str]
    seeds: list[int]
    selection: Selection  # resolved against the model and this batch's steps
    txt_tokens: int
    img_tokens: int  # per image and record (after reduction and subsampling)
    all_img_tokens: bool  # no subsampling: every image token is kept
    passes: int  # passes per step recorded (2: cond and uncond)
    key: SamplingOptions  # the settings without the prompt (what a batch shares)
    image_tokens: int  # per image before subsampling (after any reduction)
    token_seed: int

    @property
    def positions(self) -> list[np.ndarray]:
        """Per item, the image token positions kept (sorted; drawn from (token_seed, item))."""
        if self.all_img_tokens:
            return [np.arange(self.image_tokens, dtype=np.int32)] * len(self.items)
        return [
            np.sort(
                np.random.default_rng([self.token_seed, item]).choice(
                    self.image_tokens, size=self.img_tokens, replace=False
                )
            ).astype(np.int32)
            for item in self.items
        ]


@dataclass
class ShardPlan:
    index: int
    batches: list[BatchPlan]
    rows: int
    nbytes: int

    @property
    def records(self) -> list[Record]:
        """Every record in row order (made when the shard is written, not when it is planned)."""
        return [r for batch in self.batches for r in _batch_records(batch)]

    def record_arrays(self) -> dict[str, np.ndarray]:
        records = self.records
        offset, offsets = 0, []
        for r in records:
            offsets.append(offset)
            offset += r.count
        cols = {
            "item": [r.item for r in records],
            "step": [r.step for r in records],
            "pass": [r.pass_index for r in records],
            "kind": [r.kind for r in records],
            "block": [r.block for r in records],
            "stream": [r.stream for r in records],
            "offset": offsets,
            "count": [r.count for r in records],
        }
        return {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}

    def tokens(self) -> np.ndarray:
        """The token position of every row, in row order."""
        out = []
        for batch in self.batches:
            txt = np.arange(batch.txt_tokens, dtype=np.int32)
            positions = dict(zip(batch.items, batch.positions))
            for rec in _batch_records(batch):
                out.append(positions[rec.item] if rec.stream == 0 else txt)
        return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


@dataclass
class HarvestPlan:
    """Every shard of a harvest, the images and vectors it holds, and its size."""

    entries: list[HarvestEntry]
    options: HarvestOptions
    architecture: Architecture
    dtype: str
    shards: list[ShardPlan]

    @property
    def images(self) -> int:
        return sum(len(e.seeds) for e in self.entries)

    @property
    def vectors(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def describe(self, done: set[int] | frozenset = frozenset()) -> str:
        left = sum(s.nbytes for s in self.shards if s.index not in done)
        done_text = f", {len(done)} done ({human_bytes(self.nbytes - left)})" if done else ""
        return (
            f"{self.images} images ({len(self.entries)} prompts), {self.vectors:,} vectors of "
            f"{self.architecture.hidden_size} x {self.dtype}: {human_bytes(self.nbytes)} in "
            f"{len(self.shards)} shards{done_text}"
        )


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _batch_records(batch: BatchPlan) -> list[Record]:
    """Records of one batch in the order its rows arrive: step, pass, block (double then single),
    stream (img, txt), image."""
    sel = batch.selection
    blocks = [(0, i) for i in sel.double_blocks] + [(1, i) for i in sel.single_blocks]
    streams = [s for s, name in enumerate(STREAMS) if sel.streams in ("both", name)]
    out = []
    for step in sel.steps:
        for p in range(batch.passes):
            for kind, index in blocks:
                for stream in streams:
                    count = batch.img_tokens if stream == 0 else batch.txt_tokens
                    for item in batch.items:
                        out.append(Record(item, step, p, kind, index, stream, count))
    return out


def plan_harvest(
    entries: Sequence[HarvestEntry], options: HarvestOptions, architecture: Architecture, dtype: str
) -> HarvestPlan:
    """Batches and shards of a harvest (deterministic: the same inputs give the same shards)."""
    if not entries:
        raise InvalidArgumentError("{param}: no prompts to harvest", "prompts")
    arch = architecture
    sel = options.selection
    k = options.tokens_per_image
    width = DTYPE_BYTES.get(sel.store_dtype or dtype, 4) * arch.hidden_size
    passes = 2 if options.passes == "both" else 1
    # items in entry order, grouped into batches of consecutive items with equal settings
    batches: list[BatchPlan] = []
    item = 0
    for entry in entries:
        s = entry.sampling
        resolved = sel.resolve(arch.num_double, arch.num_single, s.num_steps)
        if not resolved.double_blocks and not resolved.single_blocks:
            raise InvalidArgumentError("{param}: no block selected", "single_blocks")
        if not resolved.steps:
            raise InvalidArgumentError("{param}: no step selected", "steps")
        resolved.check_grid(*s.token_grid)
        h, w = s.token_grid
        n_img = (
            1
            if sel.reduce == "mean"
            else (h * w if sel.pool is None else (h // sel.pool) * (w // sel.pool))
        )
        n_txt = 1 if sel.reduce == "mean" else s.max_sequence_length
        if k is not None and k > n_img:
            raise InvalidArgumentError(
                f"{{param}} {k} exceeds the {n_img} image tokens of {s.width}x{s.height}"
                + (f" after {sel.reduce}" if sel.reduce else ""),
                "tokens_per_image",
            )
        key = replace(s, prompt="")
        for seed in entry.seeds:
            last = batches[-1] if batches else None
            if last is None or last.key != key or len(last.items) >= options.batch_size:
                img = n_img if k is None else k
                p = min(passes, s.passes_per_step)
                last = BatchPlan(
                    s,
                    [],
                    [],
                    [],
                    resolved,
                    n_txt,
                    img,
                    k is None,
                    p,
                    key,
                    n_img,
                    options.token_seed,
                )
                batches.append(last)
            last.items.append(item)
            last.prompts.append(s.prompt)
            last.seeds.append(seed)
            item += 1
    target = options.shard_mb * (1 << 20)
    shards: list[ShardPlan] = []
    current: list[BatchPlan] = []
    rows = 0
    for batch in batches:
        current.append(batch)
        rows += _batch_rows(batch)
        if rows * width >= target:
            shards.append(ShardPlan(len(shards), current, rows, rows * (width + 4)))
            current, rows = [], 0
    if current:
        shards.append(ShardPlan(len(shards), current, rows, rows * (width + 4)))
    return HarvestPlan(list(entries), options, arch, sel.store_dtype or dtype, shards)


def _batch_rows(batch: BatchPlan) -> int:
    """Rows of a batch (what `_batch_records` counts, without making the records)."""
    sel = batch.selection
    blocks = len(sel.double_blocks) + len(sel.single_blocks)
    per_image = (batch.img_tokens if sel.streams != "txt" else 0) + (
        batch.txt_tokens if sel.streams != "img" else 0
    )
    return len(batch.items) * len(sel.steps) * batch.passes * blocks * per_image


# -- running ---------------------------------------------------------------------------------------
@dataclass
class HarvestResult:
    root: Path
    generated: int  # shards written by this process
    skipped: int  # shards already done when the run started
    images: int  # images generated by this process
    bytes_written: int
    seconds: float

    def __repr__(self) -> str:
        return (
            f"HarvestResult({self.root}: {self.generated} shard(s), {self.images} image(s), "
            f"{human_bytes(self.bytes_written)} written here in {self.seconds:.1f} s, "
            f"{self.skipped} shard(s) already done)"
        )


def check_disk(root: str | Path, needed: int) -> None:
    """Refuse (InvalidArgumentError, output_dir) when the disk under `root` cannot hold `needed`."""
    path = Path(root).expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * DISK_MARGIN > free:
        raise InvalidArgumentError(
            f"{{param}} {path}: the harvest needs {human_bytes(int(needed))} but the disk holds "
            f"{human_bytes(free)} free; keep fewer tokens per image, select fewer blocks or "
            "steps, or choose another disk",
            "output_dir",
        )


def identity(plan: HarvestPlan, model_name: str, fingerprint: str | None) -> dict:
    arch = plan.architecture
    return {
        "model": model_name,
        "weights_fingerprint": fingerprint,
        "num_double_blocks": arch.num_double,
        "num_single_blocks": arch.num_single,
        "hidden_size": arch.hidden_size,
        "dtype": plan.dtype,
        **plan.options.identity(),
    }


def claim_directory(root: Path, plan: HarvestPlan, ident: dict, extra: dict) -> bool:
    """Create the manifest, or check that the directory holds this harvest; True when resuming."""
    entries = [e.to_dict() for e in plan.entries]
    path = root / MANIFEST
    if path.is_file():
        manifest = read_manifest(root)
        theirs = manifest["identity"]
        differ = sorted(k for k in set(theirs) | set(ident) if theirs.get(k) != ident.get(k))
        if differ:
            raise InvalidArgumentError(
                f"{root} holds a different harvest (differs in: {', '.join(differ)}); re-run with its "
                "settings to resume it, or choose another {param}",
                "output_dir",
            )
        if manifest["entries"] != entries:
            raise InvalidArgumentError(
                f"{root} was harvested from other prompts, seeds or sampling settings; re-run with "
                "the same prompt file to resume it, or choose another {param}",
                "output_dir",
            )
        return True
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": ident,
        "entries": entries,
        "shards_planned": len(plan.shards),
        "images": plan.images,
        "vectors": plan.vectors,
        "bytes": plan.nbytes,
        "complete": False,
        **extra,
    }
    write_text(path, json.dumps(manifest, indent=1))
    return False


def run_harvest(
    pipe,
    entries: Sequence[HarvestEntry],
    out_dir: str | Path,
    options: HarvestOptions | None = None,
    *,
    model_name: str = "unknown",
    dist: Distributed | None = None,
    copier: str = "auto",
    progress: bool = True,
    extra_metadata: dict | None = None,
) -> HarvestResult:
    """Harvest `entries` into the dataset directory `out_dir` (module docstring); resume it if it
    holds the same harvest. Prints nothing; refuses before generating when the disk cannot hold what
    is left. `copier`: "auto" (page-locked side-stream copies on CUDA, plain copies on the CPU),
    "pinned", "pageable" or "sync"."""
    options = options or HarvestOptions()
    dist = dist or Distributed()
    root = Path(out_dir)
    start = time.perf_counter()
    dtype = str(pipe.transformer.dtype).removeprefix("torch.")
    plan = plan_harvest(entries, options, pipeline_architecture(pipe), dtype)
    ident = identity(plan, model_name, weights_fingerprint(pipe))
    extra = {
        "processes": dist.world,
        "device": str(pipe._execution_device),
        "versions": library_versions("numpy"),
        "timestamp": dt.datetime.now().isoformat(timespec="seconds"),
        **(extra_metadata or {}),
    }
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        claim_directory(root, plan, ident, extra)
        remove_stale_temporaries(root, root / SHARDS, root / COMMITS)
    dist.barrier()
    if not dist.is_main:
        claim_directory(root, plan, ident, extra)  # the same check in every process
    done = set(committed_shards(root))
    pending = [s for s in plan.shards if s.index not in done]
    if dist.is_main:
        check_disk(root, sum(s.nbytes for s in pending))
    dist.barrier()
    mine = dist.shard(pending)
    images = written = 0
    if mine:
        images, written = _harvest_shards(pipe, root, mine, options, copier, progress, dist)
    dist.barrier()
    if dist.is_main:
        write_index(root)
        manifest = read_manifest(root)
        manifest["complete"] = len(committed_shards(root)) == len(plan.shards)
        manifest.update({k: v for k, v in extra.items() if k != "versions"})
        write_text(root / MANIFEST, json.dumps(manifest, indent=1))
    dist.barrier()
    return HarvestResult(
        root,
        len(mine),
        len(plan.shards) - len(pending),
        images,
        written,
        time.perf_counter() - start,
    )


def make_harvest_copier(kind: str, device):
    if kind == "auto":
        kind = "pinned" if torch.device(device).type == "cuda" else "sync"
    if kind == "sync":
        return SyncCopier()
    return AsyncCopier(dest=kind)


def _harvest_shards(pipe, root, shards, options, copier_kind, progress, dist) -> tuple[int, int]:
    from tqdm.auto import tqdm

    copier = make_harvest_copier(copier_kind, pipe._execution_device)
    total = sum(len(b.items) for s in shards for b in s.batches)
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"harvest {dist.rank}/{dist.world}" if dist.world > 1 else "harvest",
        disable=not progress,
        position=dist.rank,
        dynamic_ncols=True,
    )
    wanted_passes = PASSES if options.passes == "both" else PASSES[:1]
    images = written = 0
    writer = BackgroundWriter(max_pending=4, name="harvest-writer")
    state: dict = {"shard": None}
    hidden = pipeline_architecture(pipe).hidden_size
    try:
        with writer, bar:
            for plan in shards:
                shard = StreamingShard(
                    root / SHARDS / shard_name(plan.index),
                    plan.rows,
                    hidden,
                    _torch_dtype(plan, pipe),
                    plan.tokens(),
                    plan.record_arrays(),
                )
                state["shard"] = shard
                for batch in plan.batches:
                    _generate_batch(pipe, batch, shard, writer, copier, wanted_passes)
                    images += len(batch.items)
                    writer.submit(bar.update, len(batch.items))

                def commit(plan=plan, shard=shard) -> None:
                    size, sha = shard.finish()
                    write_commit(root, plan.index, size, sha, plan.record_arrays())
                    state["written"] = state.get("written", 0) + size

                writer.submit(commit)
    except BaseException:
        shard = state.get("shard")
        if shard is not None:
            shard.abort()
        if isinstance(copier, AsyncCopier):
            copier.close()
        raise
    if isinstance(copier, AsyncCopier):
        copier.close()
    written = state.get("written", 0)
    return images, written


def _torch_dtype(plan: ShardPlan, pipe) -> torch.dtype:
    sel = plan.batches[0].selection
    return sel.torch_dtype or pipe.transformer.dtype


def _generate_batch(pipe, batch: BatchPlan, shard: StreamingShard, writer, copier, wanted) -> None:
    """One pipeline call with the trace's sink handing each pass's tensors to the writer thread."""
    s = batch.sampling
    sel = batch.selection
    blocks = [("double", i) for i in sel.double_blocks] + [("single", i) for i in sel.single_blocks]
    want_img = sel.streams in ("both", "img")
    want_txt = sel.streams in ("both", "txt")
    positions = [torch.from_numpy(p.astype(np.int64)) for p in batch.positions]
    all_tokens = batch.all_img_tokens
    txt_len = batch.txt_tokens

    def write_pass(items: dict, fence) -> None:
        fence.wait()
        for key in blocks:
            value = items[key]
            if isinstance(value, tuple):
                a, b = value
                img, txt = (a, b) if key[0] == "double" else (b, a)
            else:  # a single block's joint [txt; img]
                txt, img = value[:, :txt_len], value[:, txt_len:]
            if want_img:
                if all_tokens:
                    shard.write(img.reshape(-1, img.shape[-1]))
                else:
                    shard.write(torch.cat([img[b, positions[b]] for b in range(img.shape[0])]))
            if want_txt:
                shard.write(txt.reshape(-1, txt.shape[-1]))

    def sink(pass_name: str, step: int, items: dict, fence) -> None:
        if pass_name in wanted:
            writer.submit(write_pass, items, fence)

    trace = BlockTrace(
        pipe.transformer,
        sel,
        passes_per_step=s.passes_per_step,
        copier=copier,
        image_grid=s.token_grid,
        sink=sink,
    )
    with trace:
        generate(
            pipe,
            s,
            prompts=batch.prompts,
            seed=batch.seeds,
            output_type="latent",
            progress=False,
        )


def print_plan(plan: HarvestPlan, root: Path, file=sys.stdout) -> None:
    print(f"harvest: {plan.describe(set(committed_shards(root)))}", file=file, flush=True)
