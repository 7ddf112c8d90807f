"""Drafter models with their own weights (engine-agnostic torch): DFlash block drafters, diffusion LMs."""
