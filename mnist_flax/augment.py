"""Random affine augmentation (shift, rotation, zoom) on the device, a pure function of the step's
key (a resumed run replays the same images): one bilinear `map_coordinates` per image, zero fill.
`fast.dispatch` warps each batch before the step; all ranges zero (the tutorial) skips it.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RandomAffine:
    """Ranges of the random transform; each draw is uniform in [-max, max], per image."""

    max_shift: float = 0.0  # Pixels, drawn separately along each axis.
    max_rotation: float = 0.0  # Degrees.
    max_scale: float = 0.0  # Zoom factor in [1 - max_scale, 1 + max_scale].

    @property
    def enabled(self) -> bool:
        return any((self.max_shift, self.max_rotation, self.max_scale))


def affine_matrices(key: jax.Array, n: int, spec: RandomAffine) -> jax.Array:
    """(n, 2, 3) maps from output (row, col) to input (row, col), about the image centre.

    Returned as the inverse transform because resampling asks, for each output pixel, where in
    the input to read.
    """
    shift_key, angle_key, scale_key = jax.random.split(key, 3)
    shift = jax.random.uniform(shift_key, (n, 2), minval=-1.0, maxval=1.0) * spec.max_shift
    angle = jnp.deg2rad(jax.random.uniform(angle_key, (n,), minval=-1.0, maxval=1.0)
                        * spec.max_rotation)
    scale = 1.0 + jax.random.uniform(scale_key, (n,), minval=-1.0, maxval=1.0) * spec.max_scale
    cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
    linear = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    return jnp.concatenate([linear, -jnp.einsum("nij,nj->ni", linear, shift)[..., None]], -1)


def warp(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Resamples (B, H, W, C) images through (B, 2, 3) inverse maps; outside pixels read as 0."""
    _, h, w, _ = images.shape
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], images.dtype)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=images.dtype),
                              jnp.arange(w, dtype=images.dtype), indexing="ij")
    out = jnp.stack([rows.ravel(), cols.ravel()]) - centre[:, None]  # (2, H*W), centred.

    def one(image: jax.Array, matrix: jax.Array) -> jax.Array:  # (H, W, C), (2, 3)
        src = matrix[:, :2] @ out + matrix[:, 2:] + centre[:, None]  # (2, H*W)
        channels = [jax.scipy.ndimage.map_coordinates(image[..., c], list(src), order=1,
                                                      mode="constant", cval=0.0)
                    for c in range(image.shape[-1])]
        return jnp.stack(channels, -1).reshape(image.shape)

    return jax.vmap(one)(images, matrices)


def random_affine(key: jax.Array, images: jax.Array, spec: RandomAffine) -> jax.Array:
    """Each image moved by its own random shift, rotation and zoom drawn from `key`."""
    return warp(images, affine_matrices(key, images.shape[0], spec))
