"""Benchmarks of cube-kernels against the other ways to run the lattice: ``python -m bench``
(see docs/bench.md)."""
