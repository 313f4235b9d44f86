"""encoding/*, sharing/* and distill/losses.py: values worked out by hand (mutation testing: docs/mutants/coding.md)."""

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from compress.encoding import model_storage, read_compressed, write_compressed
from compress.encoding.csr import absolute_positions, relative_indices
from compress.encoding.huffman import MAX_CODE_BITS, code_lengths, decode, decode_packed, encode
from compress.errors import UserError
from compress.models import build_model
from compress.models.vit import Attention
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



def test_nbits_bounds_a_stream_that_starts_inside_the_data():
    # one byte before the stream, then "1011": with nbits = 3 the second codeword (11) is cut
    data = np.concatenate([[0xFF], np.packbits([1, 0, 1, 1])]).astype(np.uint8)
    lengths = np.array([1, 2, 2])  # codes 0, 10, 11
    assert decode_packed(data, lengths, 2, bit_offset=8, nbits=4)[0].tolist() == [1, 2]
    with pytest.raises(ValueError, match="ended early"):
        decode_packed(data, lengths, 2, bit_offset=8, nbits=3)



def test_a_fixed_length_stream_longer_than_one_look_up_of_4m_symbols():
    # a 1-bit code (symbols 0 and 1, codes 0 and 1): each symbol is its bit
    n = (1 << 22) + 13
    packed = np.tile(np.array([0b10110010, 0b01101100], dtype=np.uint8), n // 16 + 1)
    got, used = decode_packed(packed, np.array([1, 1]), n)
    assert got.dtype == np.int64 and used == n
    assert np.array_equal(got, np.unpackbits(packed)[:n])


def test_a_window_that_is_no_codeword_of_an_incomplete_code_is_refused():
    # lengths 1, 2 give codes 0 and 10; "11" is no codeword. 0 | 11 | 10: the middle one is refused.
    lengths = np.array([1, 2, 0])
    assert decode_packed(np.packbits([0, 1, 0, 1, 0]), lengths, 3, nbits=5)[0].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="ended early"):
        decode_packed(np.packbits([0, 1, 1, 1, 0]), lengths, 3, nbits=5)


def _decode_bit_by_bit(bits: np.ndarray, words: dict[str, int], count: int) -> list[int]:
    out, word = [], ""
    for b in bits:
        word += str(int(b))
        if word in words:
            out.append(words[word])
            word = ""
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("bit_offset", [0, 5])
def test_a_code_that_never_falls_into_step_decodes_across_lanes(bit_offset):
    # Every codeword is 3 or 6 bits long: a walk started at the wrong phase (mod 3) never meets the
    # true one, so each lane's start must come from the chain of lane ends, never from a merge.
    from compress.encoding.huffman import LANE_BITS, canonical_codes, encode

    lengths = code_lengths(np.array([8] * 7 + [1] * 8))
    assert lengths.tolist() == [3] * 7 + [6] * 8
    rng = np.random.default_rng(0)
    symbols = rng.choice(15, size=5000, p=np.array([8] * 7 + [1] * 8) / 64)
    bits = encode(symbols, lengths)
    assert len(bits) > 3 * LANE_BITS and len(bits) % 3 == 0
    codes = canonical_codes(lengths)
    words = {format(int(c), f"0{int(n)}b"): s for s, (c, n) in enumerate(zip(codes, lengths, strict=True))}
    assert _decode_bit_by_bit(bits, words, len(symbols)) == symbols.tolist()  # the reference
    packed = np.packbits(np.concatenate([np.ones(bit_offset, dtype=np.uint8), bits]))
    got, used = decode_packed(packed, lengths, len(symbols), bit_offset=bit_offset)
    assert got.tolist() == symbols.tolist() and used == len(bits)


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
    back = read_compressed(tmp_path / "m.dc", trust_model_code=True)
    assert torch.equal(dict(back.named_modules())[name].weight, torch.zeros(3, 4))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2, bias=False)

    def forward(self, x):
        return self.fc(x)


class GainNet(TinyNet):
    """TinyNet with a buffer outside the state_dict, so reading it builds the model a second time."""

    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.full((2,), 3.0), persistent=False)


def test_a_spec_without_kwargs_of_a_model_with_a_buffer_outside_the_state_dict_reads_back_whole(tmp_path):
    torch.manual_seed(0)
    model = GainNet()
    write_compressed(model, tmp_path / "m.dc", {"name": "import:tests.test_coding_rules:GainNet"})
    back = read_compressed(tmp_path / "m.dc", trust_model_code=True)
    assert torch.equal(back.gain, torch.full((2,), 3.0)) and torch.equal(back.fc.weight, model.fc.weight)


