"""Encoding: relative-index sparse storage, Huffman coding, the Deep Compression file."""

from compress.encoding.deep import model_storage, read_compressed, write_compressed

__all__ = ["model_storage", "read_compressed", "write_compressed"]
