"""flux-toy-2's world: one to three objects of six shapes, eight colours, three textures, two sizes.

    world = make_world(16, size=64, seed=0)           # WorldBatch
    world.images                                      # [16, 3, 64, 64] float in [0, 1]
    world.captions[0]            # e.g. "a small striped red star left of a large plain blue cross on a white background"

Each scene is one of four kinds: one object; a pair of different objects in a relation ("left of",
"above"); two or three identical objects ("two small plain red circles"). Objects are circles,
squares, triangles, stars, crosses or hexagons, rotated at random, "small" or "large", plain,
"striped" or "dotted" (a lighter or darker shade of their colour, in the object's frame), never
overlapping, on a plain background of a colour no object has. Edges are anti-aliased from signed
distance fields; rendering is batched torch on any device, and the same seed gives the same scenes on
the same device. Every object's ground truth (shape, colour, texture, size, centre, rotation, mask)
stays with the batch; `caption` and `partial_caption` describe a scene fully or in part (caption
dropout for training keeps partial captions true).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
PLURALS = ("circles", "squares", "triangles", "stars", "crosses", "hexagons")
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.70, 0.24),
    "blue": (0.16, 0.27, 0.86),
    "yellow": (0.92, 0.82, 0.16),
    "purple": (0.58, 0.24, 0.75),
    "white": (0.94, 0.94, 0.94),
    "orange": (0.97, 0.47, 0.08),
    "black": (0.08, 0.08, 0.08),
}
COLOURS = tuple(PALETTE)
# a texture's second tone: dark colours lighten towards white, light ones darken towards black
LIGHT = ("yellow", "white", "orange")
TEXTURES = ("plain", "striped", "dotted")
SIZES = ("small", "large")
RELATIONS = ("left of", "above")
KINDS = ("one", "pair", "two", "three")  # object counts 1, 2, 2, 3
KIND_COUNT = (1, 2, 2, 3)
KIND_P = (0.35, 0.35, 0.15, 0.15)
COUNT_WORDS = {2: "two", 3: "three"}
MAX_OBJECTS = 3
NEUTRAL_CAPTION = ""
# every word a caption can use (the flux-toy-2 tokenizer keeps each one a single token)
WORDS = sorted(
    {"a", "an", "on", "background", "and", "of", "shape", "shapes", "left", "above", "two", "three"}
    | set(SHAPES)
    | set(PLURALS)
    | set(COLOURS)
    | set(TEXTURES)
    | set(SIZES)
)

SIZE_RANGE = ((0.19, 0.25), (0.30, 0.36))  # "radius" r per size class, in half image sides
# farthest point of each shape from its centre, in units of r (placement keeps these apart)
EXTENT = (1.0, 0.8 * math.sqrt(2), 1.05 * 2 / math.sqrt(3), 1.2, math.hypot(1.0, 0.35), 1.0)
# symmetry period of each shape's rotation (radians)
PERIOD = (2 * math.pi, math.pi / 2, 2 * math.pi / 3, 2 * math.pi / 5, math.pi / 2, math.pi / 3)
TEXTURE_PERIOD = 0.25  # stripes and dots repeat every 0.25 half image sides (16 px at 128)
STRIPE_DUTY = 0.4  # share of a stripe period in the second tone
DOT_RADIUS = 0.25  # dot radius in texture periods (about 20% of the area)
COLOUR_JITTER = 0.03
EDGE_MARGIN = 0.03  # objects keep this far from the image border
GAP = 0.05  # and this far from each other
CANDIDATES = 48  # random placements tried per scene before a fixed layout


@dataclass
class Layout:
    """What a batch of scenes holds, before rendering. Per scene [B]: kind (KINDS index), count,
    relation (RELATIONS index, -1 unless a pair), background (COLOURS index). Per object slot
    [B, MAX_OBJECTS] (-1 / 0 in unused slots): shape, colour, texture, size (SIZES index), radius,
    rotation (radians); centre [B, MAX_OBJECTS, 2] (x, y in [-1, 1], y down); colours as rendered:
    rgb [B, MAX_OBJECTS, 3], background_rgb [B, 3]."""

    kind: torch.Tensor
    count: torch.Tensor
    relation: torch.Tensor
    background: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    texture: torch.Tensor
    size: torch.Tensor
    radius: torch.Tensor
    rotation: torch.Tensor
    centre: torch.Tensor
    rgb: torch.Tensor
    background_rgb: torch.Tensor

    def __len__(self) -> int:
        return len(self.kind)

    @property
    def active(self) -> torch.Tensor:
        """[B, MAX_OBJECTS] bool: slots that hold an object."""
        return torch.arange(MAX_OBJECTS, device=self.count.device) < self.count[:, None]

    def records(self) -> list[dict]:
        """One plain dict per scene (Python ints), for captions and checks."""
        kind, rel, bg, count = (
            t.tolist() for t in (self.kind, self.relation, self.background, self.count)
        )
        sh, co, tx, sz = (t.tolist() for t in (self.shape, self.colour, self.texture, self.size))
        out = []
        for i in range(len(kind)):
            objects = [
                dict(shape=sh[i][k], colour=co[i][k], texture=tx[i][k], size=sz[i][k])
                for k in range(count[i])
            ]
            out.append(dict(kind=kind[i], relation=rel[i], background=bg[i], objects=objects))
        return out


@dataclass
class WorldBatch:
    """Images [B, 3, H, W] in [0, 1], their layout, and object masks [B, MAX_OBJECTS, H, W] (bool,
    coverage above one half; empty in unused slots)."""

    images: torch.Tensor
    layout: Layout
    masks: torch.Tensor

    @property
    def captions(self) -> list[str]:
        return [caption(r) for r in self.layout.records()]


def palette_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(COLOURS), 3] RGB in [0, 1]."""
    return torch.tensor([PALETTE[c] for c in COLOURS], device=device)


