"""Neighbourhoods and boundaries of the lattice (SPEC.md, "Neighbourhood")."""
from __future__ import annotations

import itertools

NEIGHBOURHOODS = ("von_neumann", "moore")
BOUNDARIES = ("zero", "periodic")

_VON_NEUMANN = (
    (0, 0, 0),
    (-1, 0, 0), (1, 0, 0),
    (0, -1, 0), (0, 1, 0),
    (0, 0, -1), (0, 0, 1),
)
_MOORE = ((0, 0, 0),) + tuple(o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0))


def check_neighbourhood(neighbourhood: str) -> str:
    if neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(f"neighbourhood must be one of {NEIGHBOURHOODS}, got {neighbourhood!r}")
    return neighbourhood


def check_boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    return boundary


def offsets(neighbourhood: str) -> tuple[tuple[int, int, int], ...]:
    """(dd, dh, dw) of each token; token 0 is the cell itself."""
    check_neighbourhood(neighbourhood)
    return _VON_NEUMANN if neighbourhood == "von_neumann" else _MOORE


def num_tokens(neighbourhood: str) -> int:
    return len(offsets(neighbourhood))
