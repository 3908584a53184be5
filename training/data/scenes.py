"""The procedural scenes world: a floor, a sky by time of day, one to four objects, sun
shadows, rendered by ray casting with exact depth, a caption and instruction edits.

World frame: x to the right, y up, z away from the camera; the floor is the plane y = 0
and every object stands on it. The camera is fixed (`CAMERA`), looking slightly down so
both floor and sky show. Units are arbitrary "scene units" (an object is about one unit).

Rendering is numpy on the CPU. Floor and sky do not depend on the objects, so they are
rendered once per (size, supersample, floor, time) with extra supersampling and cached;
a scene then only ray-casts the screen rectangle each object (and its shadow) covers.
That culling, not batching over scenes, is what makes it fast: see benchmarks/bench_scenes.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SHAPES = ("sphere", "cube", "cylinder")
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "orange": (0.96, 0.50, 0.08),
    "yellow": (0.95, 0.86, 0.15),
    "green": (0.16, 0.68, 0.20),
    "cyan": (0.10, 0.78, 0.82),
    "blue": (0.14, 0.28, 0.92),
    "purple": (0.56, 0.20, 0.78),
    "pink": (0.98, 0.52, 0.74),
    "white": (0.94, 0.94, 0.94),
    "brown": (0.46, 0.26, 0.10),
}
FLOORS = ("plain", "checker", "stripes")
TIMES = ("noon", "sunset", "night")
FLOOR_WORDS = {"plain": "plain", "checker": "checkered", "stripes": "striped"}

# Depth is the Euclidean distance from the camera centre to the first surface along the
# ray through the pixel centre, clipped to DEPTH_MAX; sky (and floor beyond it) = DEPTH_MAX.
DEPTH_MAX = 20.0
# Depth mapped to full brightness by depth_to_condition (the bottom image row sees the
# floor at ~3.2; a few near object faces are closer and saturate).
DEPTH_NEAR = 3.0


@dataclass(frozen=True)
class Camera:
    position: tuple[float, float, float] = (0.0, 1.6, -5.0)
    pitch_deg: float = 10.0  # looking down
    fov_y_deg: float = 40.0

    @functools.cached_property
    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, forward) unit vectors in world coordinates."""
        p = math.radians(self.pitch_deg)
        right = np.array([1.0, 0.0, 0.0])
        up = np.array([0.0, math.cos(p), math.sin(p)])
        forward = np.array([0.0, -math.sin(p), math.cos(p)])
        return right, up, forward

    @property
    def tan_half_fov(self) -> float:
        return math.tan(math.radians(self.fov_y_deg) / 2)


CAMERA = Camera()


@dataclass(frozen=True)
class TimeOfDay:
    zenith: tuple[float, float, float]
    horizon: tuple[float, float, float]
    sun_color: tuple[float, float, float]
    sun_elevation_deg: float
    sky_ambient: tuple[float, float, float]  # light from above on a surface facing up
    ground_ambient: tuple[float, float, float]  # light bounced from the floor
    stars: bool = False


TIME_OF_DAY = {
    "noon": TimeOfDay((0.22, 0.45, 0.88), (0.70, 0.84, 0.98), (0.95, 0.92, 0.84), 60.0,
                      (0.44, 0.48, 0.58), (0.26, 0.25, 0.24)),
    "sunset": TimeOfDay((0.22, 0.18, 0.42), (1.00, 0.56, 0.26), (1.00, 0.74, 0.52), 16.0,
                        (0.44, 0.42, 0.56), (0.26, 0.20, 0.18)),
    "night": TimeOfDay((0.01, 0.02, 0.07), (0.07, 0.10, 0.20), (0.60, 0.62, 0.72), 40.0,
                       (0.26, 0.26, 0.34), (0.08, 0.08, 0.10), stars=True),
}

FLOOR_COLORS = {
    "plain": ((0.52, 0.50, 0.47), (0.52, 0.50, 0.47)),
    "checker": ((0.66, 0.66, 0.64), (0.24, 0.24, 0.26)),
    "stripes": ((0.68, 0.66, 0.61), (0.34, 0.39, 0.48)),
}
CHECKER_SIZE = 1.0
STRIPE_WIDTH = 0.5
FOG_START, FOG_END = 7.0, DEPTH_MAX  # the floor fades into the horizon colour
SPECULAR, SHININESS = 0.25, 40.0


