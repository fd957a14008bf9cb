"""The pre-quantized-baseline census (qeval.quant.detect) and sizes against the checkpoint as stored.

Per GGUF type the transformers converter accepts: a small GGUF file written with gguf-py (quantized by
gguf.quants, the K-quants by llama.cpp's ggml), its types counted back from the file, its tensors
dequantized and the grid test asked for their bits; the expected bits and block come from each type's
definition (llama.cpp's ggml-common.h), not from the detector. A plain float model and the same model
saved in bf16 get no banner; a bf16 checkpoint's sizes are against its own bytes, computed here from the
safetensors files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from qeval.quant.backends import ggml_lib
from qeval.quant.detect import banner, baseline_census, block_bits, grid_census, gguf_census, source_types, tensor_grid

# type -> (bits of its integer codes, weights per block that share one scale and offset)
GGUF_TYPES = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q8_0": (8, 32),
              "Q4_K": (4, 32), "Q6_K": (6, 16)}  # K-quants: the 256-weight super-block's sub-blocks
K_QUANTS = ("Q4_K", "Q6_K")


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    import gguf.quants

    from gguf import GGMLQuantizationType

    if type_name in K_QUANTS:  # gguf-py has no K-quant quantizer: llama.cpp's own, built on demand
        if not ggml_lib.available():
            pytest.skip(f"{type_name} needs llama.cpp's ggml library ({ggml_lib.SETUP_COMMAND})")
        return ggml_lib.quantize(w, type_name)
    return gguf.quants.quantize(w, GGMLQuantizationType[type_name])


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """A GGUF file holding each named float tensor in its type ("F32" stays float)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    wr = GGUFWriter(str(path), "llama")
    for name, (w, type_name) in tensors.items():
        if type_name == "F32":
            wr.add_tensor(name, w.astype(np.float32))
        else:
            wr.add_tensor(name, quantize(w, type_name), raw_dtype=GGMLQuantizationType[type_name])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def _weight(rows: int = 16, cols: int = 512, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("type_name", list(GGUF_TYPES))
def test_each_gguf_type_is_counted_and_its_grid_found(type_name, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (_weight(), type_name),
                                            "blk.0.ffn_down.weight": (_weight(seed=1), type_name),
                                            "output_norm.weight": (np.ones(512), "F32")})
    assert gguf_census(path) == {type_name: 2, "F32": 1}
    bits, block = GGUF_TYPES[type_name]
    for t in GGUFReader(str(path)).tensors:
        if t.tensor_type.name == type_name:
            found = tensor_grid(dequantize(t.data, t.tensor_type))
            assert found is not None and (found["bits"], found["block"]) == (bits, block), found
            assert found["fit"] == found["blocks"] == 16 * 512 // block


def test_block_bits_finds_planted_grids_and_rejects_floats():
    """Blocks of scale x integer + offset with 2..8-bit codes (random scale, offset, codes covering the
    range): exactly those bits; the same blocks with one value nudged by 1/pi of a step: off that grid
    (only a much finer one can hold them: 22/pi is 7.003 steps, so a 2-bit block reads as 7-bit); plain
    floats: no grid; a constant block: 1 bit."""
    rng = np.random.default_rng(3)
    for bits in range(2, 9):
        codes = rng.integers(0, 2 ** bits, size=(200, 32))
        codes[:, 0], codes[:, 1] = 0, 2 ** bits - 1  # the full range: the grid needs every bit
        scale = rng.uniform(1e-3, 1e-1, size=(200, 1))
        offset = rng.uniform(-1, 1, size=(200, 1))
        w = (codes * scale + offset).astype(np.float32)
        assert (block_bits(w, 32) == bits).all(), bits
        nudged = w.copy()
        nudged[:, 5] += (scale[:, 0] / np.pi).astype(np.float32)
        found = block_bits(nudged, 32)
        assert ((found == 0) | (found > bits)).all(), bits
    assert (block_bits(_weight(), 32) == 0).all()
    assert (block_bits(np.full((4, 32), 0.25, np.float32), 32) == 1).all()


def test_plain_float_model_gets_no_banner_in_float32_or_bf16(tiny_model_dir, tmp_path):
    census = grid_census(tiny_model_dir)
    assert census["tensors"] == 14 and census["gridded"] == 0
    assert banner(census) == "" and banner(baseline_census(tiny_model_dir, "f" * 64)) == ""
    bf16 = save_bf16(tiny_model_dir, tmp_path / "bf16")
    census = grid_census(bf16)
    assert census["tensors"] == 14 and census["gridded"] == 0 and banner(census) == ""


