"""Growing neural cellular automata on the lattice: ``cube-grow`` (see docs/growth.md)."""