# ---------------------------------------------------------------------------------------
# Scene description


@dataclass(frozen=True)
class SceneObject:
    """One object standing on the floor at (x, z).

    `size` is the radius of a sphere or cylinder and half the edge of a cube; `height` is
    a cylinder's height (ignored otherwise); `yaw` turns a cube about the vertical axis.
    """

    shape: str
    color: str
    x: float
    z: float
    size: float
    height: float = 0.0
    yaw: float = 0.0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"color {self.color!r} is not one of {tuple(COLORS)}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.shape == "cylinder" and self.height <= 0:
            raise ValueError(f"a cylinder needs a positive height, got {self.height}")

    @property
    def footprint_radius(self) -> float:
        """Radius of the circle on the floor that contains the object."""
        return self.size * math.sqrt(2) if self.shape == "cube" else self.size

    @property
    def top(self) -> float:
        return {"sphere": 2 * self.size, "cube": 2 * self.size, "cylinder": self.height}[self.shape]


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines an image. `objects` are ordered left to right."""

    objects: tuple[SceneObject, ...]
    floor: str = "plain"
    time: str = "noon"
    light_azimuth: float = 0.0  # radians; 0 = light from behind the camera

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 4:
            raise ValueError(f"a scene has 1 to 4 objects, got {len(self.objects)}")
        if self.floor not in FLOORS:
            raise ValueError(f"floor {self.floor!r} is not one of {FLOORS}")
        if self.time not in TIMES:
            raise ValueError(f"time {self.time!r} is not one of {TIMES}")
        pairs = [(o.shape, o.color) for o in self.objects]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"two objects share colour and shape: {pairs}")

    @property
    def light_direction(self) -> np.ndarray:
        """Unit vector from a surface towards the sun (or moon)."""
        el = math.radians(TIME_OF_DAY[self.time].sun_elevation_deg)
        az = self.light_azimuth
        return np.array([math.sin(az) * math.cos(el), math.sin(el), -math.cos(az) * math.cos(el)])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SceneSpec":
        objects = tuple(SceneObject(**o) for o in d["objects"])
        return cls(objects=objects, floor=d["floor"], time=d["time"],
                   light_azimuth=d["light_azimuth"])


class RenderResult(NamedTuple):
    image: np.ndarray  # float32 [H, W, 3] in [0, 1] (or [B, H, W, 3] from render_batch)
    depth: np.ndarray  # float32 [H, W], ray distance, DEPTH_MAX for sky
    ids: np.ndarray  # int8 [H, W] at pixel centres: object index, -1 floor, -2 sky


class EditPair(NamedTuple):
    instruction: str
    spec: SceneSpec


# ---------------------------------------------------------------------------------------
# Projection (used for placement, culling and tests)


def project(points: np.ndarray, camera: Camera = CAMERA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points [..., 3] -> (u, v, z_cam): u, v in [0, 1] across the image (v down)."""
    right, up, forward = camera.basis
    q = np.asarray(points, dtype=np.float64) - np.array(camera.position)
    zc = q @ forward
    t = camera.tan_half_fov
    u = 0.5 + 0.5 * (q @ right) / (zc * t)
    v = 0.5 - 0.5 * (q @ up) / (zc * t)
    return u, v, zc


def pixel_rays(n: int, camera: Camera = CAMERA) -> np.ndarray:
    """Unit ray directions [n, n, 3] (float64) through the centres of an n x n pixel grid."""
    right, up, forward = camera.basis
    c = (np.arange(n) + 0.5) / n * 2 - 1
    t = camera.tan_half_fov
    d = forward + (c[None, :, None] * t) * right - (c[:, None, None] * t) * up
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def _bbox_corners(obj: SceneObject) -> np.ndarray:
    r = obj.footprint_radius
    xs, ys, zs = (obj.x - r, obj.x + r), (0.0, obj.top), (obj.z - r, obj.z + r)
    return np.array([(x, y, z) for x in xs for y in ys for z in zs])


