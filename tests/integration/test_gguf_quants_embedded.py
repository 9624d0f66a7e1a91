"""The k-quant writers on the embedded model's real weights (SmolLM2-135M, dequantised from the Q4_1 GGUF it
ships as: values on a coarse grid, many ties) give the bytes ggml's own compiled quantiser gives."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from honellm.gguf_quants import QK_K, quantize

try:
    import libggml
except ImportError:
    libggml = None


@pytest.mark.skipif(libggml is None, reason="libggml-python (prebuilt ggml, a dev dependency) is not installed")
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_embedded_weights_quantise_as_ggml_does(name):
    from honellm.defaults import embedded_gguf_path
    from honellm.errors import MissingDependency

    from ..unit.test_gguf_quants import ggml_quantize_chunk

    try:
        path = embedded_gguf_path()
    except MissingDependency as err:
        pytest.skip(str(err))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    qtype = gguf.GGMLQuantizationType[name]
    for tensor_name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight", "blk.29.attn_v.weight"):
        tensor = tensors[tensor_name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1, QK_K)  # rows of 256
        assert np.array_equal(quantize(values, qtype), ggml_quantize_chunk(values, qtype)), tensor_name
