"""Evaluation: speculative decoding against the target, drafters, online evaluation during training."""
