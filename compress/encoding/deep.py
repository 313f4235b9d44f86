"""The Deep Compression format: size accounting after every stage, and a real file.

Per prunable layer (Han et al. 2016, sections 2-4): the non-zero weights in CSR order with
relative indices of ``index_bits`` bits (filler zeros where a gap does not fit), the weights as
codebook indices when the layer is shared (a 32-bit float codebook beside them) or as fp32 when
not, both streams Huffman-coded. A layer is stored dense (fp32) when that is smaller. Every other
tensor (biases, BatchNorm, buffers) is stored dense.

File: ``b"DCMP1"``, a uint32 header length, a zlib-compressed JSON header (model spec, per-tensor
layout, Huffman code lengths), then each tensor's streams, byte-aligned. ``compressed_bytes`` in
:func:`model_storage` is the size of that file less the model spec, so the reported size is what
lands on disk.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.encoding.csr import absolute_positions, relative_indices
from compress.encoding.huffman import code_lengths, decode_packed, encode
from compress.errors import UserError
from compress.files import atomic_write, json_text
from compress.models import build_from_spec
from compress.plumbing.masks import deployed_copy, weight_layers
from compress.pruning.attention import attention_state, restore_attention
from compress.pruning.structured import restore_structure
from compress.sharing.shared import get_shared

__all__ = ["model_storage", "write_compressed", "read_compressed", "MAGIC"]

MAGIC = b"DCMP1"


AUTO_WIDTHS = range(2, 9)  # relative-index widths tried by ``index_bits="auto"``


def _layer_plan(name: str, module: nn.Module, index_bits: int | str) -> dict[str, Any]:
    """How one prunable layer's weight is stored, with its symbol streams and sizes.

    ``index_bits="auto"`` tries every width in :data:`AUTO_WIDTHS` and keeps the smallest layer
    (narrow widths need more fillers, wide ones code each gap in more bits).
    """
    if index_bits == "auto":
        return min((_layer_plan(name, module, b) for b in AUTO_WIDTHS), key=lambda p: p["payload_bytes"])
    with torch.no_grad():
        w = module.weight.detach().cpu()
    flat = w.flatten().numpy()
    positions = np.flatnonzero(flat)
    stored, filler = relative_indices(positions, index_bits)
    entries = len(stored)
    idx_len = code_lengths(np.bincount(stored, minlength=1 << index_bits))
    idx_bits = int((idx_len[stored]).sum())
    plan: dict[str, Any] = {"name": f"{name}.weight", "shape": list(w.shape), "numel": int(w.numel()),
                            "nonzero": int(len(positions)), "entries": entries, "index_bits": index_bits,
                            "stored_index": stored, "index_lengths": idx_len, "index_stream_bits": idx_bits}
    shared = get_shared(module)
    if shared is not None:
        k = int(shared.centroids.numel())
        symbols = np.full(entries, k, dtype=np.int64)  # fillers: symbol k, the zero
        symbols[~filler] = shared.indices.flatten().numpy().astype(np.int64)[positions]
        w_len = code_lengths(np.bincount(symbols, minlength=k + 1))
        plan.update(kind="shared", codebook=shared.centroids.detach().cpu().numpy().astype(np.float32),
                    symbols=symbols, weight_lengths=w_len, weight_bits=math.ceil(math.log2(k + 1)),
                    weight_stream_bits=int(w_len[symbols].sum()), codebook_bits=32 * k)
    else:
        values = np.zeros(entries, dtype=np.float32)
        values[~filler] = flat[positions]
        plan.update(kind="csr", values=values, weight_bits=32, weight_stream_bits=32 * entries, codebook_bits=0)
    sparse_bytes = (plan["codebook_bits"] + 8 * math.ceil(plan["weight_stream_bits"] / 8)
                    + 8 * math.ceil(idx_bits / 8)) // 8
    if plan["kind"] == "csr" and sparse_bytes >= 4 * w.numel():  # dense is smaller
        plan.update(kind="dense", data=flat.astype(np.float32), payload_bytes=4 * w.numel())
    else:
        plan["payload_bytes"] = sparse_bytes
    return plan


def _plan(model: nn.Module, index_bits: int | str, deployed: nn.Module | None = None) -> list[dict[str, Any]]:
    deployed = (deployed if deployed is not None else deployed_copy(model)).cpu()
    layers = weight_layers(model)
    plans = [_layer_plan(n, m, index_bits) for n, m in layers.items()]
    encoded = {p["name"] for p in plans}
    for key, t in deployed.state_dict().items():
        if key in encoded:
            continue
        arr = t.detach().cpu().numpy()
        plans.append({"name": key, "shape": list(arr.shape), "kind": "dense", "dtype": str(arr.dtype),
                      "data": arr, "payload_bytes": arr.nbytes, "numel": int(arr.size)})
    return plans


def _header(plans: list[dict[str, Any]], spec: dict[str, Any] | None,
            attention: dict[str, dict[str, Any]] | None = None) -> bytes:
    tensors = []
    for p in plans:
        entry = {"name": p["name"], "shape": p["shape"], "kind": p["kind"]}
        if p["kind"] == "dense":
            entry["dtype"] = p.get("dtype", "float32")
        else:
            entry["entries"] = p["entries"]
            entry["ib"] = p["index_bits"]
            entry["il"] = p["index_lengths"].tolist()
            if p["kind"] == "shared":
                entry["wl"] = p["weight_lengths"].tolist()
        tensors.append(entry)
    doc = {"spec": spec, "tensors": tensors}
    if attention:  # pruned heads: the widths alone cannot tell heads from head dims
        doc["attention"] = attention
    text = json_text(doc, separators=(",", ":"))
    return zlib.compress(text.encode(), 9)


def model_storage(model: nn.Module, index_bits: int | str = 5, deployed: nn.Module | None = None) -> dict[str, Any]:
    """Per prunable layer and in total: bits per stored weight and index (before and after Huffman,
    the terms of the paper's Tables 2-3), ``compressed_bytes``, ``dense_bytes``,
    ``compression_ratio``; ``total.compressed_bytes`` is the file :func:`write_compressed` writes
    (less its model spec). ``index_bits``: the relative-index width, or ``"auto"`` per layer;
    ``deployed``: ``deployed_copy(model)`` when the caller already has it."""
    plans = _plan(model, index_bits, deployed)
    layers: dict[str, dict[str, Any]] = {}
    for p in plans:
        if "entries" not in p:
            continue
        e = max(1, p["entries"])
        layers[p["name"].removesuffix(".weight")] = {
            "format": p["kind"], "kept": p["nonzero"] / max(1, p["numel"]), "nonzero": p["nonzero"],
            "entries": p["entries"], "weight_bits": p["weight_bits"],
            "weight_bits_huffman": p["weight_stream_bits"] / e, "index_bits": p["index_bits"],
            "index_bits_huffman": p["index_stream_bits"] / e, "compressed_bytes": p["payload_bytes"],
            "dense_bytes": 4 * p["numel"], "compression_ratio": 4 * p["numel"] / max(1, p["payload_bytes"]),
        }
    payload = sum(p["payload_bytes"] for p in plans)
    dense = sum(4 * p["numel"] for p in plans if p.get("dtype", "float32").startswith("float"))
    total_bytes = len(MAGIC) + 4 + len(_header(plans, None)) + payload
    return {"total": {"compressed_bytes": total_bytes, "dense_bytes": dense,
                      "compression_ratio": dense / max(1, total_bytes)}, "layers": layers}


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    return np.packbits(bits).tobytes()


def write_compressed(model: nn.Module, path: str | Path, model_spec: dict[str, Any],
                     index_bits: int | str = 5) -> int:
    """Write the encoded model; returns the bytes written."""
    plans = _plan(model, index_bits)
    chunks = []
    for p in plans:
        if p["kind"] == "dense":
            chunks.append(np.ascontiguousarray(p["data"]).tobytes())
            continue
        if p["kind"] == "shared":
            chunks.append(p["codebook"].tobytes())
            chunks.append(_bits_to_bytes(encode(p["symbols"], p["weight_lengths"])))
        else:
            chunks.append(p["values"].tobytes())
        chunks.append(_bits_to_bytes(encode(p["stored_index"], p["index_lengths"])))
    header = _header(plans, model_spec, attention_state(model))
    data = MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return len(data)


def read_compressed(path: str | Path, *, trust_model_code: bool = False) -> nn.Module:
    """Decode a file written by :func:`write_compressed` into a working model (eval mode).

    The header's model spec is data: code it names (``import:``, ``transformers``) is built only with
    ``trust_model_code`` (:func:`compress.models.build_from_spec`), checked before any tensor is decoded.
    """
    raw = Path(path).read_bytes()
    if raw[:5] != MAGIC:
        raise UserError(f"{path}: not a Deep Compression file (bad magic)")
    (hlen,) = struct.unpack("<I", raw[5:9])
    head = json.loads(zlib.decompress(raw[9:9 + hlen]))
    if not isinstance(head, dict):
        raise UserError(f"{path}: not a Deep Compression file (its header is a {type(head).__name__}, not a mapping)")

    def build() -> nn.Module:
        return build_from_spec(head.get("spec"), str(path), trust_model_code=trust_model_code)

    with torch.device("meta"):  # no random initialisation of weights the file replaces (0.2 s at 25M)
        model = build()
    pos = 9 + hlen
    state: dict[str, torch.Tensor] = {}

    def take(n: int) -> bytes:
        nonlocal pos
        chunk = raw[pos:pos + n]
        pos += n
        return chunk

    data = np.frombuffer(raw, dtype=np.uint8)

    def decode_from(lengths: np.ndarray, count: int) -> np.ndarray:
        nonlocal pos
        symbols, used = decode_packed(data, lengths, count, bit_offset=8 * pos)
        pos += math.ceil(used / 8)
        return symbols

    for t in head["tensors"]:
        shape = tuple(t["shape"])
        numel = int(np.prod(shape)) if shape else 1
        if t["kind"] == "dense":
            dtype = np.dtype(t["dtype"])
            arr = np.frombuffer(take(numel * dtype.itemsize), dtype=dtype).reshape(shape)
            state[t["name"]] = torch.from_numpy(arr.copy())
            continue
        n = t["entries"]
        if t["kind"] == "shared":
            wl = np.array(t["wl"], dtype=np.int64)
            codebook = np.frombuffer(take(4 * (len(wl) - 1)), dtype=np.float32)
            symbols = decode_from(wl, n)
            values = np.append(codebook, np.float32(0))[symbols]
            filler = symbols == len(codebook)  # the symbol after the codebook is the filler zero
        else:
            values = np.frombuffer(take(4 * n), dtype=np.float32)
            filler = values == 0  # real entries are the non-zero weights; fillers store a zero
        stored = decode_from(np.array(t["il"], dtype=np.int64), n)
        flat = np.zeros(numel, dtype=np.float32)
        positions = absolute_positions(stored, filler)
        flat[positions] = values[~filler]
        state[t["name"]] = torch.from_numpy(flat.reshape(shape))
    restore_structure(model, state)
    restore_attention(model, head.get("attention"), str(path))
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # buffers the state_dict does not hold
        model = build()
        restore_structure(model, state)
        restore_attention(model, head.get("attention"), str(path))
        model.load_state_dict(state, strict=True)
    return model.eval()