def test_a_gguf_converted_folder_banner_names_the_files_types(tmp_path):
    """A folder whose qeval-source.json names a GGUF file: the file's types, exact (read from the file
    when the conversion predates `gguf_types`, else as written then)."""
    path = write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (_weight(), "Q5_0"),
                                            "blk.0.ffn_up.weight": (_weight(seed=2), "Q8_0"),
                                            "blk.0.ffn_down.weight": (_weight(seed=3), "Q5_0"),
                                            "token_embd.weight": (_weight(seed=4), "F32")})
    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "qeval-source.json").write_text(json.dumps({"gguf": str(path)}))
    census = baseline_census(folder, "x" * 64)
    assert census == {"gguf": "m.gguf", "types": {"Q5_0": 2, "F32": 1, "Q8_0": 1}}
    text = banner(census, "mine")
    assert "already quantized (mine)" in text and "m.gguf" in text and "Q5_0 2, F32 1, Q8_0 1" in text
    (folder / "qeval-source.json").write_text(json.dumps({"gguf": "/gone.gguf", "gguf_types": {"F32": 3}}))
    assert source_types(folder) == {"gguf": "gone.gguf", "types": {"F32": 3}} and banner(baseline_census(folder, "")) == ""


def test_embedded_smollm2_file_census():
    """The embedded SmolLM2-135M Q4_1 file: its seven linear layers per block are Q4_1 in each of its 30
    blocks (the count from its config, not from the reader), and its token embedding Q8_0."""
    from qeval.models.load import EMBEDDED

    try:
        path = EMBEDDED.get("smollm2-135m")()
    except Exception as e:  # not installed
        pytest.skip(str(e))
    census = gguf_census(path)
    assert census["Q4_1"] == 7 * 30 and census["Q8_0"] == 1
    assert set(census) == {"Q4_1", "Q8_0", "F32"}


# ----------------------------------------------------------------------------- sizes against the checkpoint

def save_bf16(src: Path, dst: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _tensor_bytes(folder: Path) -> int:
    """What the safetensors files hold past their headers: each file's size less 8 and its header."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            total += f.stat().st_size - 8 - struct.unpack("<Q", fh.read(8))[0]
    return total


def test_bf16_checkpoint_sizes_are_against_its_bytes(tiny_model_dir, tmp_path, capsys):
    """A tiny model saved in bf16, run on CPU (float32 compute) at none and bnb-nf4: the records carry
    the checkpoint's dtype and bytes (= the files' tensor bytes = 2 bytes x parameters), the ratio is
    nf4's bytes over those, the float32 baseline is beside it, and the report says both."""
    import torch
    from kl_run import run_kl_and_report
    from qeval.stats.compare import memory_frame
    from transformers import AutoModelForCausalLM

    folder = save_bf16(tiny_model_dir, tmp_path / "bf16")
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).parameters())
    records, md, _ = run_kl_and_report(folder, "none,bnb-nf4", tmp_path, capsys)
    base, nf4 = records["none"], records["bnb-nf4"]
    assert base.compute_dtype == "float32" and base.footprint.checkpoint_dtype == "bfloat16"
    assert base.footprint.checkpoint_bytes == _tensor_bytes(folder) == 2 * params
    assert base.footprint.total_bytes > 1.9 * base.footprint.checkpoint_bytes  # the float32 copy in memory
    mem = memory_frame(list(records.values())).set_index("quant")
    assert mem.loc["bnb-nf4", "baseline_bytes"] == 2 * params
    assert mem.loc["bnb-nf4", "ratio_to_baseline"] == pytest.approx(nf4.footprint.total_bytes / (2 * params))
    assert mem.loc["bnb-nf4", "compute_baseline_bytes"] == base.footprint.total_bytes
    from qeval.report.fmt import fmt_num

    ratio = nf4.footprint.total_bytes / (2 * params)
    assert f"×{fmt_num(ratio, 3)} of the bfloat16 checkpoint" in md
    assert f"×{fmt_num(nf4.footprint.total_bytes / base.footprint.total_bytes, 3)} of the baseline in memory" in md
    assert "against the checkpoint as stored (bfloat16" in md and "up to 4x smaller than 16-bit" in md


def test_float32_checkpoint_and_old_records_keep_the_measured_baseline(tiny_model_dir):
    """Same dtype stored and computed: the ratio is against the measured baseline, as before; a record
    written before the checkpoint fields existed reads (fields absent, written back without them)."""
    from qeval.models.load import checkpoint_of
    from qeval.store.record import Footprint

    ck = checkpoint_of(tiny_model_dir)
    assert ck["checkpoint_dtype"] == "float32" and ck["checkpoint_bytes"] == _tensor_bytes(tiny_model_dir)
    assert ck["checkpoint_types"] == {}
    old = {"total_bytes": 10, "quantized_weight_bytes": 0, "quant_state_bytes": 0, "unquantized_bytes": 10,
           "theory_bytes": 10, "quantized_params": 0}
    fp = Footprint.from_json(old)
    assert fp.checkpoint_bytes == 0 and fp.checkpoint_dtype == "" and fp.to_json() == old
