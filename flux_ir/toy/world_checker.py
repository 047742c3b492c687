"""Read flux-toy-2 scenes back from pixels: background, then every object's shape, colour, texture,
size and place, with a reject class for blobs that fit no shape.

    from flux_ir.toy.world import make_world

    world = make_world(8, size=64, seed=0)
    reading = read_world(world.images)                # WorldReading
    reading.count, reading.shape[:, 0]                # [B] objects found, [B] largest object's shape
    accuracy = checker_accuracy(world, reading)       # share of scenes / objects read right

Geometry, not learning. The background is the median border colour; object pixels are those far
from it (holes filled); the objects are the connected components of that mask, largest first, with
components under `MIN_AREA` of the image dropped (a stray pixel of VAE noise neither makes an object
nor stretches one). Each component is matched against every shape's signed-distance template at the
component's centroid, with the radius that gives the component's area and the best of `ANGLES`
rotations: the shape is the best intersection-over-union, or `REJECT` below `MIN_IOU`. Colour is the
nearest palette colour to the median of the component's inner pixels; texture comes from how many
inner pixels are far from that colour (plain) and whether their pattern has one direction (striped)
or none (dotted); size from the fitted radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy import ndimage

from flux_ir.toy.world import (
    COLOURS,
    KINDS,
    PERIOD,
    SHAPES,
    SIZE_RANGE,
    WorldBatch,
    palette_tensor,
    shade_tensor,
    shape_sdf,
)

REJECT = -2  # a blob that fits no shape
NONE = -1  # an empty slot
MAX_READ = 4  # objects read per image (largest first)
FOREGROUND_DISTANCE = 0.2  # RGB distance from the background that marks an object pixel
MIN_AREA = 0.003  # share of the image a component must cover to count as an object
MIN_IOU = 0.72  # best template IoU below this: REJECT
ANGLES = 24  # rotations tried over each shape's symmetry period
VOTE_DISTANCE = 0.2  # a pixel votes for the palette colour it is this near
TEXTURE_DISTANCE = 0.2  # RGB distance from an object's colour that marks a second-tone pixel
PLAIN_SHARE = 0.07  # second-tone share of the inner pixels below which an object is plain
STRIPE_COHERENCE = 0.45  # orientation coherence of the second tone above which it is striped
SIZE_SPLIT = (SIZE_RANGE[0][1] + SIZE_RANGE[1][0]) / 2  # fitted radius: small below, large above


@dataclass
class WorldReading:
    """What the checker read. Per image [B]: background (COLOURS index), count (components kept,
    rejects included). Per object [B, MAX_READ], largest first, NONE in unused slots: shape (SHAPES
    index or REJECT), colour, texture, size (SIZES index); iou of the best template, area (share of
    the image), radius (fitted, half image sides), centre [B, MAX_READ, 2] (x, y in [-1, 1], y down)."""

    background: torch.Tensor
    count: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    texture: torch.Tensor
    size: torch.Tensor
    iou: torch.Tensor
    area: torch.Tensor
    radius: torch.Tensor
    centre: torch.Tensor

    def objects(self, i: int) -> list[dict]:
        """Image `i`'s objects as plain dicts (shape, colour, texture, size, x, y, iou)."""
        out = []
        for k in range(int(self.count[i])):
            out.append(
                dict(
                    shape=int(self.shape[i, k]),
                    colour=int(self.colour[i, k]),
                    texture=int(self.texture[i, k]),
                    size=int(self.size[i, k]),
                    x=float(self.centre[i, k, 0]),
                    y=float(self.centre[i, k, 1]),
                    iou=float(self.iou[i, k]),
                )
            )
        return out


@cache
def unit_areas() -> tuple[float, ...]:
    """Area of each shape at radius 1 (half image sides squared), measured on a fine grid."""
    n = 801
    axis = torch.linspace(-1.5, 1.5, n, dtype=torch.float64)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cell = (3.0 / (n - 1)) ** 2
    one = torch.ones(1, 1, 1, dtype=torch.float64)
    return tuple(
        (shape_sdf(torch.tensor([s]), x[None], y[None], one) < 0).sum().item() * cell
        for s in range(len(SHAPES))
    )


