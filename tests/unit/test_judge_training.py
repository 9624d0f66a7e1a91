"""The judge recipe (`hone align TASK --method judge`): judge examples in both orders with the loss on the letter
only, a few steps that make a tiny model agree with the labels, the artifact's trained prompt read back by
`Judge.load` (explicit fields win), the prompt not doubled, calibration pairs named by spec, bad input refused."""

from __future__ import annotations

import json
import random

import pytest

from honellm.errors import HoneError
from honellm.evaluation.evaluate import evaluate
from honellm.evaluation.judges import (
    Judge,
    JudgeConfig,
    LocalBackend,
    calibrate,
    calibration_pairs,
    resolve_judge_model,
)
from honellm.methods.catalog import method_config
from honellm.reward.recipes import align_task
from honellm.reward.recipes.judge import judge_examples
from honellm.runs import read_metrics
from honellm.task import Task
from honellm.testing import make_tiny_preference_task, make_tiny_task
from honellm.training.batching import IGNORE, collate

pytestmark = pytest.mark.usefixtures("one_thread")

# A short prompt keeps the tiny model's sequences short (its tokenizer spells the default prompt in ~200 tokens).
SHORT = "{prompt}\nA: {a}\nB: {b}"
SYSTEM = "Pick the better answer."


def _judge(tiny_model, **fields) -> Judge:
    model, tokenizer = tiny_model
    return Judge(JudgeConfig(model="tiny", **fields), LocalBackend("tiny", model=model, tokenizer=tokenizer))


def test_each_pair_gives_both_orders_with_the_loss_on_the_letter_only(tiny_model):
    judge = _judge(tiny_model)
    backend, tokenizer = judge.backend, tiny_model[1]
    pairs = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "seven"},
             {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}]
    examples = judge_examples(judge, pairs, max_length=1024)
    a, b = backend.option_ids(["A", "B"])
    assert [e.labels[-1] for e in examples] == [a, b, a, b]
    for example, (pair, chosen_first) in zip(examples, [(p, o) for p in pairs for o in (True, False)], strict=True):
        shown = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
        conversation = judge.pairwise_conversations([pair["prompt"]], [shown[0]], [shown[1]])[0]
        # exactly the tokens the judge reads its verdict after, then the letter
        assert example.input_ids[:-1] == backend.encode(conversation) and not example.truncated
        assert tokenizer.decode([example.input_ids[-1]]) == ("A" if chosen_first else "B")
    batch = collate(examples, tokenizer.pad_token_id)
    labelled = batch.labels != IGNORE
    assert labelled.sum(dim=1).tolist() == [1, 1, 1, 1] and batch.num_loss_tokens == 4
    lengths = batch.attention_mask.sum(dim=1)
    for row in range(4):  # the one labelled position is the row's last real token: the letter
        assert labelled[row].nonzero().item() == lengths[row] - 1

    one_order = judge_examples(judge, pairs * 4, max_length=1024, swap=False, seed=1)
    assert len(one_order) == 8 and {e.labels[-1] for e in one_order} == {a, b}
    for example in one_order:  # the letter names the position of the chosen answer
        text = tokenizer.decode(example.input_ids[:-1])
        first = text.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        assert (first in ("5", "hi")) == (example.labels[-1] == a)

    cut = judge_examples(judge, pairs[:1], max_length=32)
    assert all(len(e) == 32 and e.truncated and e.labels[:-1] == [IGNORE] * 31 for e in cut)


def _marker_task(folder, model_dir) -> str:
    """Pairs where a marker word decides: the chosen answer says "good" or "great", or the rejected one says "bad"
    or "awful". A tiny model learns it in a hundred steps; untrained, its verdicts follow whatever random
    preferences its weights give each marker, so it agrees on some kinds of pairs and not others."""
    rng = random.Random(0)
    words = ["warm", "dull", "quick", "lazy", "funny", "long"]
    folder.mkdir(parents=True)
    for split, n in (("train", 32), ("validation", 16)):
        rows = []
        for i in range(n):
            w, kind = rng.choice(words), i % 4
            chosen, rejected = ((f"{['good', 'great'][kind]} {w}", f"{w} film") if kind < 2 else
                                (f"{w} film", f"{['bad', 'awful'][kind - 2]} {w}"))
            rows.append({"prompt": f"Review: a {rng.choice(words)} film", "chosen": chosen, "rejected": rejected})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "task.yaml").write_text(f"name: markers\nmodel: {model_dir}\n"
                                      "data: {train: train.jsonl, validation: validation.jsonl}\n")
    return str(folder / "task.yaml")


