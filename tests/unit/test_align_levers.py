"""The speed levers of the align recipes on the tiny models: `compile=true` (every recipe's decoder layers compiled
where the model is loaded, generation running them eagerly) and, for the DPO family, `cuda_graphs=true` (static
packed rows; its CUDA parts stood in on a CPU, the real ones in tests/unit/test_gpu.py).

Compiled here with a backend that runs dynamo's graphs as they are and counts them (seconds, where Inductor takes a
minute or more on 2 cores); the slow test compiles with Inductor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from honellm.generation import Generator, SamplingParams
from honellm.models import load
from honellm.reward.recipes import align_task
from honellm.reward.recipes.grpo import GRPOConfig, grpo
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_preference_task, make_tiny_reward_task
from honellm.training.setup import compile_layers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread

DPO = ["max_steps=2", "batch_size=4", "eval_every=1", "r=4", "lr=1e-2", "precision=fp32"]


class Counting:
    """A torch.compile backend running dynamo's graph as captured, counting the graphs made and their calls."""

    def __init__(self):
        self.graphs = self.calls = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)

        return run


@pytest.fixture
def counting(monkeypatch):
    """`nn.Module.compile` (what `compile_layers` calls per layer) with the counting backend instead of Inductor."""
    backend = Counting()
    real = torch.nn.Module.compile

    def compile_with(self, *args, mode=None, **kwargs):
        return real(self, *args, backend=backend, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with)
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def prefs_yaml(tiny_model_dir, tmp_path_factory):
    return make_tiny_preference_task(tmp_path_factory.mktemp("prefs"), tiny_model_dir)


def _steps(run, keys=("loss", "grad_norm")) -> list[float]:
    return [r[k] for r in read_metrics(run / "metrics.jsonl") if "loss" in r for k in keys]


def test_compile_true_trains_dpo_through_compiled_layers(prefs_yaml, tmp_path, counting):
    """`compile=true` was accepted by every align method and changed nothing: the layers are now compiled where the
    model is loaded, the reference pass and the steps run them, and the run trains as the eager one does."""
    eager = align_task(str(prefs_yaml), "dpo", DPO, out=str(tmp_path / "eager"))
    assert counting.calls == 0
    compiled = align_task(str(prefs_yaml), "dpo", [*DPO, "compile=true"], out=str(tmp_path / "compiled"))
    assert counting.graphs >= 1 and counting.calls > 0
    assert compiled.manifest.config["compile"] is True
    found = {name: _steps(tmp_path / name) for name in ("eager", "compiled")}
    assert len(found["eager"]) == 4 and found["compiled"] == pytest.approx(found["eager"], rel=1e-5)
    assert compiled.manifest.metrics["val_accuracy"] == eager.manifest.metrics["val_accuracy"]


@pytest.mark.parametrize("method", ["kto", "reward_model", "orpo"])
def test_compile_true_reaches_the_other_offline_recipes(prefs_yaml, tmp_path, counting, method):
    args = ["max_steps=2", "batch_size=4", "eval_every=0", "r=4", "lr=1e-2", "precision=fp32"]
    align_task(str(prefs_yaml), method, args, out=str(tmp_path / "eager"))
    assert counting.calls == 0
    align_task(str(prefs_yaml), method, [*args, "compile=true"], out=str(tmp_path / "compiled"))
    assert counting.calls > 0
    found = {name: _steps(tmp_path / name) for name in ("eager", "compiled")}
    assert len(found["eager"]) == 4 and found["compiled"] == pytest.approx(found["eager"], rel=1e-5)


def test_compile_true_trains_grpo_and_its_rollouts_decode_as_before(tiny_model_dir, tmp_path, counting):
    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir))
    settings = dict(max_steps=2, prompts_per_step=2, group_size=4, batch_size=8, guard_prompts=4, r=4,
                    max_new_tokens=6, precision="fp32", eval_every=0, lr=1e-3, kl_coef=0.1, dynamic_sampling=False)
    grpo(task, GRPOConfig(**settings), out=tmp_path / "eager")
    grpo(task, GRPOConfig(**settings, compile=True), out=tmp_path / "compiled")
    assert counting.calls > 0
    keys = ("reward", "loss", "grad_norm", "completion_length")
    found = {name: [r[k] for r in read_metrics(tmp_path / name / "metrics.jsonl") if r.get("kind") == "train"
                    for k in keys] for name in ("eager", "compiled")}
    assert len(found["eager"]) == 8 and found["compiled"] == pytest.approx(found["eager"], rel=1e-5, abs=1e-7)


