"""Draft models, engine-agnostic (torch + safetensors only; no engine imports)."""
