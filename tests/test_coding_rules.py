"""encoding/*, sharing/* and distill/losses.py: values worked out by hand (mutation testing: docs/mutants.md)."""
