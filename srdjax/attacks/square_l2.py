"""Square's L2 proposals, as the official code makes them (fra31/auto-attack, `square.py`, its
L2 branch): the 'meta pseudo-gaussian' windows `eta(s)` (two halves of opposite sign, each a
sum of centred rectangles weighted 1/(r + 1)^2), the start tiling the image with them, and the
update that moves the mass of two windows into one new window at unchanged L2 size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from srdjax.attacks.norms import _l2_size


def _eta_rectangles(a: int, b: int) -> np.ndarray:
    delta = np.zeros((a, b))
    if delta.size == 0:
        return delta
    r0, c0 = a // 2, b // 2
    for counter in range(max(a // 2 + 1, b // 2 + 1)):
        delta[max(r0, 0):min(r0 + 2 * counter + 1, a),
              max(c0, 0):min(c0 + 2 * counter + 1, b)] += 1.0 / (counter + 1) ** 2
        r0, c0 = r0 - 1, c0 - 1
    return delta / np.sqrt(np.sum(delta ** 2))


def eta(s: int) -> np.ndarray:
    """The official code's `eta(s)` [s, s] before its random transposition: unit L2 size."""
    delta = np.zeros((s, s))
    delta[:s // 2] = _eta_rectangles(s // 2, s)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s)
    return delta / np.sqrt(np.sum(delta ** 2))


def eta_table(sizes, height: int, width: int):
    """(table [S, P, P] of eta(s) at the top-left of a zero P x P square, P = max(H, W); the
    index into it of each entry of `sizes`)."""
    distinct = sorted(set(int(s) for s in sizes))
    side = max(height, width)
    table = np.zeros((len(distinct), side, side), np.float32)
    for j, s in enumerate(distinct):
        table[j, :s, :s] = eta(s)
    index = np.asarray([distinct.index(int(s)) for s in sizes], np.int32)
    return table, index


def _place(window, transpose, top, left, height, width):
    """The [P, P] `window` (transposed or not) moved to (top, left), cut to [H, W]."""
    w = jnp.where(transpose, window.T, window)
    return jnp.roll(w, (top, left), axis=(0, 1))[:height, :width]


def start_blocks(height: int, width: int) -> np.ndarray:
    """The start's tiling: blocks [B, 2, H, W] of eta(H // 5) (as it is, transposed) on a grid
    of side H // 5 offset by (H - 5 (H // 5)) // 2, cut at the image's edge."""
    s = height // 5
    offset = (height - 5 * s) // 2
    e = eta(s)
    blocks = []
    for r in range(height // s):
        for c in range(width // s):
            block = np.zeros((2, height, width), np.float32)
            top, left = offset + r * s, offset + c * s
            rows, cols = max(0, min(s, height - top)), max(0, min(s, width - left))
            block[0, top:top + rows, left:left + cols] = e[:rows, :cols]
            block[1, top:top + rows, left:left + cols] = e.T[:rows, :cols]
            blocks.append(block)
    return np.stack(blocks)


def start(x, eps, blocks, signs, transposed):
    """x + eps * (the tiling with a sign per block and channel) / its L2 size, clipped to [0, 1].
    signs [N, B, C], transposed [N, B]."""
    placed = jnp.where(transposed[:, :, None, None], blocks[None, :, 1], blocks[None, :, 0])
    delta = jnp.einsum("nbhw,nbc->nhwc", placed, signs)
    return jnp.clip(x + delta / (_l2_size(delta) + 1e-12) * eps, 0.0, 1.0)


def proposal(x, best, eps, window, s, first, second, signs, transposed):
    """The official update: window 1 at `first` (tops and lefts [N]) gets eta(s) (sign per
    channel, transposed or not) plus its old content at unit size, rescaled to carry the mass
    of windows 1 and 2 and what the budget has left; window 2 is emptied; the whole
    perturbation is rescaled to L2 size eps and clipped to [0, 1]."""
    n, h, w, c = x.shape
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]

    def mask(corner):
        top, left = corner[0][:, None, None, None], corner[1][:, None, None, None]
        return (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)

    in1, in2 = mask(first), mask(second)
    delta = best - x
    spatial = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2), keepdims=True))
    norm_window_1 = spatial(jnp.where(in1, delta, 0.0))
    norm_image = _l2_size(delta)
    norm_windows = spatial(jnp.where(in1 | in2, delta, 0.0))
    placed = jax.vmap(lambda t, top, left: _place(window, t, top, left, h, w))(
        transposed, first[0], first[1])
    new = placed[..., None] * signs[:, None, None, :] + jnp.where(in1, delta, 0.0) / (
        1e-12 + norm_window_1)
    new = new / (1e-12 + spatial(new)) * jnp.sqrt(
        jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
    delta = jnp.where(in1, new, jnp.where(in2, 0.0, delta))
    return jnp.clip(x + delta / (_l2_size(delta) + 1e-12) * eps, 0.0, 1.0)