def _screen_bbox(points: np.ndarray) -> tuple[float, float, float, float]:
    u, v, zc = project(points)
    if np.any(zc <= 1e-3):
        return 0.0, 0.0, 1.0, 1.0
    return float(u.min()), float(v.min()), float(u.max()), float(v.max())


def _pixel_rect(bbox, n: int) -> tuple[slice, slice]:
    u0, v0, u1, v1 = bbox
    c0, c1 = max(int(math.floor(u0 * n)) - 1, 0), min(int(math.ceil(u1 * n)) + 1, n)
    r0, r1 = max(int(math.floor(v0 * n)) - 1, 0), min(int(math.ceil(v1 * n)) + 1, n)
    return slice(r0, max(r1, r0)), slice(c0, max(c1, c0))


# ---------------------------------------------------------------------------------------
# Sampling


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _sample_object(rng: np.random.Generator, shape: str, color: str) -> SceneObject:
    z = rng.uniform(-0.6, 3.0)
    # Roughly inside the frame (half the view's width at that depth, less a margin);
    # _placement_ok checks the exact screen box.
    half_width = (z - CAMERA.position[2]) * CAMERA.tan_half_fov
    x = rng.uniform(-1, 1) * max(half_width - 0.45, 0.1)
    if shape == "sphere":
        return SceneObject(shape, color, x, z, size=rng.uniform(0.42, 0.65))
    if shape == "cube":
        return SceneObject(shape, color, x, z, size=rng.uniform(0.36, 0.52),
                           yaw=rng.uniform(0, math.pi / 2))
    return SceneObject(shape, color, x, z, size=rng.uniform(0.32, 0.48),
                       height=rng.uniform(0.8, 1.5))


def _placement_ok(new: SceneObject, placed: list[tuple[SceneObject, tuple]]) -> tuple | None:
    """The new object's screen box if it fits beside the `placed` (object, box) pairs."""
    for o, _ in placed:
        if math.hypot(new.x - o.x, new.z - o.z) < new.footprint_radius + o.footprint_radius + 0.2:
            return None
    box = _screen_bbox(_bbox_corners(new))
    if box[0] < 0.02 or box[2] > 0.98 or box[3] > 0.98:
        return None
    for o, other in placed:
        # Whichever is farther must stay mostly visible: at most 35% of its screen box hidden.
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            far = other if o.z > new.z else box
            if iw * ih > 0.35 * (far[2] - far[0]) * (far[3] - far[1]):
                return None
    return box


def sample_scene(rng_or_seed) -> SceneSpec:
    """A random scene, fully determined by the seed (or numpy Generator) given."""
    rng = _as_rng(rng_or_seed)
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.3, 0.3, 0.2]))
    placed: list[tuple[SceneObject, tuple]] = []
    for _ in range(200):
        if len(placed) == n:
            break
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        if any(o.shape == shape and o.color == color for o, _ in placed):
            continue
        obj = _sample_object(rng, shape, color)
        box = _placement_ok(obj, placed)
        if box is not None:
            placed.append((obj, box))
    # After 200 tries a crowded scene keeps the objects that fit (at least one always does).
    objects = sorted((o for o, _ in placed), key=lambda o: float(project(np.array([o.x, o.top / 2, o.z]))[0]))
    return SceneSpec(
        objects=tuple(objects),
        floor=FLOORS[rng.integers(len(FLOORS))],
        time=TIMES[rng.integers(len(TIMES))],
        light_azimuth=float(rng.uniform(-math.radians(70), math.radians(70))),
    )


# ---------------------------------------------------------------------------------------
# Language


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: SceneSpec) -> str:
    """'a red sphere and an orange cube on a checkered floor at sunset'."""
    things = " and ".join(f"{_article(o.color)} {o.color} {o.shape}" for o in spec.objects)
    return f"{things} on a {FLOOR_WORDS[spec.floor]} floor at {spec.time}"


def _reference(spec: SceneSpec, k: int) -> str:
    """'the cube', or 'the red cube' when the scene holds more than one cube."""
    o = spec.objects[k]
    if sum(p.shape == o.shape for p in spec.objects) == 1:
        return f"the {o.shape}"
    return f"the {o.color} {o.shape}"


