"""The lattice rollout in JAX (the other route the earlier project considered): the SPEC step
with ``jnp.roll`` + boundary masks for the gather, ``lax.scan`` over the T steps, one
``jax.jit`` for the forward (which also returns the VJP's residuals) and one for the backward.
The fire masks come from ``cube_kernels.philox.fire_mask`` and are passed in, so JAX draws
exactly the reference's masks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cube_kernels.neighbourhood import offsets
from cube_kernels.philox import fire_mask
from cube_kernels.spec import LN_EPS

from .config import Config
from .impls import Runner

_JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_jax(t: torch.Tensor, dtype) -> jax.Array:
    return jnp.asarray(t.detach().float().cpu().numpy(), dtype=dtype)


def to_torch(a: jax.Array) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float32))


def _layer_norm(x, w, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * w + b


def _shift(t, offset, boundary):
    """``out[b, d, h, w] = t[b, d+dd, h+dh, w+dw]``, zero outside (``zero``) or wrapped."""
    for axis, o in zip((1, 2, 3), offset):
        if o == 0:
            continue
        t = jnp.roll(t, -o, axis=axis)
        if boundary == "zero":
            n = t.shape[axis]
            idx = jnp.arange(n) + o
            keep = ((idx >= 0) & (idx < n)).reshape([n if i == axis else 1 for i in range(t.ndim)])
            t = t * keep.astype(t.dtype)
    return t


def make_rollout(cfg: Config):
    """``rollout(x, params, masks)``; ``masks`` is ``[T, B, D, H, W]`` or None (fire_rate 1)."""
    Fh = cfg.hidden
    offs = offsets(cfg.neighbourhood)

    def step(x, p, m):
        y = _layer_norm(x, p["ln1_weight"], p["ln1_bias"])
        z = jax.nn.gelu(y @ p["w_in"] + p["b_in"], approximate=False)
        u, v = z[..., :Fh], z[..., Fh:]
        vn = _layer_norm(v, p["ln2_weight"], p["ln2_bias"])
        g = p["b_sp"]
        for k, o in enumerate(offs):
            g = g + p["w_sp"][k] * _shift(vn, o, cfg.boundary)
        delta = (u * g) @ p["w_out"] + p["b_out"]
        if m is not None:
            delta = delta * m[..., None]
        return x + delta

    def rollout(x, params, masks):
        def body(x, m):
            return step(x, params, m), None
        x, _ = jax.lax.scan(body, x, masks, length=cfg.steps)
        return x
    return rollout


class JaxRunner(Runner):
    """Forward: ``jit(vjp)`` returning the output and the pullback; backward: ``jit`` of the
    pullback. Gradients are taken for the parameters, as with the torch implementations."""

    def __init__(self, cfg: Config, params, x, grad_out):
        dtype = _JAX_DTYPES[cfg.dtype]
        self.params = {n: to_jax(p, dtype) for n, p in params.items()}
        self.x, self.grad_out = to_jax(x, dtype), to_jax(grad_out, dtype)
        self.masks = None
        if cfg.fire_rate < 1.0:
            B, shape = cfg.batch, (cfg.batch, cfg.depth, cfg.height, cfg.width)
            self.masks = jnp.stack([
                to_jax(fire_mask(cfg.seed, t, B, cfg.cells, cfg.fire_rate).view(shape), dtype)
                for t in range(cfg.steps)])
        rollout = make_rollout(cfg)
        self._fwd = jax.jit(lambda x, p, m: jax.vjp(lambda q: rollout(x, q, m), p))
        self._bwd = jax.jit(lambda pullback, g: pullback(g)[0])
        self.out = self.pullback = self.grads = None

    def forward(self):
        self.out = self.pullback = self.grads = None
        self.out, self.pullback = self._fwd(self.x, self.params, self.masks)
        self.out.block_until_ready()

    def backward(self):
        self.grads = self._bwd(self.pullback, self.grad_out)
        jax.block_until_ready(self.grads)
        self.pullback = None

    def release(self):
        self.out = self.pullback = self.grads = None

    def result(self):
        return to_torch(self.out), {n: to_torch(g) for n, g in self.grads.items()}
