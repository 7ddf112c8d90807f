"""Draft models that spec_plugins methods run next to the target (engine-agnostic: torch + transformers)."""
