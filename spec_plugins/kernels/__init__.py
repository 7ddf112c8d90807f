"""Tree attention kernels and their pure-torch reference (tree attention arrives with
dynamic draft trees; chains need none: the engine's causal attention verifies them)."""
