"""Weight sharing (Deep Compression, Han et al. 2016, section 3): per-layer k-means codebooks."""

from compress.sharing.kmeans import kmeans_1d
from compress.sharing.shared import SharedWeight, share_layer, shared_bits

__all__ = ["kmeans_1d", "SharedWeight", "share_layer", "shared_bits"]