def test_a_judge_trained_a_few_steps_agrees_more_and_loads_with_its_prompt(tiny_model_dir, tmp_path):
    task_yaml = _marker_task(tmp_path / "task", tiny_model_dir)
    validation = [{"prompt": p.prompt[0]["content"], "chosen": p.chosen, "rejected": p.rejected}
                  for p in Task.load(task_yaml).pairs("validation")]
    before = calibrate(Judge.load({"model": str(tiny_model_dir), "system": SYSTEM, "pairwise_prompt": SHORT}),
                       validation)
    out = tmp_path / "run"
    # Full fine-tuning: a LoRA cannot raise the tiny model's logits (its tied embeddings are tiny) fast enough for
    # a test; the recipe is the same, and the other tests here train LoRAs.
    art = align_task(task_yaml, "judge", ["max_steps=100", "batch_size=8", "eval_every=50", "lr=3e-3",
                                          "warmup_ratio=0", "adapter=full", f"system={SYSTEM}",
                                          f"pairwise_prompt={SHORT}"], out=str(out))

    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [50, 100]
    assert all({"val_agreement", "val_position_bias", "val_first_position_rate", "val_loss"} <= set(r) for r in evals)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 100 and steps[-1]["loss"] < steps[0]["loss"]
    metrics = art.manifest.metrics
    assert metrics["val_agreement"] > before.agreement
    assert metrics["val_agreement"] == max(r["val_agreement"] for r in evals)  # the best evaluation is kept

    # the manifest's judge block: the prompt it was trained with and its calibration
    manifest = json.loads((out / "artifact" / "hone.json").read_text())
    block = manifest["judge"]
    assert block["pairwise_prompt"] == SHORT and block["system"] == SYSTEM and block["mode"] == "pairwise"
    assert block["calibration"]["agreement"] == metrics["val_agreement"] and block["calibration"]["pairs"] == 16
    assert art.program.system == SYSTEM and (out / "artifact" / "model").is_dir()

    # Judge.load(artifact) asks with the trained prompt, and agrees as the recipe measured
    loaded = Judge.load(str(out / "artifact"))
    assert loaded.config.pairwise_prompt == SHORT and loaded.config.system == SYSTEM
    after = calibrate(loaded, validation)
    assert after.agreement > before.agreement
    # the prompt is not doubled: the judge's system turn comes once (the artifact's program is not applied too)
    conversation = loaded.pairwise_conversations(["q"], ["x"], ["y"])[0]
    assert loaded.backend.tokenizer.decode(loaded.backend.encode(conversation)).count(SYSTEM) == 1
    # served (`hone serve ARTIFACT`, an endpoint judge): the program's system message replaces the request's
    served = art.program.chat_messages(conversation)
    assert [m["role"] for m in served] == ["system", "user"] and served[0]["content"] == SYSTEM

    # fields the user's judge config sets win over the trained ones; the others stay trained
    explicit = Judge.load({"model": str(out / "artifact"), "system": "Be fair.", "rubric": "politeness"})
    assert explicit.config.system == "Be fair." and explicit.config.rubric == "politeness"
    assert explicit.config.pairwise_prompt == SHORT


def test_a_run_without_evaluations_calibrates_its_final_weights(tiny_model_dir, tmp_path):
    task_yaml = make_tiny_preference_task(tmp_path / "task", tiny_model_dir, n_train=8, n_validation=4)
    out = tmp_path / "run"
    art = align_task(str(task_yaml), "judge", ["max_steps=2", "batch_size=4", "eval_every=0", "r=4",
                                               f"pairwise_prompt={SHORT}", "swap=false"], out=str(out))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2]
    assert art.manifest.metrics["val_agreement"] == evals[0]["val_agreement"]
    start = next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "start")
    assert start["examples"] == 8 and start["pairs"] == 8  # one order per pair without swap


def test_bad_input_is_refused_before_training(tiny_model_dir, tmp_path):
    sft_task = make_tiny_task(tmp_path / "sft", tiny_model_dir)
    with pytest.raises(HoneError, match="judge trains on preference data"):
        align_task(str(sft_task), "judge", ["max_steps=1"], out=str(tmp_path / "run"))
    with pytest.raises(HoneError, match="pairwise_prompt must show the judge"):
        method_config("judge", None, ["pairwise_prompt=Which is better, {a}?"])
    with pytest.raises(HoneError, match="pairwise_prompt"):
        method_config("judge", None, ["pairwise_prompt={prompt} {a} {b} {other}"])


def test_calibration_pairs_from_a_file_builtin_data_or_a_task_split(tiny_model_dir, tmp_path):
    builtin = calibration_pairs("builtin:support_prefs/validation", limit=5)
    assert len(builtin) == 5 and all(isinstance(p["prompt"], str) and p["chosen"] != p["rejected"] for p in builtin)
    assert calibration_pairs("support_prefs@validation", limit=5) == [
        {k: p[k] for k in ("prompt", "chosen", "rejected")} for p in builtin]
    task_yaml = make_tiny_preference_task(tmp_path / "prefs", tiny_model_dir, n_validation=4)
    from_task = calibration_pairs("task.yaml@validation", base_dir=task_yaml.parent)
    assert len(from_task) == 4 and from_task[0]["prompt"].startswith("Review: ")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(builtin[0]) + "\n")
    assert calibration_pairs("pairs.jsonl", base_dir=tmp_path) == [builtin[0]]
    with pytest.raises(HoneError, match="unknown built-in data"):
        calibration_pairs("builtin:support_prefs/dev")
    with pytest.raises(HoneError, match="not preference pairs"):
        calibration_pairs("builtin:intents/validation")


