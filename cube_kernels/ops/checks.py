"""Input validation of the ops, one set of rules and messages for every implementation.

The Python entries of the C++ ops and the Triton ops run these before anything else (and the
fake kernels run them under torch.compile), so every backend raises the same exception with
the same message: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape,
device or value. The C++ checks (csrc/checks.h) stay behind them as the last line of defence
for direct ``torch.ops.cube`` calls.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..neighbourhood import check_boundary, check_neighbourhood, num_tokens

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MAX_ROWS = 2**31 - 1  # the kernels index cells (rows) with int32
SEED_BOUND = 2**63  # seeds are int64 in the ops' schemas and in Philox's key


def check_tensor(name: str, t, ndim: int, like: torch.Tensor | None = None,
                 like_name: str | None = None, same_dtype: bool = True) -> None:
    """``t`` is a floating tensor with ``ndim`` dimensions, on ``like``'s device and (with
    ``same_dtype``) of its dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if like is None or not same_dtype:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be one of {DTYPES}, got {t.dtype}")
    elif t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype} "
                        "(all tensors of one call share a dtype)")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def check_rows(name: str, t: torch.Tensor) -> int:
    """The number of cells B*D*H*W of a ``[B, D, H, W, ...]`` tensor, at most ``MAX_ROWS``."""
    rows = math.prod(t.shape[:-1])
    if rows > MAX_ROWS:
        raise ValueError(f"{name} has {rows} cells (B*D*H*W); at most 2**31 - 1 are supported")
    return rows


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_seed(seed) -> None:
    if not _is_int(seed) or not 0 <= seed < SEED_BOUND:
        raise (ValueError if _is_int(seed) else TypeError)(
            f"seed must be an int in [0, 2**63), got {seed!r}")


def check_fire_rate(fire_rate) -> None:
    if isinstance(fire_rate, bool) or not isinstance(fire_rate, numbers.Real):
        raise TypeError(f"fire_rate must be a number in [0, 1], got {fire_rate!r}")
    if not 0.0 <= fire_rate <= 1.0:  # written so that NaN fails too
        raise ValueError(f"fire_rate must be in [0, 1], got {fire_rate!r}")


def check_mask_args(seed, step, fire_rate, rows: int) -> None:
    """The fire mask's arguments: its Philox offsets ``step * rows + row`` must fit in int64."""
    check_seed(seed)
    if not _is_int(step):
        raise TypeError(f"step must be a non-negative int, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if (step + 1) * rows >= 2**63:
        raise ValueError(f"step * B * D * H * W must fit in int64, got step={step} with {rows} cells")
    check_fire_rate(fire_rate)


def check_alive(alive_channel, alive_threshold, channels: int) -> None:
    """Alive masking's arguments: ``alive_channel`` None or a channel of the state."""
    if alive_channel is not None:
        if not _is_int(alive_channel):
            raise TypeError(f"alive_channel must be None or an int, got {alive_channel!r}")
        if not 0 <= alive_channel < channels:
            raise ValueError(f"alive_channel must be in [0, {channels}), got {alive_channel}")
    if isinstance(alive_threshold, bool) or not isinstance(alive_threshold, numbers.Real):
        raise TypeError(f"alive_threshold must be a number, got {alive_threshold!r}")


def check_stencil(neighbourhood, boundary) -> int:
    """The neighbourhood and boundary names; returns the token count K."""
    for name, value in (("neighbourhood", neighbourhood), ("boundary", boundary)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    check_neighbourhood(neighbourhood)
    check_boundary(boundary)
    return num_tokens(neighbourhood)