def edit_pairs(spec: SceneSpec) -> list[EditPair]:
    """Every single-change edit of `spec`, each with its instruction, in a fixed order:
    time of day, object colour, object removal (scenes of two or more), floor texture."""
    pairs = [EditPair(f"make it {t}", dataclasses.replace(spec, time=t))
             for t in TIMES if t != spec.time]
    for k, o in enumerate(spec.objects):
        for c in COLORS:
            if any(p.shape == o.shape and p.color == c for p in spec.objects):
                continue  # unchanged colour, or it would duplicate another object
            objs = list(spec.objects)
            objs[k] = dataclasses.replace(o, color=c)
            pairs.append(EditPair(f"make {_reference(spec, k)} {c}",
                                  dataclasses.replace(spec, objects=tuple(objs))))
    if len(spec.objects) > 1:
        for k in range(len(spec.objects)):
            objs = spec.objects[:k] + spec.objects[k + 1:]
            pairs.append(EditPair(f"remove {_reference(spec, k)}",
                                  dataclasses.replace(spec, objects=objs)))
    pairs += [EditPair(f"make the floor {FLOOR_WORDS[f]}", dataclasses.replace(spec, floor=f))
              for f in FLOORS if f != spec.floor]
    return pairs


def edit_kind(instruction: str) -> str:
    """The kind of an `edit_pairs` instruction: "time" (make it night), "color" (make the cube red), "remove"
    (remove the cube) or "floor" (make the floor striped); "other" for text that is none of them."""
    word = instruction.split()
    if len(word) >= 2 and word[0] == "remove":
        return "remove"
    if len(word) == 3 and word[:2] == ["make", "it"] and word[2] in TIMES:
        return "time"
    if len(word) == 4 and word[:3] == ["make", "the", "floor"] and word[3] in FLOOR_WORDS.values():
        return "floor"
    if len(word) >= 4 and word[:2] == ["make", "the"] and word[-1] in COLORS:
        return "color"
    return "other"


def sample_edit(spec: SceneSpec, rng_or_seed) -> EditPair:
    """One edit: the kind (time, colour, removal, floor) uniformly, then one of that kind,
    so that the many colour edits do not crowd out the others."""
    rng = _as_rng(rng_or_seed)
    kinds: dict[str, list[EditPair]] = {}
    for pair in edit_pairs(spec):
        kinds.setdefault(edit_kind(pair.instruction), []).append(pair)
    group = list(kinds.values())[rng.integers(len(kinds))]
    return group[rng.integers(len(group))]


def scene_vocabulary() -> list[str]:
    """Every word a caption or an instruction can contain, sorted."""
    words = {"a", "an", "and", "on", "floor", "at", "make", "it", "the", "remove"}
    words |= set(SHAPES) | set(COLORS) | set(FLOOR_WORDS.values()) | set(TIMES)
    return sorted(words)


# ---------------------------------------------------------------------------------------
# Ray casting. Functions take origin and direction components that broadcast (scalars for
# the camera origin or the light direction, arrays otherwise) and return t, inf on a miss.

_T_MIN = 1e-4


def _hit_sphere(o: SceneObject, ox, oy, oz, dx, dy, dz):
    px, py, pz = ox - o.x, oy - o.size, oz - o.z
    b = px * dx + py * dy + pz * dz
    c = px * px + py * py + pz * pz - o.size * o.size
    disc = b * b - c
    with np.errstate(invalid="ignore"):
        t = -b - np.sqrt(disc)
    return np.where((disc > 0) & (t > _T_MIN), t, np.inf)


def _hit_cylinder(o: SceneObject, ox, oy, oz, dx, dy, dz):
    px, pz = ox - o.x, oz - o.z
    a = dx * dx + dz * dz
    b = px * dx + pz * dz
    c = px * px + pz * pz - o.size * o.size
    disc = b * b - a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        y = oy + t_side * dy
        side = (disc > 0) & (t_side > _T_MIN) & (y >= 0) & (y <= o.height)
        t_cap = (o.height - oy) / dy
        cx, cz = px + t_cap * dx, pz + t_cap * dz
    cap = (t_cap > _T_MIN) & (cx * cx + cz * cz <= o.size * o.size)
    return np.minimum(np.where(side, t_side, np.inf), np.where(cap, t_cap, np.inf))


