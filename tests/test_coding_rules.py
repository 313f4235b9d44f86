"""encoding/*, sharing/* and distill/losses.py: values worked out by hand (mutation testing: docs/mutants.md)."""

import numpy as np
import pytest
import torch
from torch import nn

from compress.encoding import model_storage, read_compressed, write_compressed
from compress.encoding.csr import absolute_positions, relative_indices
from compress.encoding.huffman import code_lengths, decode, decode_packed
from compress.models import build_model
from compress.pruning.masks import set_mask
from compress.sharing.kmeans import init_centroids, kmeans_1d

# --- relative indices (Deep Compression, section 2, Fig. 2) ---------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint64, np.float64])
def test_relative_indices_by_hand_for_any_numeric_positions(dtype):
    # 2-bit indices reach 4 positions. Gaps before 0, 1, 9, 30: 0, 0, 7, 20 -> 7 = one filler + 3,
    # 20 = five fillers + 0. Fillers store 3 (the largest value) and stand for 4 skipped positions.
    stored, filler = relative_indices(np.array([0, 1, 9, 30], dtype=dtype), 2)
    assert stored.tolist() == [0, 0, 3, 3, 3, 3, 3, 3, 3, 0]
    assert filler.tolist() == [False, False, True, False, True, True, True, True, True, False]
    assert stored.dtype == np.int64 and filler.dtype == bool


def test_absolute_positions_from_narrow_stored_values_and_integer_filler_flags():
    # stored values read back as uint8 (8-bit indices): 255 + 1 must not wrap to 0.
    # Steps 1, 256, 256, 1 -> positions 0, 256, 512, 513; the third entry is a filler.
    stored = np.array([0, 255, 255, 0], dtype=np.uint8)
    flags = np.array([0, 0, 1, 0], dtype=np.uint8)  # 0/1 flags, not bools
    assert absolute_positions(stored, flags).tolist() == [0, 256, 513]


# --- Huffman (Deep Compression, section 4) ---------------------------------------------------------


def test_equal_weights_merge_oldest_first_which_keeps_the_longest_code_short():
    # Weights 1, 1, 1, 3, 3. By hand, a merged node goes after the nodes of equal weight already
    # there (Schwartz 1964): {a,b}=2; {c,ab}=3; then d=3 and e=3 come before the new 3: {d,e}=6;
    # root {abc, de}. Depths: a, b 3; c 2; d, e 2. Merging {c,ab} first instead would give 4,4,3,2,1
    # (same total, 20 bits, but a 4-bit longest code and a decoding table twice the size).
    assert code_lengths(np.array([1, 1, 1, 3, 3])).tolist() == [3, 3, 2, 2, 2]


def test_decode_stops_at_the_end_of_the_bit_stream_not_of_the_byte():
    # lengths 1, 2, 2 -> codes 0, 10, 11. Bits "101": symbol 1, then "1" and the stream ends.
    # The byte's padding zeros must not complete it to "10".
    with pytest.raises(ValueError, match="ended early"):
        decode(np.array([1, 0, 1], dtype=np.uint8), np.array([1, 2, 2]), 2)
    assert decode(np.array([1, 0, 1, 1], dtype=np.uint8), np.array([1, 2, 2]), 2).tolist() == [1, 2]
    # a fixed-length code: 2 bits each, 3 bits hold one symbol only
    with pytest.raises(ValueError, match="ended early"):
        decode(np.array([1, 0, 1], dtype=np.uint8), np.array([2, 2, 2, 2]), 2)


def test_a_stream_cut_inside_its_last_codeword_is_refused():
    # 0 10 10 10 10: 9 bits, two bytes. Cut to the first byte, the last codeword starts at bit 7 and
    # its second bit is missing: it must not be read from beyond the data.
    lengths = np.array([1, 2, 2])
    packed = np.packbits([0, 1, 0, 1, 0, 1, 0, 1, 0])
    assert decode_packed(packed, lengths, 5)[0].tolist() == [0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="ended early"):
        decode_packed(packed[:1], lengths, 5)


# --- 1-D k-means (Deep Compression, section 3.2) ---------------------------------------------------


def test_density_init_of_16m_weights_takes_the_value_at_or_below_each_quantile():
    # From 16,000,000 weights on, torch.quantile is not used (its input limit is 2^24): the centroid
    # is the weight at floor(q * (n - 1)). For k = 3, q = 0.5: floor(7999999.5) = 7999999.
    w = torch.arange(16_000_000, dtype=torch.float64)
    assert init_centroids(w, 3, "density").tolist() == [0.0, 7_999_999.0, 15_999_999.0]


def test_kmeans_stops_after_30_lloyd_steps_by_default():
    # heavy-tailed weights (cubed normals) that Lloyd has not settled after 30 steps
    w = torch.randn(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) ** 3
    at_30, _ = kmeans_1d(w, 16, iters=30)
    assert not torch.equal(at_30, kmeans_1d(w, 16, iters=31)[0])  # still moving at step 31
    assert torch.equal(kmeans_1d(w, 16)[0], at_30)


# --- the Deep Compression file ---------------------------------------------------------------------


def test_a_fully_pruned_layer_costs_no_bytes_and_reads_back_as_zeros(tmp_path):
    spec = {"name": "mlp", "kwargs": {"hidden": [3], "input_shape": [1, 2, 2], "num_classes": 2}}
    torch.manual_seed(0)
    model = build_model(spec["name"], **spec["kwargs"]).eval()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    set_mask(first, torch.zeros_like(first.weight, dtype=torch.bool))
    name = next(n for n, m in model.named_modules() if m is first)
    layer = model_storage(model)["layers"][name]
    # no entries: no values, no indices, no Huffman streams; the ratio's denominator is floored at
    # one byte, so it reads as the layer's dense size, 3 x 4 weights x 4 bytes
    assert (layer["entries"], layer["compressed_bytes"], layer["dense_bytes"]) == (0, 0, 48)
    assert layer["compression_ratio"] == 48
    write_compressed(model, tmp_path / "m.dc", spec)
    back = read_compressed(tmp_path / "m.dc")
    assert torch.equal(dict(back.named_modules())[name].weight, torch.zeros(3, 4))