def shade_tensor(device: torch.device | str = "cpu") -> torch.Tensor:
    """[len(COLOURS), 3]: each colour's second tone for stripes and dots."""
    rows = []
    for name in COLOURS:
        c = torch.tensor(PALETTE[name])
        rows.append(c * 0.5 if name in LIGHT else c * 0.45 + 0.55)
    return torch.stack(rows).to(device)


# ----------------------------------------------------------------------------- captions


def _object_words(obj: dict, plural: bool = False, keep: dict | None = None) -> list[str]:
    keep = keep or {}
    words = []
    if keep.get("size", True):
        words.append(SIZES[obj["size"]])
    if keep.get("texture", True):
        words.append(TEXTURES[obj["texture"]])
    if keep.get("colour", True):
        words.append(COLOURS[obj["colour"]])
    if keep.get("shape", True):
        words.append(PLURALS[obj["shape"]] if plural else SHAPES[obj["shape"]])
    else:
        words.append("shapes" if plural else "shape")
    return words


def caption(record: dict, keep: dict | None = None, conjunction: str | None = None) -> str:
    """A scene record (`Layout.records()`) in words; `keep` drops attributes (size, texture, colour,
    shape, background: False), `conjunction="and"` replaces a pair's relation (objects as listed).

    "a small striped red star on a blue background", "a large plain green cross left of a small dotted
    white hexagon on a black background", "three small plain red circles on a blue background"."""
    keep = keep or {}
    objs = record["objects"]
    kind = KINDS[record["kind"]]
    if kind == "one":
        words = ["a", *_object_words(objs[0], keep=keep)]
    elif kind == "pair":
        link = conjunction or RELATIONS[record["relation"]]
        words = ["a", *_object_words(objs[0], keep=keep), *link.split()]
        words += ["a", *_object_words(objs[1], keep=keep)]
    else:
        words = [COUNT_WORDS[len(objs)], *_object_words(objs[0], plural=True, keep=keep)]
    if keep.get("background", True):
        words += ["on", "a", COLOURS[record["background"]], "background"]
    return " ".join(_articles(words))


def _articles(words: list[str]) -> list[str]:
    """ "a" before a vowel becomes "an" ("an orange star")."""
    return [
        "an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w
        for i, w in enumerate(words)
    ]


def partial_caption(record: dict, rng: random.Random) -> str:
    """A true but incomplete caption of the scene: attributes dropped at random (size and texture
    half the time, colour a fifth, shape to "shape" a seventh, background half), a pair's relation
    replaced by "and" (in either order) two times in five."""
    keep = dict(
        size=rng.random() < 0.5,
        texture=rng.random() < 0.5,
        colour=rng.random() < 0.8,
        shape=rng.random() < 0.85,
        background=rng.random() < 0.5,
    )
    if KINDS[record["kind"]] == "pair" and rng.random() < 0.4:
        objs = list(record["objects"])
        if rng.random() < 0.5:
            objs.reverse()
        return caption(dict(record, objects=objs), keep, conjunction="and")
    return caption(record, keep)


