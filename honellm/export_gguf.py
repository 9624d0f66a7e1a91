"""Export an artifact as GGUF for llama.cpp, Ollama and LM Studio, with an Ollama `Modelfile` beside it.

The adapter is merged first (`honellm.export`'s merged folder, in fp32), then the `gguf` package (llama.cpp's own
Python library) does the file format: `GGUFWriter` writes it, `get_tensor_name_map` names the tensors the way
llama.cpp's `convert_hf_to_gguf.py` does, `gguf.quants.quantize` quantises and `SpecialVocab` carries the merges,
special token ids and chat template. What this module adds is what the converter itself does for the llama family
(hyperparameter keys, the rotary q/k permutation, the tokenizer's token list and types, which tensors stay F32),
for the architectures listed in `ARCHITECTURES` only, so every file it writes is one llama.cpp loads.

Quantisations (`QUANTS`): the legacy block types through `gguf.quants.quantize`, and the k-quant mixtures
q4_k_m, q4_k_s, q5_k_m, q5_k_s and q6_k through `honellm.gguf_quants` (the `gguf` package reads k-quants but does
not write them), with the per-tensor types llama.cpp's `llama-quantize` picks (`k_quant_tensor_type`). Q2_K and
Q3_K mixtures are refused with the way to make them (llama.cpp's `llama-quantize`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from honellm.artifact import Artifact
from honellm.errors import HoneError


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers architecture maps to llama.cpp's: its arch name there and the q/k permutation."""

    gguf_arch: str  # general.architecture and the prefix of the hyperparameter keys
    permute_qk: bool  # llama.cpp's llama arch wants q/k rows interleaved for its rotary layout (convert_hf_to_gguf)


# transformers model_type -> llama.cpp architecture. Mistral is llama to llama.cpp (as in its converter).
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False),
}

# --quant -> (type of the large matrices, llama.cpp's file type). For the k-quant mixtures the type is llama.cpp's
# default for the file type, and `k_quant_tensor_type` says which tensors get another.
QUANTS: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"),
    "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"),
    "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"),
}
K_MIXTURES = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s")
# The k-quant mixtures Hone does not write (their Q2_K/Q3_K quantisers are not transcribed): llama-quantize's.
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l")
# llama.cpp's `tensor_type_fallback`: a row length that is not a multiple of the 256-value super-block takes a
# 32-block type of about the same size (F16 where the row does not split into 32-blocks either).
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Below 8 bits the embedding and output matrices stay Q8_0, as in the embedded model's own Q4_1 file: they are
# the most sensitive to rounding (llama-quantize keeps them at a higher type too).
_KEEP_Q8_0 = ("token_embd.weight", "output.weight")

# Pre-tokenizers llama.cpp knows by name, recognised from tokenizer.json (llama.cpp's converter hashes the tokens
# of a probe text instead; the structure says the same for the tokenizers of the supported architectures).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def check_quants(quants: list[str]) -> list[str]:
    """The quantisations asked for, lower-cased and checked (a clear error for the k-quants and unknown names)."""
    quants = [q.lower() for q in quants] or ["q8_0"]
    for quant in quants:
        if quant in K_QUANTS:
            raise HoneError(
                f"--quant {quant}: Hone writes the k-quants {', '.join(K_MIXTURES)}, not the 2- and 3-bit ones",
                where="--quant",
                fix=f"use one of {', '.join(QUANTS)}; or export f16 and run llama.cpp's "
                    f"`llama-quantize MODEL-f16.gguf MODEL-{quant}.gguf {quant.upper()}`")
        if quant not in QUANTS:
            raise HoneError(f"unknown quantisation {quant!r}", where="--quant", fix=f"use one of: {', '.join(QUANTS)}")
    if len(set(quants)) != len(quants):
        raise HoneError("a quantisation is named twice", where="--quant", fix="name each once")
    return quants


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def k_quant_tensor_type(quant: str, name: str, n_cols: int, n_layers: int, tied: bool) -> tuple[str, bool]:
    """The GGML type llama.cpp's `llama_tensor_get_type` gives the 2-D tensor `name` (GGUF naming) with rows of
    `n_cols` values in a `quant` file (one of `K_MIXTURES`), and whether that is a fallback for rows that do not
    split into its blocks.

    Transcribed for the llama-family architectures Hone exports (no Falcon, no experts, no fused qkv): the output
    matrix (or the token embedding when it is tied to it) is Q6_K, or Q8_0 if its rows are not a multiple of 256;
    attn_v and ffn_down are Q6_K on the `use_more_bits` layers for q4_k_m and q5_k_m; q4_k_s gives attn_v of
    layers 0-3 and ffn_down of the first eighth of the layers Q5_K; everything else is the file type's default.
    llama.cpp counts attn_v and ffn_down tensors in the order of its loader (by layer), so its counters are the
    layer numbers here.
    """
    import gguf

    qtype = QUANTS[quant][0]
    match = re.match(r"blk\.(\d+)\.", name)
    layer = int(match.group(1)) if match else -1
    more_bits = quant in ("q4_k_m", "q5_k_m") and layer >= 0 and _use_more_bits(layer, n_layers)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q8_0" if n_cols % gguf.QK_K else "Q6_K"
    elif "attn_v.weight" in name:
        if more_bits:
            qtype = "Q6_K"
        elif quant == "q4_k_s" and layer < 4:
            qtype = "Q5_K"
    elif "ffn_down" in name:
        if more_bits:
            qtype = "Q6_K"
        elif quant == "q4_k_s" and layer < n_layers // 8:
            qtype = "Q5_K"
    if n_cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == 0:
        return qtype, False
    qtype = _K_FALLBACK.get(qtype, "F16")  # llama.cpp has no fallback for Q8_0 and stops; Hone writes F16
    return (qtype if n_cols % 32 == 0 else "F16"), True