def test_generation_runs_compiled_layers_eagerly(arch_dir, counting):
    """transformers' forward (the runner of architectures the lean one does not take) runs a compiled model's
    layers eagerly: compiled for training batches, each decoding step's new cache length would recompile them."""
    model, tokenizer = load(arch_dir("opt"), dtype="fp32", device="cpu")
    prompts = ["hello there", "a longer prompt than that one"]
    params = SamplingParams(max_new_tokens=6)
    before = [c.token_ids for c in Generator(model, tokenizer, batch_size=2).generate(prompts, params)]
    assert compile_layers(model) == model.config.num_hidden_layers
    generator = Generator(model, tokenizer, batch_size=2)
    assert generator.decoding == "transformers"
    assert [c.token_ids for c in generator.generate(prompts, params)] == before
    assert counting.graphs == counting.calls == 0
    model(**tokenizer(prompts[:1], return_tensors="pt"))  # outside generation the layers are compiled
    assert counting.calls > 0


@pytest.mark.slow  # Inductor on 2 cores: a minute or more (cached afterwards)
def test_dpo_with_inductor_compiled_layers_trains_to_the_eager_weights(prefs_yaml, tmp_path):
    args = ["max_steps=3", "batch_size=4", "eval_every=0", "r=4", "lr=1e-2", "precision=fp32"]
    eager = align_task(str(prefs_yaml), "dpo", args, out=str(tmp_path / "eager"))
    compiled = align_task(str(prefs_yaml), "dpo", [*args, "compile=true"], out=str(tmp_path / "compiled"))
    assert _steps(tmp_path / "compiled") == pytest.approx(_steps(tmp_path / "eager"), rel=1e-3)
    a = load_file(eager.path / "adapter" / "adapter_model.safetensors")
    b = load_file(compiled.path / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ cuda_graphs=true


def _stand_in_cuda_graphs(monkeypatch, recipe, packer):
    """`recipe`'s CUDA check and compile stood aside on a CPU (the gradient copy kept), graph iterations counted,
    and the shapes of the static rows `packer.pack` builds noted: (marks, compiles, shapes)."""
    from honellm.training import setup

    marks, owned, shapes = [], [], set()
    monkeypatch.setattr(recipe, "cuda_graphs_slots", lambda *a, sequences, **k: sequences + 1)
    monkeypatch.setattr(recipe, "compile_for_graphs", lambda model: (owned.append(1), setup.own_gradients(model)))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def pack_and_note(sequences, real=packer.pack, **static):
        batch = real(sequences, **static)
        if static.get("width"):
            shapes.add((tuple(batch.input_ids.shape), tuple(batch.cu_seqlens.shape), batch.max_seqlen))
        return batch

    monkeypatch.setattr(packer, "pack", pack_and_note)
    return marks, owned, shapes


def test_dpo_on_static_rows_trains_like_packed_rows(prefs_yaml, tmp_path, monkeypatch):
    """cuda_graphs=true's DPO loop on a CPU, its CUDA check and compile stood aside: every micro-batch one packed
    row as wide as the run's widest (a filler, empty answer slots), each marked as a new graph iteration, gradients
    made the parameters' own, validation eager; the same losses, gradient norms and validation as packed rows."""
    from honellm.reward.recipes import common, preference

    marks, owned, shapes = _stand_in_cuda_graphs(monkeypatch, preference, common)
    args = ["max_steps=2", "batch_size=2", "grad_accum=2", "eval_every=1", "r=4", "lr=1e-2", "precision=fp32",
            "packing=true"]
    packed = align_task(str(prefs_yaml), "dpo", args, out=str(tmp_path / "packed"))
    static = align_task(str(prefs_yaml), "dpo", [*args, "cuda_graphs=true"], out=str(tmp_path / "static"))
    start = next(r for r in read_metrics(tmp_path / "static" / "metrics.jsonl") if r.get("event") == "start")
    assert start["cuda_graphs"] is True and start["packing"] is True
    width = start["static_width"]
    assert shapes == {((1, width), (6,), width)}  # 2 pairs a micro-batch: 4 answers, the filler, 6 boundaries
    assert len(marks) == 4 and owned == [1]  # 2 steps of 2 micro-batches; compiled once
    found = {name: _steps(tmp_path / name) for name in ("packed", "static")}
    assert len(found["packed"]) == 4 and found["static"] == pytest.approx(found["packed"], rel=1e-5)
    assert static.manifest.metrics["val_accuracy"] == packed.manifest.metrics["val_accuracy"]


def test_the_widest_micro_batch_bounds_every_step_of_every_process(prefs_yaml, tmp_path):
    from transformers import AutoTokenizer

    from honellm.program import PromptProgram
    from honellm.reward.recipes.common import encode_pairs
    from honellm.reward.recipes.preference import _widest_micro_batch
    from honellm.training.batching import LengthGroupedBatches

    task = Task.load(prefs_yaml)
    tokenizer = AutoTokenizer.from_pretrained(task.config.model)
    train = encode_pairs(task, PromptProgram.from_task(task), tokenizer, "train", max_length=64)
    sampler = LengthGroupedBatches([p.length for p in train], 4, seed=0, slots=2)
    tokens, answers = _widest_micro_batch(train, sampler, 5, world=2, grad_accum=1)
    seen = [index for step in range(5) for rank in range(2)
            for index in sampler.micro_batches(step, rank=rank, world_size=2)]
    sizes = [sum(len(train[i].chosen) + len(train[i].rejected) for i in index) for index in seen]
    assert tokens == max(sizes) and answers == 2 * max(len(index) for index in seen) == 4


def test_cuda_graphs_say_where_they_cannot_run(prefs_yaml, tmp_path):
    from honellm.errors import HoneError

    with pytest.raises(HoneError, match="needs a CUDA GPU"):
        align_task(str(prefs_yaml), "dpo", ["max_steps=1", "cuda_graphs=true"], out=str(tmp_path / "dpo"))
    # DPO finds it out with the model loaded, once its run folder exists: the corrected command reuses that folder
    # without --force, since nothing was trained in it
    assert (tmp_path / "dpo" / "config.yaml").exists()
    align_task(str(prefs_yaml), "dpo", ["max_steps=1"], out=str(tmp_path / "dpo"))
    assert (tmp_path / "dpo" / "artifact").is_dir()
    assert [r["event"] for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if r.get("event") == "start"] == \
        ["start"]
    with pytest.raises(HoneError, match="KTO") as info:
        align_task(str(prefs_yaml), "kto", ["max_steps=1", "cuda_graphs=true"], out=str(tmp_path / "kto"))
    assert "compile=true" in info.value.fix
    assert not (tmp_path / "kto").exists()


VARIED = ("def varied(prompts, completions, completion_ids, **kw):\n"
          "    return [0.1 * (sum(ids) % 11) for ids in completion_ids]\n")


@pytest.mark.parametrize("method", ["grpo", "online_dpo"])
def test_online_updates_on_static_rows_train_like_packed_rows(tiny_model_dir, tmp_path, monkeypatch, method):
    """cuda_graphs=true's online loop on a CPU, its CUDA check and compile stood aside: every update's
    micro-batch one packed row of batch_size x the longest prompt + completion (online DPO: its pairs kept
    together), each marked as a new graph iteration; reference and held-out checks eager; the same rewards,
    losses and gradient norms as packed rows. PPO refuses it (its value head reads padded rows)."""
    from honellm.errors import HoneError
    from honellm.methods.catalog import method_config, run_method
    from honellm.reward import rollout
    from honellm.reward.recipes import policy_gradient

    task = Task.load(make_tiny_reward_task(tmp_path / "task", tiny_model_dir, reward_code=VARIED,
                                           rewards=[{"python": "rewards.py:varied"}]))
    marks, owned, shapes = _stand_in_cuda_graphs(monkeypatch, policy_gradient, rollout)
    group = ["prompts_per_step=2", "group_size=4"] if method == "grpo" else ["prompts_per_step=4", "group_size=2"]
    args = ["max_steps=2", *group, "batch_size=4", "guard_prompts=4", "r=4", "max_new_tokens=6", "precision=fp32",
            "eval_every=1", "lr=1e-3", "packing=true"]
    found = {}
    for name, extra in (("packed", []), ("static", ["cuda_graphs=true"])):
        spec, config = method_config(method, None, [*args, *extra], family="reward")
        run_method(task, spec, config, out=tmp_path / name)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        found[name] = [r[k] for r in rows if r.get("kind") == "train" for k in ("reward", "loss", "grad_norm")]
        start = next(r for r in rows if r.get("event") == "start")
        assert start["cuda_graphs"] is (name == "static")
    (shape,) = shapes
    assert shape[0] == (1, start["static_width"]) and shape[1] == (6,)  # 4 sequences, the filler, 6 boundaries
    # 2 steps of 8 completions in micro-batches of 4 (online DPO leaves tied pairs out)
    assert (len(marks) == 4 if method == "grpo" else 1 <= len(marks) <= 4) and owned == [1]
    assert len(found["packed"]) == 6 and max(found["packed"][2::3]) > 0  # the policy trained
    assert found["static"] == pytest.approx(found["packed"], rel=1e-5, abs=1e-7)
    spec, config = method_config("ppo", None, ["max_steps=1", "cuda_graphs=true", "prompts_per_step=2", "r=4"],
                                 family="reward")
    with pytest.raises(HoneError, match="value head"):
        run_method(task, spec, config, out=tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()  # refused before its run folder was made
