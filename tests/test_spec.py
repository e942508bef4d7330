"""The repository holds the SPEC.md it cites: the copy at its root is the project's shared one."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_spec_is_the_shared_one():
    shared = ROOT.parent / "shared" / "SPEC.md"
    if not shared.exists():
        pytest.skip(f"no {shared} beside this checkout")
    assert (ROOT / "SPEC.md").read_text() == shared.read_text(), \
        f"SPEC.md differs from {shared}: copy the shared one here"
