"""Oracle tests: minilora against PyTorch (skipped, with a reason, when torch is not installed)."""
