"""Launch: topology and process groups, MPS lifecycle, the per-rank run context."""