def background_and_mask(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background colour [B, 3] (median of the border pixels) and object pixels [B, H, W] (bool)."""
    border = torch.cat(
        [images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1
    )
    bg = border.median(dim=-1).values
    return bg, (images - bg[:, :, None, None]).norm(dim=1) > FOREGROUND_DISTANCE


def components(mask: np.ndarray, min_pixels: int, keep: int = MAX_READ) -> list[np.ndarray]:
    """Boolean masks of the `keep` largest 8-connected components of `mask` [H, W] with at least
    `min_pixels` pixels (holes filled), largest first."""
    filled = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:keep]
    return [labels == (j + 1) for j in order if sizes[j] >= min_pixels]


@torch.no_grad()
def read_world(images: torch.Tensor, *, chunk: int = 32) -> WorldReading:
    """Read images [B, 3, H, W] (float in [0, 1], any device; read on the CPU)."""
    images = images.detach().float().cpu()
    b, _, h, w = images.shape
    bg, mask = background_and_mask(images)
    palette = palette_tensor()
    min_pixels = max(4, int(MIN_AREA * h * w))
    comps, owners = [], []
    for i in range(b):
        for m in components(mask[i].numpy(), min_pixels):
            comps.append(m)
            owners.append(i)
    shape = torch.full((b, MAX_READ), NONE)
    colour, texture, size = shape.clone(), shape.clone(), shape.clone()
    iou, area, radius = torch.zeros(b, MAX_READ), torch.zeros(b, MAX_READ), torch.zeros(b, MAX_READ)
    centre = torch.zeros(b, MAX_READ, 2)
    count = torch.zeros(b, dtype=torch.long)
    if comps:
        fits = fit_shapes(comps, h, chunk=chunk)
        pixels = images.permute(0, 2, 3, 1).numpy()
        for c, (i, m) in enumerate(zip(owners, comps)):
            k = int(count[i])
            count[i] += 1
            s, score, r, cx, cy = fits[c]
            shape[i, k] = s if score >= MIN_IOU else REJECT
            iou[i, k], radius[i, k] = score, r
            centre[i, k] = torch.tensor([cx, cy])
            area[i, k] = m.sum() / (h * w)
            rgb, tex = colour_and_texture(pixels[i], m)
            colour[i, k] = int(torch.cdist(torch.tensor(rgb)[None].float(), palette).argmin())
            texture[i, k] = tex
            size[i, k] = int(r >= SIZE_SPLIT)
    return WorldReading(
        background=torch.cdist(bg, palette).argmin(1),
        count=count,
        shape=shape,
        colour=colour,
        texture=texture,
        size=size,
        iou=iou,
        area=area,
        radius=radius,
        centre=centre,
    )


def fit_shapes(
    comps: list[np.ndarray], size: int, *, chunk: int = 32
) -> list[tuple[int, float, float, float, float]]:
    """Per component mask [H, W]: (best shape, its IoU, fitted radius, centre x, centre y), the
    templates placed at the component's centroid with the area's radius, the best of ANGLES rotations."""
    unit = torch.tensor(unit_areas())
    px = 2.0 / size  # one pixel in half image sides
    geo = []
    for m in comps:
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean(), xs.mean()
        reach = np.sqrt(((ys - cy) ** 2 + (xs - cx) ** 2).max())
        geo.append((cx, cy, reach, len(xs)))
    order = sorted(range(len(comps)), key=lambda c: geo[c][2])  # similar windows in one chunk
    out: dict[int, tuple] = {}
    for start in range(0, len(comps), chunk):
        part = order[start : start + chunk]
        half = int(math.ceil(max(geo[c][2] for c in part) * 1.1)) + 3
        crops, offsets = [], []
        for c in part:
            cx, cy, _, _ = geo[c]
            x0, y0 = int(round(cx)) - half, int(round(cy)) - half
            padded = np.zeros((2 * half, 2 * half), dtype=np.float32)
            ys, xs = np.nonzero(comps[c])
            padded[ys - y0, xs - x0] = 1.0  # the window always holds the whole component
            crops.append(torch.from_numpy(padded))
            offsets.append((x0 - cx, y0 - cy))
        crops = torch.stack(crops)  # [n, 2h, 2h]
        n = len(crops)
        grid = torch.arange(2 * half, dtype=torch.float32) + 0.5
        off = torch.tensor(
            offsets, dtype=torch.float32
        )  # pixel offset of the window from the centroid
        gx = (grid[None, None, :] + off[:, 0, None, None]) * px  # [n, 1, 2h]
        gy = -(grid[None, :, None] + off[:, 1, None, None]) * px  # [n, 2h, 1], y up
        gx, gy = gx.expand(n, 2 * half, 2 * half), gy.expand(n, 2 * half, 2 * half)
        pixels_area = torch.tensor([geo[c][3] for c in part], dtype=torch.float32) * px * px
        best = torch.full((n,), -1.0)
        best_shape = torch.zeros(n, dtype=torch.long)
        best_r = torch.zeros(n)
        for s in range(len(SHAPES)):
            r = (pixels_area / unit[s]).sqrt()  # [n]
            steps = 1 if s == 0 else ANGLES
            theta = torch.arange(steps, dtype=torch.float32) * PERIOD[s] / steps  # [a]
            cos, sin = theta.cos()[None, :, None, None], theta.sin()[None, :, None, None]
            qx = cos * gx[:, None] + sin * gy[:, None]  # [n, a, 2h, 2h]
            qy = -sin * gx[:, None] + cos * gy[:, None]
            window = (n * steps, 2 * half, 2 * half)
            rr = r[:, None].expand(n, steps).reshape(-1, 1, 1)
            d = shape_sdf(torch.full((n * steps,), s), qx.reshape(window), qy.reshape(window), rr)
            tpl = (0.5 - d * size / 2).clamp(0, 1).reshape(n, steps, 2 * half, 2 * half)
            inter = torch.minimum(tpl, crops[:, None]).flatten(2).sum(2)
            union = torch.maximum(tpl, crops[:, None]).flatten(2).sum(2)
            score = (inter / union.clamp(min=1e-6)).max(1).values  # [n]
            better = score > best
            best = torch.where(better, score, best)
            best_shape = torch.where(better, s, best_shape)
            best_r = torch.where(better, r, best_r)
        for j, c in enumerate(part):
            cx, cy = geo[c][0], geo[c][1]
            out[c] = (
                int(best_shape[j]),
                float(best[j]),
                float(best_r[j]),
                (cx + 0.5) * px - 1,
                (cy + 0.5) * px - 1,
            )
    return [out[c] for c in range(len(comps))]


def colour_and_texture(pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, int]:
    """An object's colour (median RGB of its inner pixels) and texture (TEXTURES index) from the
    image [H, W, 3] and its mask [H, W]."""
    inner = ndimage.binary_erosion(mask, iterations=2)
    if inner.sum() < 12:
        inner = mask
    rgb = object_colour(pixels[inner])
    far = np.linalg.norm(pixels - rgb, axis=-1)  # [H, W]
    second = far[inner] > TEXTURE_DISTANCE
    if second.mean() < PLAIN_SHARE:
        return rgb, 0
    return rgb, 1 if orientation_coherence(far, inner) > STRIPE_COHERENCE else 2


def object_colour(pixels: np.ndarray) -> np.ndarray:
    """The palette colour [3] most of an object's pixels [N, 3] are near (pixels nearest a second
    tone, or far from every tone, do not vote); the median pixel where none votes."""
    tones = np.concatenate([palette_tensor().numpy(), shade_tensor().numpy()])  # [2C, 3]
    dist = np.linalg.norm(pixels[:, None] - tones[None], axis=-1)  # [N, 2C]
    nearest = dist.argmin(1)
    votes = nearest[(nearest < len(COLOURS)) & (dist.min(1) < VOTE_DISTANCE)]
    if len(votes) == 0:
        return np.median(pixels, axis=0)
    winner = np.bincount(votes, minlength=len(COLOURS)).argmax()
    return np.median(pixels[nearest == winner], axis=0)


def orientation_coherence(value: np.ndarray, region: np.ndarray) -> float:
    """How much the gradients of `value` [H, W] inside `region` share one direction: 1 for stripes,
    near 0 for dots (structure-tensor coherence of central differences)."""
    gx = np.zeros_like(value)
    gy = np.zeros_like(value)
    gx[:, 1:-1] = (value[:, 2:] - value[:, :-2]) / 2
    gy[1:-1] = (value[2:] - value[:-2]) / 2
    inside = ndimage.binary_erosion(region, iterations=1)
    if inside.sum() < 4:
        inside = region
    jxx, jyy, jxy = (
        (gx[inside] ** 2).sum(),
        (gy[inside] ** 2).sum(),
        (gx[inside] * gy[inside]).sum(),
    )
    trace = jxx + jyy
    return float(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / trace) if trace > 0 else 0.0


# ----------------------------------------------------------------------------- accuracy


def match_objects(truth: list[dict], read: list[dict]) -> list[dict | None]:
    """For each true object (with x, y), the read object nearest its centre (each used once, greedy
    by distance), or None when none is within 0.3 half image sides."""
    pairs = sorted(
        (math.hypot(t["x"] - r["x"], t["y"] - r["y"]), i, j)
        for i, t in enumerate(truth)
        for j, r in enumerate(read)
    )
    out: list[dict | None] = [None] * len(truth)
    used = set()
    for dist, i, j in pairs:
        if dist > 0.3 or out[i] is not None or j in used:
            continue
        out[i] = read[j]
        used.add(j)
    return out


def truth_objects(world: WorldBatch, i: int) -> list[dict]:
    """Scene `i`'s objects with centres, as `WorldReading.objects` gives them."""
    lay = world.layout
    return [
        dict(
            shape=int(lay.shape[i, k]),
            colour=int(lay.colour[i, k]),
            texture=int(lay.texture[i, k]),
            size=int(lay.size[i, k]),
            x=float(lay.centre[i, k, 0]),
            y=float(lay.centre[i, k, 1]),
        )
        for k in range(int(lay.count[i]))
    ]