def _nonzero(d):
    return np.where(np.abs(d) < 1e-9, 1e-9, d)


def _hit_cube(o: SceneObject, ox, oy, oz, dx, dy, dz):
    cs, sn = math.cos(o.yaw), math.sin(o.yaw)
    px, py, pz = ox - o.x, oy - o.size, oz - o.z
    # Into the cube's frame (rotation by -yaw about y).
    lx, lz = cs * px - sn * pz, sn * px + cs * pz
    ldx, ldz = cs * dx - sn * dz, sn * dx + cs * dz
    s = o.size
    t_near, t_far = -np.inf, np.inf
    for p, d in ((lx, ldx), (py, dy), (lz, ldz)):
        d = _nonzero(d)
        t1, t2 = (-s - p) / d, (s - p) / d
        t_near = np.maximum(t_near, np.minimum(t1, t2))
        t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_near <= t_far) & (t_near > _T_MIN), t_near, np.inf)


_HIT = {"sphere": _hit_sphere, "cylinder": _hit_cylinder, "cube": _hit_cube}


def _normal(o: SceneObject, px, py, pz):
    """Outward unit normal at surface points (component arrays)."""
    if o.shape == "sphere":
        return (px - o.x) / o.size, (py - o.size) / o.size, (pz - o.z) / o.size
    if o.shape == "cylinder":
        top = py >= o.height - 1e-4
        nx, nz = (px - o.x) / o.size, (pz - o.z) / o.size
        return np.where(top, 0, nx), np.where(top, 1, 0).astype(px.dtype), np.where(top, 0, nz)
    cs, sn = math.cos(o.yaw), math.sin(o.yaw)
    qx, qy, qz = px - o.x, py - o.size, pz - o.z
    lx, lz = cs * qx - sn * qz, sn * qx + cs * qz
    ax, ay, az = np.abs(lx), np.abs(qy), np.abs(lz)
    on_x = (ax >= ay) & (ax >= az)
    on_y = ~on_x & (ay >= az)
    on_z = ~on_x & ~on_y
    nlx = np.where(on_x, np.sign(lx), 0)
    nly = np.where(on_y, np.sign(qy), 0)
    nlz = np.where(on_z, np.sign(lz), 0)
    # Back to world (rotation by +yaw about y).
    return (cs * nlx + sn * nlz).astype(px.dtype), nly.astype(px.dtype), (-sn * nlx + cs * nlz).astype(px.dtype)


# ---------------------------------------------------------------------------------------
# Cached per-resolution geometry and the floor / sky backdrop


class _Grid(NamedTuple):
    dx: np.ndarray  # [n, n] float32 ray direction components
    dy: np.ndarray
    dz: np.ndarray
    t_floor: np.ndarray  # [n, n] distance to the floor, inf where the ray sees sky


@functools.lru_cache(maxsize=16)
def _grid(n: int) -> _Grid:
    d = pixel_rays(n)
    with np.errstate(divide="ignore"):
        t = np.where(d[..., 1] < 0, -CAMERA.position[1] / d[..., 1], np.inf)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return _Grid(f32(d[..., 0]), f32(d[..., 1]), f32(d[..., 2]), f32(t))


def _fog(t):
    return np.clip((t - FOG_START) / (FOG_END - FOG_START), 0, 1) ** 1.5


def _sky(tod: TimeOfDay, d: np.ndarray) -> np.ndarray:
    h = np.clip(d[..., 1], 0, 1) ** 0.6
    col = (1 - h)[..., None] * np.array(tod.horizon) + h[..., None] * np.array(tod.zenith)
    if tod.stars:
        # A fixed star field hashed from the direction on ~1 pixel cells (at 64 px).
        az = np.floor(np.arctan2(d[..., 0], d[..., 2]) / 0.011).astype(np.int64)
        el = np.floor(np.arcsin(np.clip(d[..., 1], -1, 1)) / 0.011).astype(np.int64)
        hsh = (az * 73856093) ^ (el * 19349663)
        hsh = ((hsh * 2654435761) % (1 << 32)) / float(1 << 32)
        star = (hsh < 0.02) & (d[..., 1] > 0.06)
        col = col + star[..., None] * (0.4 + 30 * hsh)[..., None] * np.array([0.9, 0.9, 1.0])
    return col


