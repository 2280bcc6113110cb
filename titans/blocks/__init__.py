"""Sequence-mixing blocks of the baselines (SPEC.md §4), each an nn.Module with a streaming state."""
