"""Library for colocated EAGLE-3 draft training (imported from the repository root)."""
