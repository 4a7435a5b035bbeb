"""The trainer role: the step loop, batch sources (paired and sequential), draft setup, checkpoints, metrics."""
