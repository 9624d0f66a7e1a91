"""The fused LoRA forward/backward (honellm.core.fused) against PEFT's own, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from honellm.core import fused

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(tiny_model_dir, **lora):
    from peft import LoraConfig, get_peft_model

    from honellm.models import load

    model, _ = load(tiny_model_dir, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; make the adapter do something
            torch.nn.init.normal_(param, std=0.05)
    return model


def _run(model, ids, autocast: bool = False):
    """Loss, input-embedding gradient and every trainable gradient of one forward and backward."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with context:
        logits = model(inputs_embeds=embeds).logits
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), embeds.grad.clone(), grads


def _count_fused_calls(monkeypatch) -> list:
    calls = []
    original = fused.LoraLinearFunction.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(fused.LoraLinearFunction, "apply", counting)
    return calls


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_matches_peft_in_fp32(tiny_model_dir, monkeypatch, use_rslora):
    model = _lora_model(tiny_model_dir, use_rslora=use_rslora)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    loss, grad_in, grads = _run(model, ids)
    calls = _count_fused_calls(monkeypatch)
    assert fused.install(model) == len(TARGETS) * model.config.num_hidden_layers
    fused_loss, fused_grad_in, fused_grads = _run(model, ids)
    assert len(calls) == len(TARGETS) * model.config.num_hidden_layers  # every adapted layer took the fused path
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_grad_in, grad_in, rtol=1e-4, atol=1e-6)
    assert fused_grads.keys() == grads.keys() and len(grads) == 2 * len(calls)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_matches_peft_under_bf16_autocast(tiny_model_dir, monkeypatch):
    """The recipes' setting: frozen weights in bf16, adapters in fp32, autocast; gradients come back in fp32.
    Every adapted layer is checked to take the fused path (a silent fallback to PEFT's forward would pass the
    comparison trivially)."""
    from honellm.training.precision import Precision

    model = _lora_model(tiny_model_dir)
    Precision.resolve("bf16", "cpu").cast_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    calls = _count_fused_calls(monkeypatch)
    loss, _, grads = _run(model, ids, autocast=True)
    assert calls == []  # the reference: PEFT's own forward
    assert fused.install(model) == len(TARGETS) * model.config.num_hidden_layers
    fused_loss, _, fused_grads = _run(model, ids, autocast=True)
    assert len(calls) == len(TARGETS) * model.config.num_hidden_layers  # every adapted layer took the fused path
    torch.testing.assert_close(fused_loss, loss, rtol=2e-2, atol=2e-2)  # both round activations to bf16
    for name, grad in grads.items():
        assert fused_grads[name].dtype == torch.float32
        scale = grad.abs().max().item() + 1e-6
        assert (fused_grads[name] - grad).abs().max().item() <= 0.05 * scale, name


def test_fused_forward_under_inference_mode_and_no_autocast(tiny_model_dir, monkeypatch):
    """The generation engine calls adapted layers in bf16 without autocast, under inference mode; each of them
    through the fused path (counted), its output in bf16."""
    model = _lora_model(tiny_model_dir).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    calls = _count_fused_calls(monkeypatch)
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        assert calls == []
        assert fused.install(model) == len(TARGETS) * model.config.num_hidden_layers
        got = model(input_ids=ids).logits
    assert len(calls) == len(TARGETS) * model.config.num_hidden_layers
    assert got.dtype == expected.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "merged"])
def test_fused_falls_back_to_peft_where_it_would_differ(tiny_model_dir, monkeypatch, case):
    model = _lora_model(tiny_model_dir, lora_dropout=0.5 if case == "dropout" else 0.0, use_dora=case == "dora")
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    calls = _count_fused_calls(monkeypatch)
    fused.install(model)
    if case == "disabled":
        with model.disable_adapter():
            model(input_ids=ids)
    elif case == "merged":
        model.merge_adapter()
        model(input_ids=ids)
    else:
        model(input_ids=ids)
    assert calls == []
    if case == "dropout":  # in eval mode dropout is the identity: the fused path is exact again
        model.eval()
        model(input_ids=ids)
        assert len(calls) == len(TARGETS) * model.config.num_hidden_layers


