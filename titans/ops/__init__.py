"""Pure tensor operators shared by the baselines (no parameters, no nn.Module)."""