def relation_of(a: dict, b: dict) -> int:
    """0 ("left of") when a is more left of b than above it, else 1 ("above"); -1 when neither
    (a right of or below b)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return 0 if dx > 0 else -1
    return 1 if dy > 0 else -1


def checker_accuracy(world: WorldBatch, reading: WorldReading) -> dict:
    """How often the checker reads rendered scenes right: share of scenes with the right background
    and count, of objects (matched by centre) with the right shape / colour / texture / size, of
    pairs with the right relation, of scenes read entirely right, and of objects rejected."""
    tally = dict(
        background=[], count=[], shape=[], colour=[], texture=[], size=[], relation=[], scene=[]
    )
    rejected = []
    for i in range(len(world.images)):
        truth = truth_objects(world, i)
        read = reading.objects(i)
        got = match_objects(truth, read)
        bg_ok = int(reading.background[i]) == int(world.layout.background[i])
        count_ok = len(read) == len(truth)
        tally["background"].append(bg_ok)
        tally["count"].append(count_ok)
        all_ok = bg_ok and count_ok
        for t, r in zip(truth, got):
            for key in ("shape", "colour", "texture", "size"):
                ok = r is not None and r[key] == t[key]
                tally[key].append(ok)
                all_ok &= ok
            rejected.append(r is not None and r["shape"] == REJECT)
        if KINDS[int(world.layout.kind[i])] == "pair":
            ok = None not in got and relation_of(got[0], got[1]) == int(world.layout.relation[i])
            tally["relation"].append(ok)
            all_ok &= ok
        tally["scene"].append(all_ok)
    out = {k: sum(v) / len(v) if v else float("nan") for k, v in tally.items()}
    out["rejected"] = sum(rejected) / max(len(rejected), 1)
    out["scenes"] = len(world.images)
    return out