def test_a_csr_weight_of_exactly_one_reads_back(tmp_path):
    # CSR values are fp32 and fillers store 0.0, so only a 0.0 marks a filler: 1.0 is a weight.
    # Positions 0, 3, 15 with 2-bit indices need two fillers between 3 and 15 (gap 11).
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight.view(-1)[[0, 3, 15]] = torch.tensor([1.0, 1.0, -0.5])
    layer = model_storage(model, index_bits=2)["layers"]["fc"]
    assert (layer["format"], layer["entries"]) == ("csr", 5)
    write_compressed(model, tmp_path / "m.dc", {"name": "import:tests.test_coding_rules:TinyNet"}, index_bits=2)
    assert torch.equal(read_compressed(tmp_path / "m.dc", trust_model_code=True).fc.weight, model.fc.weight)


class HeadNet(nn.Module):
    """One attention block over (B, N, dim) tokens and a classifier; ``gain``: a buffer outside the state_dict."""

    def __init__(self, dim: int = 4, heads: int = 2, gain: bool = False):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.fc = nn.Linear(dim, 2)
        if gain:
            self.register_buffer("gain", torch.full((2,), 2.0), persistent=False)

    def forward(self, x):
        return self.fc(self.attn(x).mean(1)) * getattr(self, "gain", 1.0)


class OtherNet(HeadNet):
    """HeadNet's tensors, its attention module under another name."""

    def __init__(self, dim: int = 4, heads: int = 2, gain: bool = False):
        super().__init__(dim, heads, gain)
        self.block = self.attn
        del self.attn

    def forward(self, x):
        return self.fc(self.block(x).mean(1))


def _regrouped_head_net(gain: bool) -> nn.Module:
    """8 wide, built with 4 heads of 2 and then read as 2 heads of 4 (what head pruning leaves:
    widths that cannot tell the two apart); the spec's kwargs differ from the defaults."""
    torch.manual_seed(0)
    model = HeadNet(dim=8, heads=4, gain=gain).eval()
    model.attn.num_heads, model.attn.head_dim, model.attn.scale = 2, 4, 4 ** -0.5
    return model


@pytest.mark.parametrize("gain", [False, True])
def test_attention_heads_and_model_kwargs_come_back_from_the_file(tmp_path, gain):
    model = _regrouped_head_net(gain)
    spec = {"name": "import:tests.test_coding_rules:HeadNet", "kwargs": {"dim": 8, "heads": 4, "gain": gain}}
    write_compressed(model, tmp_path / "m.dc", spec)
    back = read_compressed(tmp_path / "m.dc", trust_model_code=True)
    assert (back.attn.num_heads, back.attn.head_dim, back.attn.scale) == (2, 4, 0.5)
    assert back.fc.weight.shape == (2, 8)
    assert hasattr(back, "gain") == gain
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        # 4 heads of 2 is another function of the same weights: the file must say which
        assert not torch.allclose(back(x), _four_heads(model)(x))


def _four_heads(model: nn.Module) -> nn.Module:
    other = HeadNet(8, 4, hasattr(model, "gain")).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_a_file_whose_attention_module_the_spec_lacks_names_the_file(tmp_path):
    path = tmp_path / "m.dc"
    write_compressed(_regrouped_head_net(False), path, {"name": "import:tests.test_coding_rules:OtherNet",
                                                          "kwargs": {"dim": 8, "heads": 4}})
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: .*no attention module 'attn'"):
        read_compressed(path, trust_model_code=True)


def test_a_file_with_a_tensor_the_spec_lacks_or_of_an_unknown_model_is_refused(tmp_path):
    model = _regrouped_head_net(False)
    model.register_buffer("extra", torch.ones(1))  # in the file, not in the model the spec builds
    spec = {"name": "import:tests.test_coding_rules:HeadNet", "kwargs": {"dim": 8, "heads": 4}}
    write_compressed(model, tmp_path / "extra.dc", spec)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        read_compressed(tmp_path / "extra.dc", trust_model_code=True)
    write_compressed(model, tmp_path / "unknown.dc", {"name": "no_such_model"})
    with pytest.raises(UserError, match=rf"^{re.escape(str(tmp_path / 'unknown.dc'))}: model_spec\.name: unknown model "
                                        "'no_such_model'"):
        read_compressed(tmp_path / "unknown.dc")


