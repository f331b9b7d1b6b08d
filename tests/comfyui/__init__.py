"""Integration tests inside real ComfyUI (package scope: ComfyUI is imported once and forgotten afterwards)."""
