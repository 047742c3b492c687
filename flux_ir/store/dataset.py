"""Activation datasets: token vectors of chosen blocks over many prompts and seeds, in safetensors
shards with an index table, read lazily (memory-mapped).

    ds = open_dataset(harvest_dir)                     # manifest + index table (pandas), nothing mapped
    ds.index.columns.tolist()[:8]      # prompt, seed, step, kind, block, stream, shard, offset, ...
    vectors = TokenDataset(harvest_dir, block="single.3", stream="img")   # map-style over vectors
    vectors[0].shape                                   # [D]
    loader = torch.utils.data.DataLoader(vectors, batch_size=64, shuffle=True)
    for batch in TokenStream(harvest_dir, batch_size=64, seed=0):          # iterable, shard by shard
        batch.shape                                    # [64, D] (the last batch may be smaller)

Layout of a dataset directory (written by `flux_ir.workflows.harvest`):
    harvest.json                  settings (its identity), the prompts with their seeds, the plan
    shards/shard-000000.safetensors   activations [R, D] (storage dtype), token [R] int32 (each row's
                                  token position: image tokens row-major in the H/16 x W/16 grid, or
                                  text tokens), record.* [M] int64 (one record per image, step, pass,
                                  block and stream: its rows' offset and count)
    index/shard-000000.json       the shard's commit: its size, sha256 and records (written after the
                                  shard is renamed into place; a shard without one is not part of the
                                  dataset)
    index.csv                     the whole index table, rewritten when a run finishes (a cache of the
                                  commits: prompt, seed, step, block, stream, shard, offset, count, ...)

A shard is written under a temporary name, its rows streamed in as the device produces them (the
header is known in advance: every record's row count follows from the settings), fsync'ed and renamed;
then its commit. A killed run leaves at most a temporary, which the next run removes; the shards with
a commit are done, the others are generated again: nothing is lost or written twice.

Reading maps each shard's activations with `numpy.memmap` (bfloat16 through an int16 view), so a
`TokenDataset` reads only the rows it is asked for, in the process that asks (DataLoader workers map
the files themselves). A Hugging Face `datasets.Dataset` cannot wrap these files without copying:
`datasets` keeps its rows in Arrow files of its own layout (`Dataset.from_generator` and the
`safetensors` builders copy every vector into its cache); use `TokenDataset` / `TokenStream`, or write
Arrow yourself from `ds.vectors(...)` when a `datasets` pipeline needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux_ir.errors import CaptureFileError, InvalidArgumentError
from flux_ir.io.atomic import disk_full_error, temp_path, write_text
from flux_ir.store.shards import ST_DTYPES

FORMAT = "flux-ir-activations"
VERSION = 1
MANIFEST = "harvest.json"
SHARDS = "shards"
COMMITS = "index"
INDEX = "index.csv"
RECORD_FIELDS = ("item", "step", "pass", "kind", "block", "stream", "offset", "count")
KINDS = ("double", "single")
STREAMS = ("img", "txt")
PASSES = ("cond", "uncond")
NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = ST_DTYPES  # torch dtype -> safetensors code


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def commit_name(index: int) -> str:
    return f"shard-{index:06d}.json"


# -- writing ---------------------------------------------------------------------------------------
class StreamingShard:
    """One shard written front to back while the rows arrive (module docstring).

    `rows` x `width` activations of `dtype`, then the `token` positions [rows] and the record table
    (`records`: {field: [M] ints}), all known before the first row. `write(rows)` appends a [r, width]
    CPU tensor; `finish()` checks the count, writes the tail, fsyncs, renames and returns
    (size, sha256); `abort()` deletes the temporary. sha256 is computed as the bytes are written.
    """

    def __init__(
        self,
        path: str | Path,
        rows: int,
        width: int,
        dtype: torch.dtype,
        token: np.ndarray,
        records: dict[str, np.ndarray],
    ):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.rows, self.width, self.dtype = rows, width, dtype
        self.written = 0
        itemsize = torch.empty((), dtype=dtype).element_size()
        tail = {"token": np.ascontiguousarray(token, dtype=np.int32)}
        tail.update(
            {f"record.{k}": np.ascontiguousarray(records[k], dtype=np.int64) for k in RECORD_FIELDS}
        )
        header, offset = {}, rows * width * itemsize
        header["activations"] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": [rows, width],
            "data_offsets": [0, offset],
        }
        for name, array in tail.items():
            n = array.nbytes
            code = "I32" if array.dtype == np.int32 else "I64"
            header[name] = {
                "dtype": code,
                "shape": list(array.shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        header["__metadata__"] = {"format": FORMAT}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self.tail = tail
        self.sha = hashlib.sha256()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed by finish/abort)
        self._put(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data) -> None:
        try:
            self.file.write(data)
        except OSError as err:
            full = disk_full_error(self.path, err, self.size)
            raise (full or CaptureFileError(f"could not write {self.path}: {err}")) from err
        self.sha.update(data)

    def write(self, rows: torch.Tensor) -> None:
        """Append rows [r, width] (a CPU tensor of the shard's dtype)."""
        if rows.dim() != 2 or rows.shape[1] != self.width or rows.dtype != self.dtype:
            raise ValueError(
                f"rows must be [r, {self.width}] {self.dtype}, got {list(rows.shape)} {rows.dtype}"
            )
        if self.written + rows.shape[0] > self.rows:
            raise ValueError(f"{self.path.name}: more rows than the {self.rows} planned")
        if rows.numel():
            data = rows.contiguous().view(-1).view(torch.uint8).numpy()
            self._put(memoryview(data))
        self.written += rows.shape[0]

    def finish(self) -> tuple[int, str]:
        if self.written != self.rows:
            raise ValueError(f"{self.path.name}: {self.written} rows written, {self.rows} planned")
        for array in self.tail.values():
            self._put(memoryview(array).cast("B"))
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as err:
            full = disk_full_error(self.path, err, self.size)
            raise (full or CaptureFileError(f"could not write {self.path}: {err}")) from err
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.size, self.sha.hexdigest()

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_commit(root: Path, index: int, size: int, sha256: str, records: dict) -> Path:
    """The commit of shard `index` (after the shard is in place): what makes it part of the dataset."""
    body = {
        "shard": shard_name(index),
        "size": size,
        "sha256": sha256,
        "records": {k: [int(x) for x in records[k]] for k in RECORD_FIELDS},
    }
    return write_text(root / COMMITS / commit_name(index), json.dumps(body, separators=(",", ":")))


def committed_shards(root: str | Path) -> dict[int, dict]:
    """{shard index: commit} of every shard whose commit and file are in place."""
    root = Path(root)
    out = {}
    folder = root / COMMITS
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("shard-*.json")):
        try:
            commit = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a partial commit cannot exist (atomic rename); unreadable: not committed
        shard = root / SHARDS / commit.get("shard", "")
        if shard.is_file() and shard.stat().st_size == commit.get("size"):
            out[int(path.stem.split("-")[1])] = commit
    return out


