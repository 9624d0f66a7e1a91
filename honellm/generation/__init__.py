"""The generation engine every part of Hone uses: evaluation, prompting, RL rollouts and serving.

    from honellm.generation import Generator, SamplingParams
    gen = Generator(model, tokenizer)                       # batch_size=16, backend="auto"
    outs = gen.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.7, seed=0), shared_prefix="auto")
    scores = gen.score_continuations(contexts, [" positive", " negative"] * n)
    for piece in gen.stream(prompt, SamplingParams()): ...

Files: `params` (what you ask and get), `engine` (the Generator: batching, prefix reuse, the decode loop),
`runners` (one forward over a batch with a KV cache), `sampling` (choosing tokens), `constrained` (grammar
masks: JSON schemas, Lark, regex, through llguidance), `text` (stop strings and streaming text), `vllm_backend`
(the optional GPU backend).
"""

from honellm.generation.engine import Generator, context_length, eos_token_ids
from honellm.generation.params import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    ContinuationScore,
    Grammar,
    SamplingParams,
)

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Completion",
    "ContinuationScore",
    "Generator",
    "Grammar",
    "SamplingParams",
    "context_length",
    "eos_token_ids",
]
