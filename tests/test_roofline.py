"""hardware/roofline.py: per-op times, residency and fusion priced by hand (mutation testing: docs/mutants.md)."""