# -- reading ---------------------------------------------------------------------------------------
def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CaptureFileError(
            f"{Path(root)} holds no {MANIFEST}: not a flux-ir activation dataset"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CaptureFileError(f"{path} is unreadable: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaptureFileError(f"{path} is not a {FORMAT} manifest")
    return manifest


def item_table(manifest: dict):
    """One row per image (item): entry, prompt, seed, width, height, num_steps (pandas)."""
    import pandas as pd

    rows = []
    for e, entry in enumerate(manifest["entries"]):
        for seed in entry["seeds"]:
            rows.append(
                {
                    "item": len(rows),
                    "entry": e,
                    "prompt": entry["prompt"],
                    "seed": seed,
                    "width": entry["width"],
                    "height": entry["height"],
                    "num_steps": entry["num_steps"],
                }
            )
    return pd.DataFrame(rows)


def index_from_commits(manifest: dict, commits: dict[int, dict]):
    """The index table of the committed shards: one row per record (pandas DataFrame)."""
    import pandas as pd

    parts = []
    for _, commit in sorted(commits.items()):
        df = pd.DataFrame(commit["records"])
        df.insert(0, "shard", commit["shard"])
        parts.append(df)
    columns = ["shard", *RECORD_FIELDS]
    records = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    records = records.astype({k: "int64" for k in RECORD_FIELDS})
    records["kind"] = records["kind"].map(dict(enumerate(KINDS)))
    records["stream"] = records["stream"].map(dict(enumerate(STREAMS)))
    records["pass"] = records["pass"].map(dict(enumerate(PASSES)))
    items = item_table(manifest)
    table = records.merge(items[["item", "entry", "prompt", "seed"]], on="item", how="left")
    order = ["prompt", "seed", "step", "kind", "block", "stream", "pass", "shard", "offset"]
    order += ["count", "item", "entry"]
    return table[order]


def write_index(root: str | Path) -> Path:
    """Rewrite `index.csv` from the commits (atomically)."""
    root = Path(root)
    table = index_from_commits(read_manifest(root), committed_shards(root))
    return write_text(root / INDEX, table.to_csv(index=False))


def shard_layout(path: Path) -> dict:
    """A safetensors file's header: {name: {dtype, shape, data_offsets}} and the data start."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise CaptureFileError(f"{path} is not a readable dataset shard: {err}") from err
    header.pop("__metadata__", None)
    header["__start__"] = 8 + n
    return header


def map_tensor(path: Path, name: str, header: dict | None = None) -> torch.Tensor:
    """A tensor of a safetensors file as a read-only memory map (nothing read until indexed)."""
    header = header or shard_layout(path)
    entry = header[name]
    lo, hi = entry["data_offsets"]
    code = entry["dtype"]
    np_dtype = {**NP_DTYPES, "I32": np.int32, "I64": np.int64}[code]
    shape = tuple(entry["shape"])
    if hi == lo:
        return torch.empty(shape, dtype=TORCH_DTYPES.get(code, torch.int64))
    array = np.memmap(path, dtype=np_dtype, mode="r", offset=header["__start__"] + lo, shape=shape)
    import warnings

    with warnings.catch_warnings():  # read-only memory: torch warns that it cannot write to it
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if code == "BF16" else tensor


@dataclass
class ActivationDataset:
    """An activation dataset on disk: `manifest` (settings, prompts), `index` (pandas DataFrame,
    one row per record: prompt, seed, step, kind, block, stream, pass, shard, offset, count, item,
    entry) and lazily mapped shards (`activations(shard)` [R, D], `tokens(shard)` [R])."""

    root: Path
    manifest: dict
    index: object  # pandas.DataFrame

    @property
    def width(self) -> int:
        return int(self.manifest["identity"]["hidden_size"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def activations(self, shard: str) -> torch.Tensor:
        """[R, D] rows of one shard, memory-mapped (storage dtype)."""
        return map_tensor(self.root / SHARDS / shard, "activations")

    def tokens(self, shard: str) -> torch.Tensor:
        """[R] token position of each row."""
        return map_tensor(self.root / SHARDS / shard, "token")

    def select(self, block=None, step=None, stream=None, pass_name=None):
        """Index rows of one block ("single.3", ("single", 3)), step(s), stream and pass (None: all)."""
        df = self.index
        if block is not None:
            kind, number = parse_block(block)
            df = df[(df["kind"] == kind) & (df["block"] == number)]
        if step is not None:
            steps = [step] if isinstance(step, int) else list(step)
            df = df[df["step"].isin(steps)]
        if stream is not None:
            df = df[df["stream"] == stream]
        if pass_name is not None:
            df = df[df["pass"] == pass_name]
        return df

    def vectors(self, rows) -> torch.Tensor:
        """All vectors of index rows (a DataFrame from `select`), materialised [n, D]."""
        parts = [
            self.activations(r.shard)[r.offset : r.offset + r.count]
            for r in rows.itertuples(index=False)
        ]
        return torch.cat(parts) if parts else torch.empty(0, self.width)

    def verify(self) -> int:
        """Re-read every committed shard and compare its sha256 with its commit; returns the count.
        Raises CaptureFileError naming the first damaged shard."""
        from flux_ir.io.atomic import sha256_file

        commits = committed_shards(self.root)
        for commit in commits.values():
            path = self.root / SHARDS / commit["shard"]
            if sha256_file(path) != commit["sha256"]:
                raise CaptureFileError(
                    f"{path} is damaged: its sha256 differs from its commit; delete it and "
                    f"{COMMITS}/{Path(commit['shard']).stem}.json, then resume the harvest"
                )
        return len(commits)

    def __repr__(self) -> str:
        ident = self.manifest["identity"]
        state = "complete" if self.complete else "growing"
        return (
            f"ActivationDataset({self.root}: {ident['model']}, {len(self.index)} records, "
            f"{int(self.index['count'].sum()) if len(self.index) else 0} vectors of width "
            f"{self.width}, {state})"
        )


def parse_block(block) -> tuple[str, int]:
    """ "single.3" / "single_3" / ("single", 3) -> ("single", 3)."""
    if isinstance(block, tuple | list) and len(block) == 2:
        kind, number = block
    else:
        text = str(block).replace("_", ".")
        kind, _, number = text.partition(".")
    if kind not in KINDS:
        raise InvalidArgumentError(
            f"{{param}} {block!r}: write double.N or single.N (e.g. single.6)", "block"
        )
    try:
        return kind, int(number)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"{{param}} {block!r}: write double.N or single.N (e.g. single.6)", "block"
        ) from err


def open_dataset(root: str | Path) -> ActivationDataset:
    """The dataset in `root`, complete or still growing: its index holds the committed shards (read
    from `index.csv` when it lists all of them, else from the commits)."""
    import pandas as pd

    root = Path(root)
    manifest = read_manifest(root)
    commits = committed_shards(root)
    table = None
    csv = root / INDEX
    if csv.is_file():
        cached = pd.read_csv(csv, keep_default_na=False)
        if set(cached["shard"]) == {c["shard"] for c in commits.values()}:
            table = cached
    if table is None:
        table = index_from_commits(manifest, commits)
    return ActivationDataset(root, manifest, table)


# -- torch datasets --------------------------------------------------------------------------------
class _Shards:
    """Per-process cache of memory-mapped shards (dropped when pickled to DataLoader workers)."""

    def __init__(self, root: Path):
        self.root = root
        self.maps: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def __call__(self, shard: str) -> torch.Tensor:
        array = self.maps.get(shard)
        if array is None:
            with self.lock:
                array = self.maps.setdefault(
                    shard, map_tensor(self.root / SHARDS / shard, "activations")
                )
        return array

    def __getstate__(self):
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset over the token vectors of a selection (block, step, stream, pass; None:
    all), each item one vector [D] (`dtype`: None keeps the storage dtype). Rows are read from the
    memory-mapped shards only when indexed; `__getitems__` gathers a batch shard by shard.
    `item_info(i)` says which prompt, seed, step, block and token a vector comes from."""

    def __init__(
        self,
        root: str | Path,
        block=None,
        step=None,
        stream: str | None = "img",
        pass_name: str | None = "cond",
        dtype: torch.dtype | None = torch.float32,
    ):
        self.data = open_dataset(root)
        rows = self.data.select(block, step, stream, pass_name)
        self.rows = rows.reset_index(drop=True)
        counts = self.rows["count"].to_numpy(dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.shard_names = self.rows["shard"].tolist()
        self.offsets = self.rows["offset"].to_numpy(dtype=np.int64)
        self.dtype = dtype
        self.shards = _Shards(self.data.root)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} vectors")
        i = i + n if i < 0 else i
        r = int(np.searchsorted(self.starts, i, side="right")) - 1
        return r, int(self.offsets[r] + i - self.starts[r])

    def __getitem__(self, i: int) -> torch.Tensor:
        r, row = self._locate(int(i))
        v = self.shards(self.shard_names[r])[row].clone()
        return v if self.dtype is None else v.to(self.dtype)

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        located = [self._locate(int(i)) for i in indices]
        out: list = [None] * len(located)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, (r, row) in enumerate(located):
            by_shard.setdefault(self.shard_names[r], []).append((pos, row))
        for shard, wanted in by_shard.items():
            rows = torch.as_tensor([row for _, row in wanted])
            block = self.shards(shard)[rows]
            if self.dtype is not None:
                block = block.to(self.dtype)
            for k, (pos, _) in enumerate(wanted):
                out[pos] = block[k]
        return out

    def item_info(self, i: int) -> dict:
        """Where vector `i` comes from: prompt, seed, step, kind, block, stream, pass, token."""
        r, row = self._locate(int(i))
        rec = self.rows.iloc[r]
        token = int(map_tensor(self.data.root / SHARDS / rec["shard"], "token")[row])
        keys = ("prompt", "seed", "step", "kind", "block", "stream", "pass", "item")
        return {
            **{k: rec[k].item() if hasattr(rec[k], "item") else rec[k] for k in keys},
            "token": token,
        }


class TokenStream(torch.utils.data.IterableDataset):
    """Iterable dataset over the same selection as `TokenDataset`, read shard by shard: each epoch
    visits the shards in a seeded order and shuffles each shard's selected rows (`shuffle`); yields
    batches [batch_size, D] (None: single vectors [D]). Shards are split over DataLoader workers and,
    with `rank`/`world` (default: torch.distributed's when initialised), over processes. `set_epoch`
    changes the order."""

    def __init__(
        self,
        root: str | Path,
        block=None,
        step=None,
        stream: str | None = "img",
        pass_name: str | None = "cond",
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float32,
        rank: int | None = None,
        world: int | None = None,
    ):
        data = open_dataset(root)
        rows = data.select(block, step, stream, pass_name)
        self.root = data.root
        self.groups = {
            shard: list(zip(df["offset"].tolist(), df["count"].tolist()))
            for shard, df in rows.groupby("shard", sort=True)
        }
        self.batch_size, self.shuffle, self.seed, self.dtype = batch_size, shuffle, seed, dtype
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(c for spans in self.groups.values() for _, c in spans)

    def _my_shards(self) -> list[str]:
        shards = sorted(self.groups)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        rank, world = self.rank, self.world
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        shards = shards[(rank or 0) :: (world or 1)]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        return shards

    def __iter__(self) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        held = 0
        for shard in self._my_shards():
            array = map_tensor(self.root / SHARDS / shard, "activations")
            index = np.concatenate([np.arange(o, o + c) for o, c in self.groups[shard]])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch, int(shard[6:12])])
                index = index[rng.permutation(len(index))]
            rows = array[torch.from_numpy(index)]
            if self.dtype is not None:
                rows = rows.to(self.dtype)
            if self.batch_size is None:
                yield from rows
                continue
            pending.append(rows)
            held += rows.shape[0]
            while held >= self.batch_size:
                joined = torch.cat(pending)
                yield joined[: self.batch_size]
                rest = joined[self.batch_size :]
                pending, held = ([rest] if rest.shape[0] else []), rest.shape[0]
        if self.batch_size is not None and held:
            yield torch.cat(pending)
