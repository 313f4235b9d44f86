"""Pruning: channel removal (structured, via Torch-Pruning), attention heads, latency targets.

The masks of unstructured pruning live below every capability, in :mod:`compress.plumbing.masks`
(``compress.pruning.masks`` is their old import path).
"""
