"""Command-line tools around the plugins: the embedded default model
(``spec-plugins-model``) and the DFlash drafter trainer (``spec-plugins-train-drafter``).

They may import engines and transformers; nothing in the core or the adapters imports
them (paths they share with the core live in ``spec_plugins.paths``).
"""