def test_a_relative_judge_folder_resolves_from_the_task_folder(tiny_model_dir, tmp_path):
    (tmp_path / "judges" / "mine").mkdir(parents=True)
    assert resolve_judge_model("judges/mine", tmp_path) == str((tmp_path / "judges" / "mine").resolve())
    assert resolve_judge_model("smollm2-135m-instruct", tmp_path) == "smollm2-135m-instruct"
    with pytest.raises(HoneError, match="train one first"):
        resolve_judge_model("../runs/judge/artifact", tmp_path)


def test_judge_win_rate_calibrates_its_judge_first(tiny_model_dir, tmp_path):
    task_file = make_tiny_task(tmp_path / "task", tiny_model_dir, n_validation=4)
    common = ["metric=judge_win_rate", "choices=null", f"judge.model={tiny_model_dir}",
              "generation.max_new_tokens=2", "judge.calibration=builtin:support_prefs/validation",
              "judge.calibration_limit=4"]
    refused = Task.load(task_file, [*common, "judge.min_agreement=1.0", "judge.max_position_bias=0.0"])
    with pytest.raises(HoneError, match="failed calibration on 4 pairs"):
        evaluate(str(tiny_model_dir), refused, "validation", progress=False)
    forced = Task.load(task_file, [*common, "judge.min_agreement=1.0", "judge.force=true"])
    result = evaluate(str(tiny_model_dir), forced, "validation", progress=False)
    assert result.metric == "judge_win_rate" and result.n == 4
    assert result.extras["judge_calibration_pairs"] == 4 and 0 <= result.extras["judge_agreement"] <= 1
    assert 0 <= result.extras["judge_position_bias"] <= 1


def test_the_local_judge_reads_the_last_logits_only_and_the_same_numbers(tiny_model):
    judge = _judge(tiny_model)
    assert judge.backend._keeps_logits
    conversations = judge.pairwise_conversations(["What is 2 + 3?", "Say hi."], ["5", "hi there"], ["seven", "no"])
    fast = judge.backend.option_logprobs(conversations, ["A", "B"])
    judge.backend._keeps_logits = False  # every position's logits, the last one read
    full = judge.backend.option_logprobs(conversations, ["A", "B"])
    assert fast == pytest.approx(full, abs=1e-5)


def test_the_support_replies_example_is_an_open_ended_task_judged_against_the_chosen_reply():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "support_replies.yaml"
    task = Task.load(example)
    assert task.format == "fields" and task.kind == "sft" and task.metric == "judge_win_rate"
    record = task.split("train")[0]
    assert task.messages(record) == [{"role": "user", "content": record["prompt"]}]  # SFT on prompt -> chosen
    assert task.target(record) == record["chosen"]
    assert {s: len(task.split(s)) for s in ("train", "validation", "test")} == {"train": 300, "validation": 100,
                                                                                "test": 100}
    judge = task.config.judge
    pairs = calibration_pairs(judge["calibration"], base_dir=task.base_dir, limit=judge["calibration_limit"])
    assert len(pairs) == 100 and pairs[0]["chosen"] == task.split("test")[0]["chosen"]
    assert judge["model"].startswith("../runs/")  # the judge trained with --out runs/support-judge


def test_resume_ends_at_the_same_weights(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    task_yaml = make_tiny_preference_task(tmp_path / "task", tiny_model_dir, n_train=8, n_validation=4)
    args = ["max_steps=4", "save_every=2", "eval_every=2", "batch_size=4", "lr=1e-2", "r=4", "precision=fp32",
            "select_best=false", f"pairwise_prompt={SHORT}"]
    out = tmp_path / "run"
    align_task(str(task_yaml), "judge", args, out=str(out))
    straight = load_file(next((out / "artifact" / "adapter").glob("*.safetensors")))
    # Pretend the run stopped after the checkpoint of step 2, then resume it.
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    shutil.rmtree(out / "artifact")
    art = align_task(str(task_yaml), "judge", args, out=str(out), resume=True)
    resumed = load_file(next((out / "artifact" / "adapter").glob("*.safetensors")))
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert next(r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "resume")["step"] == 2
    assert art.manifest.metrics["selected_step"] == 4 and "val_agreement" in art.manifest.metrics
    assert json.loads((out / "artifact" / "hone.json").read_text())["judge"]["pairwise_prompt"] == SHORT
