"""Pruning: masks (unstructured) and channel removal (structured, via Torch-Pruning)."""