def supported_architecture(config: dict, *, where: str) -> GGUFArch:
    """The llama.cpp mapping of a model's config.json, or a clear error naming the supported architectures."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise HoneError(f"GGUF export does not support the {model_type!r} architecture yet", where=where,
                        fix=f"supported: {', '.join(ARCHITECTURES)}; export --format merged and convert it with "
                            "llama.cpp's convert_hf_to_gguf.py")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise HoneError(f"GGUF export does not support rope scaling {rope.get('rope_type')!r} yet", where=where,
                        fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def write_gguf(folder: str | Path, path: str | Path, quant: str, *, name: str | None = None) -> list[str]:
    """Write the merged transformers model in `folder` to the GGUF file `path` at `quant`.

    Returns the tensors that fell back to another type because their rows do not split into the quantisation's
    blocks, as "name (TYPE)".
    """
    import gguf
    import numpy as np
    from safetensors import safe_open

    from honellm.gguf_quants import quantize
    from honellm.progress import progress

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    arch = supported_architecture(config, where=str(folder))
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    tensor_type, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(path, arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or config.get("_name_or_path") or folder.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = _add_tokenizer(writer, folder, int(config["vocab_size"]))
    writer.add_vocab_size(n_vocab)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch.upper()], layers)
    fallbacks: list[str] = []
    tied = config.get("tie_word_embeddings", False)
    files = sorted(folder.glob("*.safetensors"))
    n_tensors = 0
    for weights in files:
        with safe_open(weights, framework="np") as f:
            n_tensors += len(f.keys())
    bar = progress(total=n_tensors, desc=f"GGUF {quant}", unit="tensor")
    for weights in files:
        with safe_open(weights, framework="np") as f:
            for hf_name in f.keys():  # noqa: SIM118 (a safetensors file is not iterable)
                bar.update(1)
                if tied and hf_name == "lm_head.weight":
                    continue
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise HoneError(f"GGUF export cannot name the tensor {hf_name!r}", where=str(weights),
                                    fix="report it; export --format merged and use llama.cpp's converter meanwhile")
                data = f.get_tensor(hf_name).astype(np.float32)
                if arch.permute_qk and re.search(r"\.self_attn\.q_proj\.", hf_name):
                    data = _permute(data, heads, heads)
                elif arch.permute_qk and re.search(r"\.self_attn\.k_proj\.", hf_name):
                    data = _permute(data, heads, kv_heads)
                qtype = gguf.GGMLQuantizationType[tensor_type]
                if data.ndim <= 1:
                    qtype = gguf.GGMLQuantizationType.F32  # norms and biases stay F32, as in llama.cpp's files
                elif quant in K_MIXTURES:
                    type_name, fell_back = k_quant_tensor_type(quant, gguf_name, data.shape[-1], layers, tied)
                    qtype = gguf.GGMLQuantizationType[type_name]
                    if fell_back:
                        fallbacks.append(f"{gguf_name} ({type_name})")
                elif gguf_name in _KEEP_Q8_0 and quant.startswith(("q4", "q5")):
                    qtype = gguf.GGMLQuantizationType.Q8_0
                try:
                    stored = quantize(data, qtype)
                except gguf.QuantError:
                    qtype = gguf.GGMLQuantizationType.F16
                    stored = quantize(data, qtype)
                    fallbacks.append(f"{gguf_name} (F16)")
                writer.add_tensor(gguf_name, stored, raw_dtype=qtype)
    bar.close()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return fallbacks


def _permute(weights, n_head: int, n_head_kv: int):
    """llama.cpp's `LlamaModel.permute`: interleave each head's two rotary halves (HF) into pairs (GGML)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_tokenizer(writer, folder: Path, n_vocab: int) -> int:
    """Byte-level BPE vocabulary, token types, merges, special ids and the chat template (llama.cpp's `gpt2`)."""
    import gguf
    from transformers import AutoTokenizer

    spec = json.loads((folder / "tokenizer.json").read_text())
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise HoneError("GGUF export supports byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2) only; this "
                        "model's tokenizer is a sentencepiece or other kind", where=str(folder / "tokenizer.json"),
                        fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    n_vocab = max(n_vocab, len(by_id))
    added = {t.content: t for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()} \
        if hasattr(tokenizer, "backend_tokenizer") else {}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")  # the rows a padded embedding has beyond the vocabulary (as in llama.cpp)
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec, folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and (template := _chat_template(folder)):
        writer.add_chat_template(template)  # older gguf packages do not read chat_template.jinja
    if "bos" not in special.add_special_token:
        bos = tokenizer.bos_token_id
        writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    return n_vocab


def _pre_tokenizer(spec: dict, folder: Path) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's and StarCoder's: one digit per token, then GPT-2's split
    if kinds[:1] == ["Split"] and kinds[1:] == ["ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
    raise HoneError(f"GGUF export does not recognise this tokenizer's pre-tokenizer ({', '.join(map(str, kinds))})",
                    where=str(folder / "tokenizer.json"),
                    fix="export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def _rope(config: dict) -> dict:
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _source_config(art: Artifact) -> dict:
    from honellm.models import resolve

    source = art.weights_dir if art.kind == "full" else resolve(art.base_model).path
    try:
        return json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise HoneError(f"cannot read the model's config.json ({e})", where=str(source)) from None


def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text()).get("chat_template") if config.exists() else None


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


# Ollama's ChatML template (the one its library uses for Qwen2 and SmolLM2); other templates are left to Ollama,
# which reads the chat template in the GGUF file and picks the matching one of its own.
_OLLAMA_CHATML = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                  '<|im_start|>assistant\n')


def modelfile_text(art: Artifact, gguf_name: str, chat_template: str | None, notes: list[str]) -> str:
    """An Ollama Modelfile: the GGUF, the artifact's system prompt, fixed demonstrations and sampling parameters."""
    program = art.program
    lines = [f"# Ollama Modelfile for {art.name}, exported by Hone ({art.manifest.method}).",
             f"# ollama create {_file_stem(art.name)} -f Modelfile"]
    if program.template:
        lines.append(f"# Write each user turn as the artifact was tuned: {program.template}")
    lines += ["", f"FROM ./{gguf_name}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{_quoted(_OLLAMA_CHATML)}"""')
    if program.system:
        lines.append(f'SYSTEM """{_quoted(program.system)}"""')
    for demo in program.demonstrations:
        lines.append(f'MESSAGE user """{_quoted(demo.query)}"""')
        lines.append(f'MESSAGE assistant """{_quoted(demo.answer)}"""')
    if program.selector is not None and program.selector.per_query:
        note = (f"the prompt program picks {program.selector.k} demonstrations per query ({program.selector.name}); "
                "a Modelfile cannot, so it carries none (Hone's `serve` applies the selection)")
        if note not in notes:
            notes.append(note)
    generation = ((art.manifest.task or {}).get("config") or {}).get("generation") or {}
    if "temperature" in generation:
        lines.append(f"PARAMETER temperature {generation['temperature']}")
    if "top_p" in generation:
        lines.append(f"PARAMETER top_p {generation['top_p']}")
    if generation.get("max_new_tokens"):
        lines.append(f"PARAMETER num_predict {generation['max_new_tokens']}")
    if chat_template and "<|im_end|>" in chat_template:
        lines.append('PARAMETER stop "<|im_end|>"')
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    if '"""' in text:
        raise HoneError('a prompt contains """, which an Ollama Modelfile cannot quote',
                        fix="remove the triple quote from the prompt program")
    return text
