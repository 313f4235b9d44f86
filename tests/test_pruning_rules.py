"""pruning/structured.py, pruning/masks.py, metrics/counting.py and the unstructured stage: values worked out by hand (mutation testing: docs/mutants.md)."""
