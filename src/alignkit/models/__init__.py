"""Model loading: HF ids or local paths, the embedded default model, LoRA, reward/value heads."""