@pytest.mark.parametrize("numel, fmt, nbytes", [(25, "csr", 99), (27, "dense", 108)])
def test_a_layer_is_stored_dense_when_csr_is_not_smaller(numel, fmt, nbytes):
    # One zero among n weights: n - 1 entries of 4 bytes; gaps 0 (n - 2 times) and 1 (once) take
    # one Huffman bit each, ceil((n - 1) / 8) bytes. n = 25: 96 + 3 = 99 < 100, CSR. n = 27:
    # 104 + 4 = 108 = 4 * 27, a tie, and dense (no index decoding) wins it.
    layer = nn.Linear(numel, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.weight[0, 20] = 0.0
    got = model_storage(nn.Sequential(layer))["layers"]["0"]
    assert (got["format"], got["compressed_bytes"]) == (fmt, nbytes)
    assert type(got["compressed_bytes"]) is int


def test_the_header_is_compact_json_at_zlib_level_9_with_the_layout_by_hand(tmp_path):
    # weights at 0, 1, 2 of 16 with 2-bit indices: three gaps of 0, no filler; one index symbol
    # used, so its code is 1 bit and the other three of the 2^2 symbols have none.
    model = TinyNet()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight.view(-1)[:3] = torch.tensor([0.5, -1.0, 2.0])
    spec = {"name": "import:tests.test_coding_rules:TinyNet"}
    size = write_compressed(model, tmp_path / "m.dc", spec, index_bits=2)
    raw = (tmp_path / "m.dc").read_bytes()
    (hlen,) = struct.unpack("<I", raw[5:9])
    assert raw[:5] == b"DCMP1" and raw[9:11] == b"\x78\xda"  # zlib, best compression
    text = zlib.decompress(raw[9:9 + hlen]).decode()
    layout = {"name": "fc.weight", "shape": [2, 8], "kind": "csr", "entries": 3, "ib": 2, "il": [1, 0, 0, 0]}
    assert text == json.dumps({"spec": spec, "tensors": [layout]}).replace(", ", ",").replace(": ", ":")
    assert raw[9:9 + hlen] == zlib.compress(text.encode(), 9)  # level 9 exactly (the 0xda flag covers 7-9)
    # then the streams: three fp32 values, and three 1-bit codes '0' in one byte
    assert raw[9 + hlen:] == np.array([0.5, -1.0, 2.0], dtype="<f4").tobytes() + b"\x00"
    assert size == len(raw)


def test_huffman_codes_are_bounded_in_length_and_stay_complete():
    counts = 2 ** np.arange(30)  # each count the sum of all smaller ones (+1): Huffman's deepest tree
    # unbounded: the two rarest symbols 29 bits, then 28, 27, ... 1 (worked out by merging by hand)
    assert code_lengths(counts, max_length=64).tolist() == [29] + list(range(29, 0, -1))
    lengths = code_lengths(counts)
    assert MAX_CODE_BITS == 20 and lengths.max() == 20
    assert (2.0 ** -lengths).sum() == 1.0  # Kraft: still a complete prefix code
    assert (np.diff(lengths) <= 0).all()  # a more frequent symbol never gets a longer code
    optimal = int((counts * np.r_[29, 29:0:-1]).sum())
    assert optimal < int((counts * lengths).sum()) < optimal * (1 + 1e-5)  # the bound costs < 10 bits per million
    symbols = np.repeat(np.arange(30), np.minimum(counts, 40))
    assert np.array_equal(decode(encode(symbols, lengths), lengths, len(symbols)), symbols)
    # counts 1, 1, 2, 100 want 3, 3, 2, 1 bits; bounded at 2 bits, halving (1, 1, 1, 50 ... 1, 1, 1, 2) ends at 2 each
    assert code_lengths(np.array([1, 1, 2, 100])).tolist() == [3, 3, 2, 1]
    assert code_lengths(np.array([1, 1, 2, 100]), max_length=2).tolist() == [2, 2, 2, 2]
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0] and code_lengths(np.zeros(3)).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="5 symbols do not fit codes of at most 2 bits"):
        code_lengths(np.ones(5), max_length=2)
    assert code_lengths(np.ones(4), max_length=2).tolist() == [2, 2, 2, 2]
    assert code_lengths(np.zeros(0, dtype=np.int64)).tolist() == []
    assert code_lengths(np.zeros(2, dtype=np.int64), max_length=0).tolist() == [0, 0]  # nothing to code: no bits


def test_bounded_huffman_halves_every_count_rounding_up_until_the_code_fits():
    # merged by hand (smallest first, ties to the older entry); each halving is (count + 1) // 2:
    # [1 28 5 2 124 11 267 5] -> depth 7 at s0 after one halving [1 14 3 1 62 6 134 3]; 6 after [1 7 2 1 31 3 67 2];
    # 5 after [1 4 1 1 16 2 34 1]; 5 after [1 2 1 1 8 1 17 1]; after [1 1 1 1 4 1 9 1]: s0+s1, s2+s3, s5+s7 -> 2, 2, 2;
    # {0,1}+{2,3} -> 4; {5,7}+s4 -> 6; 4+6 -> 10; s6+10 -> 19: depths 4 4 4 4 3 4 1 4
    counts = np.array([1, 28, 5, 2, 124, 11, 267, 5])
    assert code_lengths(counts, max_length=4).tolist() == [4, 4, 4, 4, 3, 4, 1, 4]