def _floor_albedo(floor: str, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    a, b = (np.array(c) for c in FLOOR_COLORS[floor])
    if floor == "checker":
        m = (np.floor(x / CHECKER_SIZE) + np.floor(z / CHECKER_SIZE)) % 2
    elif floor == "stripes":
        m = np.floor(x / STRIPE_WIDTH) % 2
    else:
        m = np.zeros_like(x)
    return (1 - m)[..., None] * a + m[..., None] * b


def _ambient(tod: TimeOfDay, ny) -> np.ndarray:
    """Hemisphere ambient light for normals with vertical component ny."""
    w = (0.5 + 0.5 * np.asarray(ny))[..., None]
    return w * np.array(tod.sky_ambient) + (1 - w) * np.array(tod.ground_ambient)


@functools.lru_cache(maxsize=64)
def _backdrop(n: int, floor: str, time: str) -> tuple[np.ndarray, np.ndarray]:
    """(lit, shadowed) floor-and-sky colours [n, n, 3] float32 for an n x n ray grid,
    box-filtered from a finer grid so that checkers and stripes do not alias."""
    k = max(1, min(4, 1024 // n))
    d = pixel_rays(n * k)
    tod = TIME_OF_DAY[time]
    with np.errstate(divide="ignore"):
        t = np.where(d[..., 1] < 0, -CAMERA.position[1] / d[..., 1], np.inf)
    floor_hit = np.isfinite(t)
    tt = np.where(floor_hit, t, 0)
    x = CAMERA.position[0] + tt * d[..., 0]
    z = CAMERA.position[2] + tt * d[..., 2]
    albedo = _floor_albedo(floor, x, z)
    amb = _ambient(tod, 1.0)
    sun = np.array(tod.sun_color) * math.sin(math.radians(tod.sun_elevation_deg))
    sky = _sky(tod, d)
    fog = _fog(tt)[..., None]
    horizon = np.array(tod.horizon)
    out = []
    for light in (amb + sun, amb):
        c = (1 - fog) * albedo * light + fog * horizon
        c = np.where(floor_hit[..., None], c, sky)
        c = c.reshape(n, k, n, k, 3).mean(axis=(1, 3))
        out.append(np.clip(c, 0, 1).astype(np.float32))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------
# Rendering


def _trace(spec: SceneSpec, n: int):
    """Nearest hit over an n x n grid: (t [n,n], ids [n,n] int8, rects per object)."""
    g = _grid(n)
    t = g.t_floor.copy()
    ids = np.where(np.isfinite(t), -1, -2).astype(np.int8)
    cx, cy, cz = CAMERA.position
    rects = []
    for k, o in enumerate(spec.objects):
        r = _pixel_rect(_screen_bbox(_bbox_corners(o)), n)
        rects.append(r)
        tk = _HIT[o.shape](o, cx, cy, cz, g.dx[r], g.dy[r], g.dz[r])
        closer = tk < t[r]
        t[r] = np.where(closer, tk, t[r])
        ids[r][closer] = k
    return t, ids, rects


def _box_downsample(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks; summing strided views is ~5x faster than reshape().mean()."""
    if k == 1:
        return x.copy()
    out = x[0::k, 0::k].copy()
    for i in range(k):
        for j in range(k):
            if i or j:
                out += x[i::k, j::k]
    out *= 1.0 / (k * k)
    return out


def render(spec: SceneSpec, size: int = 64, supersample: int = 2) -> RenderResult:
    """Ray-cast `spec` into a size x size image with supersample^2 rays per pixel.

    Depth and ids are cast separately through the exact pixel centres, so the depth is
    exact geometry, never a blend across an edge.
    """
    if size < 1 or supersample < 1:
        raise ValueError(f"size and supersample must be positive, got {size}, {supersample}")
    n = size * supersample
    g = _grid(n)
    tod = TIME_OF_DAY[spec.time]
    light = spec.light_direction
    lx, ly, lz = (float(v) for v in light)
    cam = np.array(CAMERA.position, dtype=np.float32)
    t, ids, rects = _trace(spec, n)

    lit_col, shadow_col = _backdrop(n, spec.floor, spec.time)
    color = lit_col.copy()
    lit = np.ones((n, n), dtype=bool)

    # Hit points and normals of object pixels (floor normal is +y).
    tt = np.where(np.isfinite(t), t, 0).astype(np.float32)
    px, py, pz = cam[0] + tt * g.dx, cam[1] + tt * g.dy, cam[2] + tt * g.dz
    nx, ny, nz = np.zeros_like(px), np.ones_like(px), np.zeros_like(px)
    for k, (o, r) in enumerate(zip(spec.objects, rects)):
        m = ids[r] == k
        nk = _normal(o, px[r], py[r], pz[r])
        for full, part in zip((nx, ny, nz), nk):
            full[r] = np.where(m, part, full[r])

    # Shadows: a surface point is dark if a ray towards the light hits an object. Object j
    # can only shadow points inside the box spanned by it and its shadow on the floor.
    eps = 1e-3
    for j, o in enumerate(spec.objects):
        corners = _bbox_corners(o)
        cast = corners - light[None, :] * (corners[:, 1:2] / ly)
        r = _pixel_rect(_screen_bbox(np.concatenate([corners, cast])), n)
        m = (ids[r] != j) & (ids[r] != -2)
        if not m.any():
            continue
        hit = _HIT[o.shape](o, px[r] + eps * nx[r], py[r] + eps * ny[r], pz[r] + eps * nz[r],
                            lx, ly, lz)
        shadowed = m & np.isfinite(hit)
        lit[r] &= ~shadowed
        np.copyto(color[r], shadow_col[r], where=(shadowed & (ids[r] == -1))[..., None])

    # Object shading, all objects at once: hemisphere ambient + Lambert + Blinn-Phong
    # highlight, then fog.
    obj = np.flatnonzero(ids >= 0)
    if obj.size:
        kx, ky, kz = nx.ravel()[obj], ny.ravel()[obj], nz.ravel()[obj]
        kl = lit.ravel()[obj]
        # half vector between the light and the view direction (back along the ray)
        hx, hy, hz = lx - g.dx.ravel()[obj], ly - g.dy.ravel()[obj], lz - g.dz.ravel()[obj]
        hn = np.sqrt(hx * hx + hy * hy + hz * hz)
        ndl = np.clip(kx * lx + ky * ly + kz * lz, 0, None) * kl
        ndh = np.clip((kx * hx + ky * hy + kz * hz) / hn, 0, None)
        sun = np.array(tod.sun_color, dtype=np.float32)
        albedo = np.array([COLORS[o.color] for o in spec.objects], dtype=np.float32)[ids.ravel()[obj]]
        c = albedo * (_ambient(tod, ky) + ndl[:, None] * sun)
        c += (SPECULAR * ndh**SHININESS * ndl.astype(bool))[:, None] * sun
        f = _fog(t.ravel()[obj])[:, None]
        c = (1 - f) * c + f * np.array(tod.horizon, dtype=np.float32)
        color.reshape(-1, 3)[obj] = c

    image = np.clip(_box_downsample(color, supersample), 0, 1)

    if supersample == 1:
        tc, ids_c = t, ids
    else:
        tc, ids_c, _ = _trace(spec, size)
    depth = np.minimum(tc, DEPTH_MAX).astype(np.float32)
    return RenderResult(image, depth, ids_c)


def render_batch(specs, size: int = 64, supersample: int = 2) -> RenderResult:
    """Render several scenes: image [B,H,W,3], depth [B,H,W], ids [B,H,W]. Each scene is
    cast on its own (screen-space culling beats batching scenes of different objects);
    the result equals stacking `render` of each spec, byte for byte."""
    results = [render(s, size, supersample) for s in specs]
    return RenderResult(*(np.stack(parts) for parts in zip(*results)))


def depth_to_condition(depth: np.ndarray) -> np.ndarray:
    """Depth in scene units -> [0, 1] with near = bright: normalised inverse depth
    (disparity) between DEPTH_MAX (0, also the sky) and DEPTH_NEAR (1)."""
    inv = (1.0 / np.maximum(depth, 1e-6) - 1.0 / DEPTH_MAX) / (1.0 / DEPTH_NEAR - 1.0 / DEPTH_MAX)
    return np.clip(inv, 0, 1).astype(np.float32)