def test_install_keeps_the_layer_peft_and_uninstall_restores(tiny_model_dir, monkeypatch):
    model = _lora_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused.install(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fused.uninstall(model)
    calls = _count_fused_calls(monkeypatch)
    model(input_ids=torch.randint(0, model.config.vocab_size, (1, 5)))
    assert calls == []
    monkeypatch.setenv("HONE_FUSED_LORA", "0")
    assert fused.install(model) == 0


# ------------------------------------------------------------------------------------------------ sibling groups


def _group_inputs(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    outs, ranks, scalings = (6, 3, 3), (2, 3, 1), (2.0, 0.5, 1.7)
    x = torch.randn(2, 4, 5, dtype=dtype, requires_grad=True)
    weight = torch.randn(sum(outs), 5, dtype=dtype)
    b = torch.randn(sum(outs), dtype=dtype) if bias else None
    lora_as = [torch.randn(r, 5, dtype=dtype, requires_grad=True) for r in ranks]
    lora_bs = [torch.randn(o, r, dtype=dtype, requires_grad=True) for o, r in zip(outs, ranks, strict=True)]
    return x, weight, b, outs, scalings, lora_as, lora_bs


def test_group_function_gradients_pass_gradcheck():
    """Different ranks and scalings per member, with biases, in float64 against finite differences."""
    x, weight, bias, outs, scalings, lora_as, lora_bs = _group_inputs()
    assert torch.autograd.gradcheck(
        lambda x, *ab: fused.LoraGroupFunction.apply(x, weight, bias, outs, scalings, *ab).split(outs, dim=-1),
        (x, *lora_as, *lora_bs))


def test_group_function_equals_the_members_one_by_one():
    x, weight, bias, outs, scalings, lora_as, lora_bs = _group_inputs(torch.float32)
    grads = [torch.randn(2, 4, o) for o in outs]
    got = fused.LoraGroupFunction.apply(x, weight, bias, outs, scalings, *lora_as, *lora_bs).split(outs, dim=-1)
    got_grads = torch.autograd.grad(got, [x, *lora_as, *lora_bs], grads)
    expected = [fused.LoraLinearFunction.apply(x, w, b, a, lb, s) for w, b, a, lb, s in
                zip(weight.split(outs), bias.split(outs), lora_as, lora_bs, scalings, strict=True)]
    expected_grads = torch.autograd.grad(expected, [x, *lora_as, *lora_bs], grads)
    for g, e in zip([*got, *got_grads], [*expected, *expected_grads], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_install_groups_siblings_in_one_buffer_without_a_copy(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused.install(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # same weights, now views
    for layer in model.get_base_model().model.layers:
        for parent, names in ((layer.self_attn, fused.SIBLINGS[0]), (layer.mlp, fused.SIBLINGS[1])):
            weight, bias = parent._hone_groups[names]
            members = [getattr(parent, n).base_layer.weight for n in names]
            assert weight.shape[0] == sum(m.shape[0] for m in members) and bias is None
            assert members[0].data_ptr() == weight.data_ptr()
            assert all(m.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr() for m in members)
    attn = model.get_base_model().model.layers[0].self_attn
    kept = attn._hone_groups[fused.SIBLINGS[0]][0]
    fused.install(model)  # again: the groups are kept, not formed twice
    assert attn._hone_groups[fused.SIBLINGS[0]][0] is kept


def test_the_direct_forward_uses_the_groups_with_the_same_loss_and_gradients(tiny_model_dir, monkeypatch):
    from honellm.models import load_tokenizer
    from honellm.training.batching import collate, encode_conversation
    from honellm.training.logprobs import sft_loss

    model = _lora_model(tiny_model_dir).train()
    model.get_base_model().set_attn_implementation("eager")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = collate([encode_conversation(tokenizer, [{"role": "user", "content": t}], a, max_length=64)
                     for t, a in (("a warm film", "positive"), ("dull and long", "negative"))], tokenizer.pad_token_id)
    fused.install(model)
    calls = []
    original = fused.LoraGroupFunction.apply
    monkeypatch.setattr(fused.LoraGroupFunction, "apply", lambda *a: calls.append(1) or original(*a))

    def run():
        model.zero_grad(set_to_none=True)
        out = sft_loss(model, batch)
        out.total.backward()
        return out.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    assert len(calls) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up of every layer
    monkeypatch.setattr(fused, "group_forward", lambda *a, **k: None)
    single_loss, single_grads = run()
    assert len(calls) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(loss, single_loss, rtol=1e-6, atol=0)
    for name, grad in single_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item(), name


def test_a_group_falls_back_where_it_no_longer_applies(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    fused.install(model)
    attn = model.get_base_model().model.layers[0].self_attn
    h = torch.randn(1, 3, model.config.hidden_size)
    assert fused.group_forward(attn, fused.SIBLINGS[0], h) is not None
    attn.q_proj.enable_adapters(False)  # one member only: the members compute different things
    assert fused.group_forward(attn, fused.SIBLINGS[0], h) is None
    attn.q_proj.enable_adapters(True)
    attn.k_proj.base_layer.weight.data = attn.k_proj.base_layer.weight.data.clone()  # no longer a view
    assert fused.group_forward(attn, fused.SIBLINGS[0], h) is None
    mlp = model.get_base_model().model.layers[0].mlp
    assert fused.group_forward(mlp, fused.SIBLINGS[1], h) is not None
    fused.uninstall(model)
    assert fused.group_forward(mlp, fused.SIBLINGS[1], h) is None


def test_disabled_adapters_give_the_base_products_as_one(tiny_model_dir):
    """Under PEFT's `disable_adapter()` (a reference model) a group computes its members' base products in one: the
    base layers' outputs, bit for bit."""
    model = _lora_model(tiny_model_dir)
    fused.install(model)
    layer = model.get_base_model().model.layers[0]
    h = torch.randn(2, 3, model.config.hidden_size)
    with model.disable_adapter():
        for parent, names in ((layer.self_attn, fused.SIBLINGS[0]), (layer.mlp, fused.SIBLINGS[1])):
            parts = fused.group_forward(parent, names, h)
            expected = [getattr(parent, name).base_layer(h) for name in names]
            assert all(torch.equal(p, e) for p, e in zip(parts, expected, strict=True))
            assert torch.equal(fused.group_forward(parent, names, h, whole=True), torch.cat(expected, dim=-1))
    assert not torch.equal(fused.group_forward(layer.mlp, fused.SIBLINGS[1], h)[0],
                           layer.mlp.gate_proj.base_layer(h))  # enabled again: the adapter adds its part


def test_a_fresh_adapter_gives_the_references_log_probs_bit_for_bit_in_bf16(tiny_model_dir, monkeypatch):
    """The policy at step 0 (PEFT's B = 0) and the reference (adapters disabled) take the same arithmetic through the
    direct forward, so the KL between them starts at exactly 0 (bf16 rounding of two different computations would
    put it near 1e-3 on SmolLM2-135M)."""
    from honellm.models import load_tokenizer
    from honellm.training.batching import collate, encode_conversation
    from honellm.training.logprobs import token_logprobs
    from honellm.training.precision import Precision

    model = _lora_model(tiny_model_dir)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(param)
    model.get_base_model().set_attn_implementation("eager")
    Precision.resolve("bf16", "cpu").cast_model(model)
    fused.install(model)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = collate([encode_conversation(tokenizer, [{"role": "user", "content": t}], a, max_length=64)
                     for t, a in (("2 + 3 =", "5"), ("7 * 6 =", "42"), ("10 - 4 =", "6"))], tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy = token_logprobs(model, batch)
        grouped = []
        original = fused.group_forward
        monkeypatch.setattr(fused, "group_forward", lambda *a, **k: grouped.append(original(*a, **k)) or grouped[-1])
        with model.disable_adapter():
            reference = token_logprobs(model, batch)
    assert grouped and all(g is not None for g in grouped)  # the reference took the grouped products too
    assert policy.values.numel() > 0 and torch.equal(policy.values, reference.values)

