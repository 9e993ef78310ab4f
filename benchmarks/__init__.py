"""The benchmark harness (``python -m benchmarks.bench``, ``minilora bench``, ``make bench``) and the PyTorch twin.

Not part of the installed package: it lives in the repository next to it, and imports
``minilora`` like any user code. See benchmarks/README.md.
"""