# ----------------------------------------------------------------------------- layout


def sample_layout(
    n: int,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    kinds: tuple[float, float, float, float] = KIND_P,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = COLOURS,
    textures: tuple[str, ...] = TEXTURES,
) -> Layout:
    """`n` random scenes' layout (no pixels yet); `kinds` are the probabilities of KINDS; `shapes`,
    `colours` and `textures` restrict the draw to those names (colours: at least four)."""
    device = torch.device(device)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=device)

    def randint(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(high, shape, generator=generator, device=device)

    k = MAX_OBJECTS
    kind = torch.multinomial(
        torch.tensor(kinds, device=device, dtype=torch.float),
        n,
        replacement=True,
        generator=generator,
    )
    count = torch.tensor(KIND_COUNT, device=device)[kind]
    allowed_shapes = torch.tensor([SHAPES.index(s) for s in shapes], device=device)
    allowed_colours = torch.tensor([COLOURS.index(c) for c in colours], device=device)
    allowed_textures = torch.tensor([TEXTURES.index(t) for t in textures], device=device)
    shape_pick = randint(len(shapes), n, k)
    colour = allowed_colours[randint(len(colours), n, k)]
    texture = allowed_textures[randint(len(textures), n, k)]
    size = randint(len(SIZES), n, k)
    # a pair's two objects differ in shape or colour (its caption tells them apart)
    same = (shape_pick[:, 1] == shape_pick[:, 0]) & (colour[:, 1] == colour[:, 0]) & (kind == 1)
    if len(shapes) > 1:
        other = (shape_pick[:, 0] + 1 + randint(len(shapes) - 1, n)) % len(shapes)
        shape_pick[:, 1] = torch.where(same, other, shape_pick[:, 1])
    shape = allowed_shapes[shape_pick]
    repeat = (kind >= 2)[:, None]  # "two ..."/"three ...": identical objects
    shape, colour, texture, size = (
        torch.where(repeat, t[:, :1], t) for t in (shape, colour, texture, size)
    )
    size = torch.where((kind == 3)[:, None], 0, size)  # three objects are small (they must fit)
    active = torch.arange(k, device=device) < count[:, None]
    # background: a colour no object has
    scores = uniform(n, len(COLOURS))
    scores[:, [c for c in range(len(COLOURS)) if COLOURS[c] not in colours]] = -2.0
    scores = scores.scatter(1, torch.where(active, colour, colour[:, :1]), -1.0)
    background = scores.argmax(1)
    lo = torch.tensor([r[0] for r in SIZE_RANGE], device=device)[size]
    hi = torch.tensor([r[1] for r in SIZE_RANGE], device=device)[size]
    radius = lo + (hi - lo) * uniform(n, k)
    rotation = uniform(n, k) * 2 * math.pi
    relation = torch.where(kind == 1, randint(len(RELATIONS), n), -1)
    extent = torch.tensor(EXTENT, device=device)[shape] * radius  # [n, k]
    centre = _place(extent, active, kind, relation, generator, device)
    palette = palette_tensor(device)
    jitter = (uniform(n, k + 1, 3) * 2 - 1) * COLOUR_JITTER
    rgb = (palette[colour] + jitter[:, :k]).clamp(0, 1)
    background_rgb = (palette[background] + jitter[:, k]).clamp(0, 1)
    none = ~active
    return Layout(
        kind=kind,
        count=count,
        relation=relation,
        background=background,
        shape=shape.masked_fill(none, -1),
        colour=colour.masked_fill(none, -1),
        texture=texture.masked_fill(none, -1),
        size=size.masked_fill(none, -1),
        radius=radius.masked_fill(none, 0.0),
        rotation=rotation.masked_fill(none, 0.0),
        centre=centre.masked_fill(none[..., None], 0.0),
        rgb=rgb,
        background_rgb=background_rgb,
    )


def _place(
    extent: torch.Tensor,
    active: torch.Tensor,
    kind: torch.Tensor,
    relation: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Centres [n, k, 2]: the first of CANDIDATES random placements that keeps objects apart, inside
    the image and (pairs) clearly in their relation; a fixed layout where none does."""
    n, k = extent.shape
    m = CANDIDATES
    half = 1 - EDGE_MARGIN - extent  # [n, k]: a centre's largest |coordinate|
    u = torch.rand(n, m, k, 2, generator=generator, device=device) * 2 - 1
    cand = u * half[:, None, :, None]  # [n, m, k, 2]
    diff = cand[:, :, :, None] - cand[:, :, None]  # [n, m, k, k, 2]
    dist = diff.norm(dim=-1)
    need = extent[:, None, :, None] + extent[:, None, None, :] + GAP
    both = active[:, None, :, None] & active[:, None, None, :]
    eye = torch.eye(k, dtype=torch.bool, device=device)
    clash = ((dist < need) & both & ~eye).flatten(2).any(2)  # [n, m]
    dx = cand[:, :, 1, 0] - cand[:, :, 0, 0]
    dy = cand[:, :, 1, 1] - cand[:, :, 0, 1]
    clear_left = (dx > 0) & (dx >= 1.5 * dy.abs())
    clear_above = (dy > 0) & (dy >= 1.5 * dx.abs())
    rel = relation[:, None]
    unclear = (kind[:, None] == 1) & torch.where(rel == 0, ~clear_left, ~clear_above)
    ok = ~clash & ~unclear
    first = ok.float().argmax(1)  # first valid candidate (0 if none)
    chosen = cand[torch.arange(n, device=device), first]  # [n, k, 2]
    fixed = torch.tensor(
        [[[-0.5, 0.0], [0.5, 0.0], [0.0, 0.0]], [[0.0, -0.5], [0.0, 0.5], [0.0, 0.0]]],
        device=device,
    )[relation.clamp(min=0)]
    fixed = torch.where(
        (kind == 3)[:, None, None],
        torch.tensor([[-0.55, -0.5], [0.55, -0.5], [0.0, 0.5]], device=device),
        fixed,
    )
    return torch.where(ok.any(1)[:, None, None], chosen, fixed)


# ----------------------------------------------------------------------------- rendering


def make_world(
    n: int,
    size: int = 128,
    seed: int | None = 0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    **restrict,
) -> WorldBatch:
    """`n` random scenes of `size`² pixels; pass `seed` or a `generator` on `device`; `restrict`:
    `sample_layout`'s kinds, shapes, colours, textures."""
    if generator is None:
        generator = torch.Generator(device).manual_seed(0 if seed is None else seed)
    layout = sample_layout(n, generator=generator, device=device, **restrict)
    images, masks = render(layout, size)
    return WorldBatch(images, layout, masks)


def render(layout: Layout, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layout's images [B, 3, size, size] in [0, 1] and object masks [B, MAX_OBJECTS, size, size]."""
    device = layout.centre.device
    n = len(layout)
    axis = (torch.arange(size, device=device) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    images = layout.background_rgb[:, :, None, None].expand(n, 3, size, size).clone()
    masks = torch.zeros(n, MAX_OBJECTS, size, size, dtype=torch.bool, device=device)
    shades, palette = shade_tensor(device), palette_tensor(device)
    for k in range(MAX_OBJECTS):
        rows = (layout.count > k).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        c = layout.centre[rows, k]
        px = x[None] - c[:, 0, None, None]
        py = -(y[None] - c[:, 1, None, None])  # y up
        cos = layout.rotation[rows, k].cos()[:, None, None]
        sin = layout.rotation[rows, k].sin()[:, None, None]
        qx, qy = cos * px + sin * py, -sin * px + cos * py
        r = layout.radius[rows, k][:, None, None]
        d = shape_sdf(layout.shape[rows, k], qx, qy, r)
        cover = (0.5 - d * size / 2).clamp(0, 1)[:, None]  # [m, 1, H, W]
        t = texture_coverage(layout.texture[rows, k], qx, qy, size)[:, None]
        obj = layout.rgb[rows, k][:, :, None, None]
        colour = layout.colour[rows, k]
        second = shades[colour] + layout.rgb[rows, k] - palette[colour]  # the same jitter
        obj = obj * (1 - t) + second.clamp(0, 1)[:, :, None, None] * t
        images[rows] = images[rows] * (1 - cover) + obj * cover
        masks[rows, k] = cover[:, 0] > 0.5
    return images, masks


def shape_sdf(
    shape: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Signed distance [B, H, W] (half image sides, negative inside) to each row's shape [B] (SHAPES
    index) of size r [B, 1, 1], centred at the origin of the object-frame coordinates qx, qy (y up)."""
    out = torch.empty_like(qx)
    for s, fn in enumerate(_SDFS):
        sel = (shape == s).nonzero()[:, 0]
        if len(sel):
            out[sel] = fn(qx[sel], qy[sel], r[sel])
    return out


def texture_coverage(
    texture: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, size: int
) -> torch.Tensor:
    """Share [B, H, W] of each pixel in the second tone: 0 for plain, anti-aliased stripes across the
    object's y axis, or dots on a square grid."""
    p = TEXTURE_PERIOD
    v = qy / p
    stripes = (v - v.round()).abs() * p - STRIPE_DUTY * p / 2
    gx, gy = qx / p, qy / p
    dots = torch.sqrt((gx - gx.round()) ** 2 + (gy - gy.round()) ** 2) * p - DOT_RADIUS * p
    d = torch.where((texture == 1)[:, None, None], stripes, dots)
    cover = (0.5 - d * size / 2).clamp(0, 1)
    return torch.where((texture == 0)[:, None, None], 0.0, cover)


def _circle(px, py, r):
    return torch.sqrt(px**2 + py**2) - r


def _box(px, py, r):
    qx, qy = px.abs() - r, py.abs() - r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _square(px, py, r):
    return _box(px, py, 0.8 * r)


def _triangle(px, py, r):
    """Equilateral, half-side 1.05 r, centroid at the origin, apex up."""
    r = 1.05 * r
    k = math.sqrt(3.0)
    qx = px.abs() - r
    qy = py + r / k
    fold = qx + k * qy > 0
    qx, qy = (
        torch.where(fold, (qx - k * qy) / 2, qx),
        torch.where(fold, (-k * qx - qy) / 2, qy),
    )
    qx = qx - torch.maximum(torch.minimum(qx, torch.zeros_like(qx)), -2 * r)
    return -torch.sqrt(qx**2 + qy**2) * torch.sign(qy)


def _star(px, py, r):
    """Five points at 1.2 r, inner vertices at half that."""
    r, rf = 1.2 * r, 0.5
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px = px.abs()
    t = 2 * (k1x * px + k1y * py).clamp(min=0)
    px, py = px - t * k1x, py - t * k1y
    t = 2 * (k2x * px + k2y * py).clamp(min=0)
    px, py = px - t * k2x, py - t * k2y
    px = px.abs()
    py = py - r
    bax, bay = rf * -k1y, rf * k1x - 1  # rf * (-k1.y, k1.x) - (0, 1)
    h = ((px * bax + py * bay) / (bax**2 + bay**2)).clamp(min=0)
    h = torch.minimum(h, r)
    dist = torch.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2)
    return dist * torch.sign(py * bax - px * bay)


def _cross(px, py, r):
    """A plus sign: arms of half-length r and half-width 0.35 r."""
    bx, by = r, 0.35 * r
    px, py = px.abs(), py.abs()
    swap = py > px
    px, py = torch.where(swap, py, px), torch.where(swap, px, py)
    qx, qy = px - bx, py - by
    k = torch.maximum(qx, qy)
    wx = torch.where(k > 0, qx, by - px)
    wy = torch.where(k > 0, qy, -k)
    return torch.sign(k) * torch.sqrt(wx.clamp(min=0) ** 2 + wy.clamp(min=0) ** 2)


def _hexagon(px, py, r):
    """Regular, circumradius r (corners left and right)."""
    a = r * math.sqrt(3) / 2  # inradius
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    px, py = py.abs(), px.abs()  # corners on the x axis
    t = 2 * (kx * px + ky * py).clamp(max=0)
    px, py = px - t * kx, py - t * ky
    px = px - torch.maximum(torch.minimum(px, kz * a), -kz * a)
    py = py - a
    return torch.sqrt(px**2 + py**2) * torch.sign(py)


_SDFS = (_circle, _square, _triangle, _star, _cross, _hexagon)
