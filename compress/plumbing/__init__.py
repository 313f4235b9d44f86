"""Model plumbing: what sits on a layer's weight and how it comes off and goes back.

The lowest sub-layer of the capabilities: pruning masks as parametrizations, deployed copies with
them baked in, the layers the methods act on, and the registration points through which every
capability says how a saved model gets its changes back (:mod:`compress.plumbing.restorers`).
It imports nothing of the other capabilities; they all build on it.
"""
