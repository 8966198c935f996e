"""Vectorised drawing primitives shared by the phantom generators and the natural stand-in.

Everything works on float32 coordinate arrays in normalised units: ``x`` runs from -1 (left
edge) to +1 (right edge) and ``y`` from -1 (top) to +1 (bottom), whatever the pixel size, so a
generator draws at the requested size directly. Shapes are *soft* (values in 0..1 with an edge
ramp about one pixel wide) so they anti-alias, composite by simple arithmetic and threshold
into masks at 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

MIN_SIZE = 64
MAX_SIZE = 512


def check_size(size: int, where: str = "size") -> int:
    """Validate an image size (an int in 64..512) and return it; raise a ValueError that says what to pass."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{where} must be an int pixel size in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ValueError(f"{where}={size} is outside the supported range {MIN_SIZE}..{MAX_SIZE} px; "
                         f"generate at a size in that range and resize afterwards if you need another")
    return int(size)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Open float32 grids (y of shape (size, 1), x of shape (1, size)) of pixel centres in [-1, 1]."""
    centres = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    return centres[:, None], centres[None, :]


@dataclass(frozen=True)
class Canvas:
    """Scene coordinates of a (size, size) image seen through a rotation / scale / shift.

    ``X`` and ``Y`` are full float32 arrays of scene coordinates per pixel; :meth:`box` gives the
    pixel window that holds a scene disc, so small shapes are computed only where they can be.
    """

    size: int
    X: np.ndarray
    Y: np.ndarray
    cos: float  # X = cos * (x - sx) + sin * (y - sy), Y = cos * (y - sy) - sin * (x - sx)
    sin: float
    shift: tuple[float, float]
    scale: float

    @classmethod
    def make(cls, size: int, angle_deg: float = 0.0, scale: float = 1.0,
             shift: tuple[float, float] = (0.0, 0.0)) -> "Canvas":
        """A canvas whose scene appears rotated by ``angle_deg`` (counter-clockwise), magnified by ``scale``
        and moved by ``shift`` (dx, dy in normalised units)."""
        y, x = grid(size)
        a = np.deg2rad(angle_deg)
        c, s = float(np.cos(a) / scale), float(np.sin(a) / scale)
        xs, ys = x - np.float32(shift[0]), y - np.float32(shift[1])
        X = (np.float32(c) * xs + np.float32(s) * ys).astype(np.float32, copy=False)
        Y = (np.float32(c) * ys - np.float32(s) * xs).astype(np.float32, copy=False)
        return cls(size=size, X=X, Y=Y, cos=c, sin=s, shift=(float(shift[0]), float(shift[1])), scale=float(scale))

    def box(self, cx: float, cy: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel (row, column) slices covering the scene disc at (cx, cy); None when it is off the image."""
        det = self.cos ** 2 + self.sin ** 2
        dx = (self.cos * cx - self.sin * cy) / det + self.shift[0]
        dy = (self.sin * cx + self.cos * cy) / det + self.shift[1]
        half = self.size / 2.0
        col, row = (dx + 1.0) * half - 0.5, (dy + 1.0) * half - 0.5
        rad = radius * self.scale * half + 2.0
        r0, r1 = max(int(np.floor(row - rad)), 0), min(int(np.ceil(row + rad)) + 1, self.size)
        c0, c1 = max(int(np.floor(col - rad)), 0), min(int(np.ceil(col + rad)) + 1, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def rect(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel slices covering the scene rectangle [x0, x1] x [y0, y1]; None when it is off the image."""
        det = self.cos ** 2 + self.sin ** 2
        half = self.size / 2.0
        pts = []
        for sx in (x0, x1):
            for sy in (y0, y1):
                dx = (self.cos * sx - self.sin * sy) / det + self.shift[0]
                dy = (self.sin * sx + self.cos * sy) / det + self.shift[1]
                pts.append(((dx + 1.0) * half - 0.5, (dy + 1.0) * half - 0.5))
        cols, rows = [q[0] for q in pts], [q[1] for q in pts]
        r0, r1 = max(int(np.floor(min(rows))) - 2, 0), min(int(np.ceil(max(rows))) + 3, self.size)
        c0, c1 = max(int(np.floor(min(cols))) - 2, 0), min(int(np.ceil(max(cols))) + 3, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def zeros(self) -> np.ndarray:
        """A float32 (size, size) array of zeros."""
        return np.zeros((self.size, self.size), dtype=np.float32)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, edge: float, angle: float = 0.0,
                square: float = 0.0) -> np.ndarray:
        """Soft ellipse as a full array, computed only inside its bounding box."""
        out = self.zeros()
        sl = self.box(cx, cy, max(ax, ay) * (1.0 + square) + edge)
        if sl is not None:
            out[sl] = soft_ellipse(self.X[sl], self.Y[sl], cx, cy, ax, ay, edge, angle, square)
        return out

    def region(self, sl: tuple[slice, slice] | None, values: np.ndarray) -> np.ndarray:
        """A full zero array holding ``values`` in the window ``sl`` (values already computed there)."""
        out = self.zeros()
        if sl is not None:
            out[sl] = values
        return out

    def ellipse_radius(self, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0,
                       square: float = 0.0, reach: float = 1.0) -> tuple[np.ndarray, tuple[slice, slice] | None]:
        """Normalised ellipse radius inside the box that holds radii up to ``reach`` (and that box)."""
        sl = self.box(cx, cy, max(ax, ay) * reach * (1.0 + square))
        if sl is None:
            return np.zeros((0, 0), dtype=np.float32), None
        return ellipse_radius(self.X[sl], self.Y[sl], cx, cy, ax, ay, angle, square), sl


def ramp(signed: np.ndarray, edge: float) -> np.ndarray:
    """Map a signed distance (positive inside) to 0..1 with a linear ramp ``edge`` wide."""
    out = signed * np.float32(1.0 / max(edge, 1e-6))
    out += np.float32(0.5)
    np.maximum(out, np.float32(0.0), out=out)
    np.minimum(out, np.float32(1.0), out=out)
    return out


def ellipse_radius(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                   angle: float = 0.0, square: float = 0.0) -> np.ndarray:
    """Normalised ellipse radius: 1 on the outline, < 1 inside (angle in radians).

    ``square`` in 0..1 blends the Euclidean radius with the max-norm, a cheap stand-in for a
    super-ellipse (0 = ellipse, about 0.15 ~ power 2.3, 0.37 ~ power 3, 1 = rectangle).
    """
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        u = X * np.float32(c / ax) + Y * np.float32(s / ax) - np.float32((c * cx + s * cy) / ax)
        v = Y * np.float32(c / ay) - X * np.float32(s / ay) - np.float32((c * cy - s * cx) / ay)
    else:
        u = X * np.float32(1.0 / ax) - np.float32(cx / ax)
        v = Y * np.float32(1.0 / ay) - np.float32(cy / ay)
    if not square:
        u *= u
        v *= v
        u += v
        return np.sqrt(u, out=u)
    np.abs(u, out=u)
    np.abs(v, out=v)
    m = np.maximum(u, v)
    u *= u
    v *= v
    u += v
    np.sqrt(u, out=u)
    u *= np.float32(1.0 - square)
    m *= np.float32(square)
    u += m
    return u


def soft_from_radius(r: np.ndarray, scale: float, edge: float) -> np.ndarray:
    """Soft inside-mask from a normalised radius: ramp((1 - r) * scale, edge) in four array operations."""
    k = np.float32(scale / max(edge, 1e-6))
    out = r * (-k)
    out += k + np.float32(0.5)
    np.maximum(out, np.float32(0.0), out=out)
    np.minimum(out, np.float32(1.0), out=out)
    return out


def soft_ellipse(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                 edge: float, angle: float = 0.0, square: float = 0.0) -> np.ndarray:
    """Soft filled ellipse: 1 inside, 0 outside, a ramp ``edge`` wide at the outline."""
    return soft_from_radius(ellipse_radius(X, Y, cx, cy, ax, ay, angle, square), min(ax, ay), edge)


def polygon_distance(X: np.ndarray, Y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance-like field of a convex polygon (positive inside): the min over its edges."""
    v = np.asarray(vertices, dtype=np.float64)
    area2 = np.sum(v[:, 0] * np.roll(v[:, 1], -1) - np.roll(v[:, 0], -1) * v[:, 1])
    sign = 1.0 if area2 > 0 else -1.0
    out = None
    for i in range(len(v)):
        (x0, y0), (x1, y1) = v[i], v[(i + 1) % len(v)]
        ex, ey = x1 - x0, y1 - y0
        length = np.hypot(ex, ey) + 1e-12
        nx, ny = -ey / length * sign, ex / length * sign
        d = (X - np.float32(x0)) * np.float32(nx) + (Y - np.float32(y0)) * np.float32(ny)
        out = d if out is None else np.minimum(out, d)
    return out


def soft_polygon(X: np.ndarray, Y: np.ndarray, vertices: np.ndarray, edge: float) -> np.ndarray:
    """Soft filled convex polygon (vertices in either winding order)."""
    return ramp(polygon_distance(X, Y, vertices), edge)


def band(d: np.ndarray, half_width: float, edge: float) -> np.ndarray:
    """Soft band |d| < half_width (d a signed distance to a centre line)."""
    return ramp(np.float32(half_width) - np.abs(d), edge)


def smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic smoothstep of t clipped to 0..1."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


@lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) cubic B-spline interpolation weights mapping n_in control points to n_out samples."""
    pos = (np.arange(n_out) + 0.5) / n_out * (n_in - 1)
    d = np.abs(pos[:, None] - np.arange(n_in)[None, :])
    w = np.where(d < 1, 2 / 3 - d ** 2 + d ** 3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))
    w /= w.sum(axis=1, keepdims=True)
    w.setflags(write=False)
    return w.astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int | tuple[int, int],
                 coarse: np.ndarray | None = None) -> np.ndarray:
    """Smooth zero-mean, unit-ish variance noise with about ``cells`` blobs across (separable B-spline upsampling).

    Costs two small matrix products, far less than blurring white noise at full size.
    """
    cy, cx = (cells, cells) if isinstance(cells, (int, np.integer)) else cells
    cy, cx = max(int(cy), 2) + 2, max(int(cx), 2) + 2
    if coarse is None:
        coarse = rng.standard_normal((cy, cx), dtype=np.float32)
    out = _interp_matrix(shape[0], coarse.shape[0]) @ coarse @ _interp_matrix(shape[1], coarse.shape[1]).T
    return out * np.float32(1.6)


def blur(img: np.ndarray, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian blur (scipy, truncated at 2.5 sigma); a no-op for sigma below 0.2 px."""
    if np.max(sigma) < 0.2:
        return img
    return ndi.gaussian_filter(img, sigma, truncate=2.5, mode="nearest")


def speckle(rng: np.random.Generator, shape: tuple[int, int], grain: tuple[float, float]) -> np.ndarray:
    """Spatially correlated multiplicative speckle: the magnitude of blurred complex Gaussian noise.

    ``grain`` = (axial, lateral) correlation length in pixels. Returns a Rayleigh-like field with mean 1.
    """
    re = rng.standard_normal(shape, dtype=np.float32)
    im = rng.standard_normal(shape, dtype=np.float32)
    re = ndi.gaussian_filter(re, grain, truncate=2.0, mode="wrap")
    im = ndi.gaussian_filter(im, grain, truncate=2.0, mode="wrap")
    mag = np.sqrt(re * re + im * im)
    return mag * np.float32(1.0 / (float(mag.mean()) + 1e-6))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Clip a 0..1 float image and quantise it to uint8."""
    out = img * np.float32(255.0)
    out += np.float32(0.5)
    np.maximum(out, np.float32(0.0), out=out)
    np.minimum(out, np.float32(255.0), out=out)
    return out.astype(np.uint8)


def fast_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance float32 noise (a sum of two uniform bytes): six times cheaper than normals."""
    n = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(2 * n), dtype=np.uint8).reshape((2,) + tuple(shape))
    out = raw.sum(axis=0, dtype=np.float32)
    out -= np.float32(255.0)
    out *= np.float32(1.0 / 104.5)
    return out


def window(img: np.ndarray, lo: float, hi: float, gamma: float = 1.0) -> np.ndarray:
    """Linear window [lo, hi] -> [0, 1] with clipping and an optional gamma."""
    out = (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    if gamma != 1.0:
        out **= np.float32(gamma)
    return out


def sample_partition(rng: np.random.Generator, block: int, weights: dict[tuple[int, ...], float]) -> tuple[int, ...]:
    """Draw how a block of ``block`` consecutive indices splits into patients (e.g. (2, 1, 1))."""
    options = list(weights)
    p = np.array([weights[o] for o in options], dtype=np.float64)
    choice = options[int(rng.choice(len(options), p=p / p.sum()))]
    if sum(choice) != block:
        raise ValueError(f"partition {choice} does not sum to the block size {block}")
    return choice


def patient_slot(index: int, block: int, partition: tuple[int, ...]) -> tuple[int, int]:
    """(patient number within the block, visit number of that patient) for a dataset index."""
    slot = index % block
    start = 0
    for k, count in enumerate(partition):
        if slot < start + count:
            return k, slot - start
        start += count
    raise ValueError(f"slot {slot} not covered by partition {partition}")
