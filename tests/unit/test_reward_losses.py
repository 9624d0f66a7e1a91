"""Reward losses against TRL 1.16 on the same fixed tensors, plus hand-computed values, gradients and shapes.

The oracles call TRL's own loss code wherever TRL has it in a callable form: the trainers' loss methods are called
unbound on a `SimpleNamespace` that carries only the attributes the method reads, with a stand-in "model" whose
per-token log-probs are fixed numbers (TRL's fused LM head returns per-token `log_probs`; ours come from a table).
Where TRL 1.16 has no callable code (advantages live inside the 400-line rollout method; PPO is not in 1.16 at
all) the test replays TRL's lines with a comment naming the file.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from honellm.errors import HoneError
from honellm.reward import losses as L

trl = pytest.importorskip("trl")

ATOL = 1e-5


class FakeAccelerator:
    """One CPU process: gathers and reductions are identities."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def unwrap_model(self, model):
        return model


def trainer_namespace(**attributes) -> SimpleNamespace:
    """The attributes every TRL loss method reads, plus the ones given."""
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=FakeAccelerator(),
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**(base | attributes))


class TableModel(torch.nn.Module):
    """A causal LM stand-in with TRL's fused head output: `log p(token v) = table[v]` wherever labels are set."""

    def __init__(self, vocab: int = 40, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(-0.1 - 3 * torch.rand(vocab, generator=g))

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=False, **_):
        shifted = labels[:, 1:]
        mask = shifted != -100
        log_probs = self.table[shifted.clamp(min=0)] * mask
        zeros = torch.zeros(mask.shape)
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=mask & False, aux_loss=None
        )

    def summed_logps(self, input_ids, completion_mask):
        """What Hone's recipe computes: completion log-probs summed per sequence, and completion lengths."""
        per_token = self.table[input_ids[:, 1:]] * completion_mask[:, 1:]
        return per_token.sum(-1), completion_mask.sum(-1).float()


def make_sequences(n: int, length: int = 9, seed: int = 0, vocab: int = 40):
    """Random ids; each row a prompt of 2-4 tokens, a completion of 1-5 tokens, then right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (n, length), generator=g)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    completion_mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        completion = int(torch.randint(1, 6, (1,), generator=g))
        attention_mask[i, : prompt + completion] = 1
        completion_mask[i, prompt : prompt + completion] = 1
    input_ids = input_ids * attention_mask
    return input_ids, attention_mask, completion_mask


@pytest.fixture
def pair_batch():
    """4 preference pairs as TRL's DPO collator lays them out: chosen rows, then rejected rows."""
    model = TableModel()
    input_ids, attention_mask, completion_mask = make_sequences(8, seed=1)
    g = torch.Generator().manual_seed(2)
    ref = -0.1 - 3 * torch.rand(8, generator=g) * completion_mask.sum(-1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:4],
        "ref_rejected_logps": ref[4:],
    }
    logps, lengths = model.summed_logps(input_ids, completion_mask)
    logps = logps.detach()
    ours = L.PreferenceLogps(
        chosen=logps[:4],
        rejected=logps[4:],
        chosen_lengths=lengths[:4],
        rejected_lengths=lengths[4:],
        ref_chosen=ref[:4],
        ref_rejected=ref[4:],
    )
    return model, inputs, ours


def trl_dpo(model, inputs, loss_type: str, beta: float):
    """TRL `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) on fixed log-probs; returns (loss, metrics)."""
    from trl import DPOTrainer

    t = trainer_namespace(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    loss = DPOTrainer._compute_loss(t, model, inputs, False)
    return loss, {k: v[-1] for k, v in t._metrics["train"].items()}


def assert_metrics(ours: dict, theirs: dict, keys: list[str]):
    for key in keys:
        assert float(ours[key]) == pytest.approx(float(theirs[key]), abs=ATOL), key


PAIR_KEYS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]


# ---------------------------------------------------------------------------------------------------------------
# Reward model


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(with_margin, center):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    margin = torch.rand(6, generator=g) if with_margin else None
    inputs = {"input_ids": torch.ones(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3)}
    if with_margin:
        inputs["margin"] = margin
    t = trainer_namespace(args=SimpleNamespace(center_rewards_coefficient=center))
    model = lambda **_: SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))  # noqa: E731
    expected = RewardTrainer.compute_loss(t, model, inputs)
    loss, metrics = L.bradley_terry_loss(chosen, rejected, margin, center_coefficient=center)
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    assert metrics["accuracy"].item() == pytest.approx(t._metrics["train"]["accuracy"][0])
    assert metrics["margin"].item() == pytest.approx(t._metrics["train"]["margin"][0], abs=ATOL)
    assert metrics["mean_reward"].item() == pytest.approx(t._metrics["train"]["mean_reward"][0], abs=ATOL)


def test_bradley_terry_by_hand_and_gradient():
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 1.0])
    loss, metrics = L.bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected)
    assert metrics["accuracy"].item() == 0.5
    loss.backward()
    assert (chosen.grad < 0).all()  # raising the chosen score lowers the loss


# ---------------------------------------------------------------------------------------------------------------
# Offline preference losses


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(pair_batch, beta):
    model, inputs, ours = pair_batch
    expected, trl_metrics = trl_dpo(model, inputs, "sigmoid", beta)
    loss, metrics = L.dpo_loss(ours.chosen, ours.rejected, ours.ref_chosen, ours.ref_rejected, beta)
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    assert_metrics(metrics, trl_metrics, PAIR_KEYS)


def test_ipo_matches_trl(pair_batch):
    model, inputs, ours = pair_batch
    expected, trl_metrics = trl_dpo(model, inputs, "ipo", 0.1)
    loss, metrics = L.ipo_loss(
        ours.chosen,
        ours.rejected,
        ours.ref_chosen,
        ours.ref_rejected,
        0.1,
        chosen_lengths=ours.chosen_lengths,
        rejected_lengths=ours.rejected_lengths,
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_metrics(metrics, trl_metrics, PAIR_KEYS)


def test_gradients_of_the_policy_flow_through_trl_and_ours_alike(pair_batch):
    """Same loss value is not enough: the gradient w.r.t. the (table) policy must match TRL's too."""
    model, inputs, _ = pair_batch
    expected, _ = trl_dpo(model, inputs, "sigmoid", 0.1)
    (trl_grad,) = torch.autograd.grad(expected, model.table)
    logps, _ = model.summed_logps(inputs["input_ids"], inputs["completion_mask"])
    loss, _ = L.dpo_loss(logps[:4], logps[4:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], 0.1)
    (grad,) = torch.autograd.grad(loss, model.table)
    torch.testing.assert_close(grad, trl_grad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_cdpo_matches_trl_conservative_sigmoid(pair_batch, label_smoothing):
    """TRL 1.16 applies cDPO's label smoothing only in `CPOTrainer.cpo_loss` ("sigmoid"), which has no reference
    model; fed reference-adjusted log-ratios it is exactly cDPO (trl/experimental/cpo/cpo_trainer.py)."""
    from trl.experimental.cpo import CPOTrainer

    _, _, ours = pair_batch
    t = SimpleNamespace(
        alpha=0.0,
        loss_type="sigmoid",
        beta=0.2,
        label_smoothing=label_smoothing,
        accelerator=FakeAccelerator(),
    )
    chosen_logratios, rejected_logratios = ours.chosen - ours.ref_chosen, ours.rejected - ours.ref_rejected
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(t, chosen_logratios, rejected_logratios)
    loss, metrics = L.cdpo_loss(
        ours.chosen, ours.rejected, ours.ref_chosen, ours.ref_rejected, 0.2, label_smoothing=label_smoothing
    )
    assert loss.item() == pytest.approx(losses.mean().item(), abs=ATOL)
    assert_metrics(metrics, L.preference_metrics(chosen_rewards, rejected_rewards), PAIR_KEYS)


def test_cdpo_without_smoothing_is_dpo(pair_batch):
    _, _, x = pair_batch
    dpo, _ = L.dpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, 0.1)
    cdpo, _ = L.cdpo_loss(x.chosen, x.rejected, x.ref_chosen, x.ref_rejected, 0.1, label_smoothing=0.0)
    assert cdpo.item() == pytest.approx(dpo.item())


@pytest.mark.parametrize("labels", [[1, 0, 1, 1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1]])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl(labels, weights):
    from trl import KTOTrainer

    n = len(labels)
    model = TableModel()
    input_ids, attention_mask, completion_mask = make_sequences(n, seed=3)
    # stands for the rotated (mismatched) pairs KTO estimates its reference point on
    kl_ids, kl_attention, kl_completion = make_sequences(n, seed=4)
    g = torch.Generator().manual_seed(5)
    ref, ref_kl = -6 * torch.rand(n, generator=g), -6 * torch.rand(n, generator=g)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": torch.tensor(labels, dtype=torch.bool),
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    t = trainer_namespace(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=0.1,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    t._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(t, m, b)
    expected = KTOTrainer._compute_loss(t, model, batch, False)

    logps, _ = model.summed_logps(input_ids, completion_mask)
    kl_logps, _ = model.summed_logps(kl_ids, kl_completion)
    is_chosen = torch.tensor(labels, dtype=torch.bool)
    ours = L.PreferenceLogps(
        chosen=logps[is_chosen],
        rejected=logps[~is_chosen],
        chosen_lengths=torch.ones(int(is_chosen.sum())),
        rejected_lengths=torch.ones(int((~is_chosen).sum())),
        ref_chosen=ref[is_chosen],
        ref_rejected=ref[~is_chosen],
        kl=kl_logps.detach(),
        ref_kl=ref_kl,
    )
    loss, metrics = L.get_preference_loss("kto")(
        ours, beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    theirs = {k: v[-1] for k, v in t._metrics["train"].items()}
    assert metrics["kl"].item() == pytest.approx(theirs["kl"], abs=ATOL)
    present = [k for k in ("rewards/chosen", "rewards/rejected", "rewards/margins") if k in theirs]
    assert_metrics(metrics, theirs, present)
    (trl_grad,) = torch.autograd.grad(expected, model.table)
    (grad,) = torch.autograd.grad(loss, model.table)
    torch.testing.assert_close(grad, trl_grad)


def test_kto_reference_point_is_clamped_and_detached():
    x = torch.tensor([-1.0], requires_grad=True)
    # policy below the reference on mismatched pairs: the KL estimate is < 0 and is clamped to 0
    kl = torch.tensor([-5.0, -4.0], requires_grad=True)
    loss, metrics = L.kto_loss(
        x,
        torch.empty(0),
        torch.tensor([-1.5]),
        torch.empty(0),
        0.1,
        policy_kl_logps=kl,
        ref_kl_logps=torch.tensor([-3.0, -3.0]),
    )
    assert metrics["kl"].item() == 0.0
    assert loss.item() == pytest.approx(1 - torch.sigmoid(torch.tensor(0.05)).item())
    loss.backward()
    assert kl.grad is None and x.grad.item() < 0


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_matches_trl(pair_batch, beta):
    """Odds-ratio term: TRL `ORPOTrainer.odds_ratio_loss`; the total replays `loss = policy_nll_loss -
    losses.mean()` of `ORPOTrainer.get_batch_loss_metrics` (trl/experimental/orpo/orpo_trainer.py) with the
    completion-only NLL (TRL's NLL also covers prompt tokens: a documented departure)."""
    from trl.experimental.orpo import ORPOTrainer

    _, _, x = pair_batch
    t = SimpleNamespace(beta=beta, accelerator=FakeAccelerator())
    chosen_mean, rejected_mean = x.chosen / x.chosen_lengths, x.rejected / x.rejected_lengths
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        t, chosen_mean, rejected_mean
    )
    nll = -x.chosen.sum() / x.chosen_lengths.sum()
    loss, metrics = L.get_preference_loss("orpo")(x, beta=beta)
    assert loss.item() == pytest.approx((nll - losses.mean()).item(), abs=ATOL)
    assert metrics["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), abs=ATOL)
    assert metrics["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), abs=ATOL)
    assert_metrics(metrics, L.preference_metrics(chosen_rewards, rejected_rewards), PAIR_KEYS)


def test_orpo_nll_is_the_token_mean_cross_entropy_of_the_chosen_completions(pair_batch):
    model, inputs, x = pair_batch
    _, metrics = L.get_preference_loss("orpo")(x, beta=0.1)
    ids, mask = inputs["input_ids"][:4], inputs["completion_mask"][:4]
    labels = ids.masked_fill(mask == 0, -100)
    # a "model" whose log-softmax is `table` (its probabilities sum to less than 1: irrelevant here)
    logits = model.table.expand(*ids.shape, -1)
    ce = torch.nn.functional.nll_loss(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1))
    assert metrics["nll_loss"].item() == pytest.approx(ce.item(), abs=ATOL)


@pytest.mark.parametrize(("beta", "gamma"), [(0.1, 0.5), (2.0, 1.0)])
def test_simpo_matches_trl_cpo_simpo(pair_batch, beta, gamma):
    from trl.experimental.cpo import CPOTrainer

    _, _, x = pair_batch
    t = SimpleNamespace(
        alpha=0.0,
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=0.0,
        accelerator=FakeAccelerator(),
    )
    chosen_mean, rejected_mean = x.chosen / x.chosen_lengths, x.rejected / x.rejected_lengths
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(t, chosen_mean, rejected_mean)
    loss, metrics = L.get_preference_loss("simpo")(x, beta=beta, gamma=gamma)
    assert loss.item() == pytest.approx(losses.mean().item(), abs=ATOL)
    assert_metrics(metrics, L.preference_metrics(chosen_rewards, rejected_rewards), PAIR_KEYS)


def test_registry_names_and_calls_each_loss(pair_batch):
    _, _, x = pair_batch
    assert set(L.PREFERENCE_LOSSES) >= {"dpo", "ipo", "cdpo", "kto", "orpo", "simpo"}
    for name, spec in L.PREFERENCE_LOSSES.items():
        chosen = x.chosen.clone().requires_grad_()
        loss, metrics = spec(L.PreferenceLogps(**(vars(x) | {"chosen": chosen})))
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert "rewards/chosen" in metrics and all(v.dim() == 0 for v in metrics.values()), name
        loss.backward()
        assert chosen.grad is not None and (chosen.grad <= 0).all(), name  # more chosen likelihood, less loss
    assert not L.PREFERENCE_LOSSES["simpo"].needs_reference and not L.PREFERENCE_LOSSES["kto"].paired


def test_registry_rejects_duplicates_and_suggests_names(pair_batch):
    with pytest.raises(ValueError, match="already registered"):
        L.register_preference_loss("dpo", L.dpo_loss)
    with pytest.raises(HoneError, match="did you mean 'simpo'"):
        L.get_preference_loss("simpp")
    _, _, x = pair_batch
    with pytest.raises(ValueError, match="reference"):
        L.get_preference_loss("dpo")(
            L.PreferenceLogps(x.chosen, x.rejected, x.chosen_lengths, x.rejected_lengths)
        )


# ---------------------------------------------------------------------------------------------------------------
# Advantages


def trl_grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Replays trl/trainer/grpo_trainer.py `_generate_and_score_completions`, the `sum_then_normalize` branch."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Replays trl/trainer/rloo_trainer.py `_generate_and_score_completions` ("RLOO advantages computation")."""
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    return torch.nan_to_num(rewards - baselines, nan=0.0)


REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.0, float("nan"), 1.0, 3.0])


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_advantages_match_trl(scale):
    expected = trl_grpo_advantages(REWARDS, 4, "group" if scale else "none")
    torch.testing.assert_close(L.grpo_advantages(REWARDS, 4, scale=scale), expected)


def test_grpo_advantages_by_hand():
    advantages = L.grpo_advantages(torch.tensor([1.0, 0.0, 3.0, 3.0]), group_size=2)
    std = math.sqrt(0.5)  # Bessel-corrected std of (1, 0)
    torch.testing.assert_close(advantages, torch.tensor([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0]))
    torch.testing.assert_close(
        L.grpo_advantages(torch.tensor([1.0, 0.0]), 2, scale=False), torch.tensor([0.5, -0.5])
    )
    with pytest.raises(ValueError):
        L.grpo_advantages(torch.ones(5), group_size=2)


def test_rloo_advantages_match_trl_and_hand():
    torch.testing.assert_close(L.rloo_advantages(REWARDS, 4), trl_rloo_advantages(REWARDS, 4))
    # group (1, 0, 0.5): baselines 0.25, 0.75, 0.5
    torch.testing.assert_close(
        L.rloo_advantages(torch.tensor([1.0, 0.0, 0.5]), 3), torch.tensor([0.75, -0.75, 0.0])
    )
    with pytest.raises(ValueError):
        L.rloo_advantages(torch.ones(4), 1)


# ---------------------------------------------------------------------------------------------------------------
# GRPO policy loss


def test_kl_estimators():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    torch.testing.assert_close(L.kl_k1(logps, ref), torch.tensor([0.0, -1.0, 1.0]))
    k3 = L.kl_k3(logps, ref)
    torch.testing.assert_close(k3, torch.tensor([0.0, math.e - 2.0, math.exp(-1) - (-1) - 1]))
    assert (k3 >= 0).all()


def online_batch(seed: int = 0, b: int = 5, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    logps = (-3 * torch.rand(b, t, generator=g)).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(b, t, generator=g)  # off-policy enough to clip some tokens
    ref = logps.detach() + 0.5 * torch.randn(b, t, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6])[:b]
    mask = (torch.arange(t) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(b, generator=g)
    return logps, old, ref, mask, advantages


def trl_grpo_loss(logps, old, ref, mask, advantages, loss_type, beta, eps_low, eps_high):
    """TRL `GRPOTrainer._compute_loss` (trl/trainer/grpo_trainer.py) with the model forward replaced by fixed
    per-token log-probs; returns (loss, metrics). `trl_grpo_family` with token-level ratios and no entropy bonus."""
    return trl_grpo_family(logps, old, ref, mask, advantages, torch.zeros_like(logps), loss_type=loss_type,
                           level="token", beta=beta, eps_low=eps_low, eps_high=eps_high, max_length=None,
                           entropy_coef=0.0)


@pytest.mark.parametrize(("normalisation", "trl_loss_type"), [("token", "dapo"), ("sequence", "grpo")])
@pytest.mark.parametrize(("kl_coef", "eps_high"), [(0.0, 0.2), (0.04, 0.28)])
def test_policy_gradient_loss_matches_trl_grpo(normalisation, trl_loss_type, kl_coef, eps_high):
    logps, old, ref, mask, advantages = online_batch()
    expected, theirs = trl_grpo_loss(logps, old, ref, mask, advantages, trl_loss_type, kl_coef, 0.2, eps_high)
    loss, metrics = L.policy_gradient_loss(
        logps,
        old,
        advantages,
        mask,
        clip_eps=0.2,
        clip_eps_high=eps_high,
        kl_coef=kl_coef,
        ref_logps=ref,
        normalisation=normalisation,
    )
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    (trl_grad,) = torch.autograd.grad(expected, logps)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, trl_grad)
    keys = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (
        ["kl"] if kl_coef else []
    )
    assert_metrics(metrics, theirs, keys)
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # the batch does exercise clipping


def test_policy_gradient_loss_on_policy_is_minus_mean_advantage():
    """On-policy (ratio 1), no KL: token-mean loss is -sum_b A_b len_b / sum len; sequence-mean is -mean A."""
    logps = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0])
    token, _ = L.policy_gradient_loss(logps, logps, advantages, mask)
    sequence, _ = L.policy_gradient_loss(logps, logps, advantages, mask, normalisation="sequence")
    assert token.item() == pytest.approx(-(3 * 1.0 - 2.0) / 4)
    assert sequence.item() == pytest.approx(-(1.0 - 2.0) / 2)
    with pytest.raises(ValueError):
        L.policy_gradient_loss(logps, logps, advantages, mask, kl_coef=0.1)


# ---------------------------------------------------------------------------------------------------------------
# PPO pieces. TRL 1.16 ships no PPO trainer; the oracles replay trl/experimental/ppo/ppo_trainer.py (huggingface/trl
# main before its removal, "4. compute rewards", "6. compute advantages and returns" and the minibatch loss).


def trl_gae(rewards, values, gamma, lam):
    """The GAE loop of TRL's PPO trainer, verbatim, on rewards and values already zero on padding."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 9.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages, returns = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.7
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a1 = d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, d2], [0.5 - 0.2, 0.0, 0.0]]))
    torch.testing.assert_close(returns, advantages + values * mask)


def test_gae_matches_trl_loop_and_is_monte_carlo_at_lambda_one():
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(6) < torch.tensor([[6], [4], [2]])).long()
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    advantages, returns = L.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    trl_advantages, trl_returns = trl_gae(rewards * mask, values * mask, 0.95, 0.9)
    torch.testing.assert_close(advantages, trl_advantages * mask)
    torch.testing.assert_close(returns, trl_returns * mask)
    _, returns = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)  # returns = reward-to-go
    reward_to_go = (rewards * mask).flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, reward_to_go)


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = L.kl_penalised_rewards(torch.tensor([3.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.0, 0.05 + 3.0], [0.1, -1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    # TRL's PPO: non_score_reward = -kl_coef * kl (k1 by default) on every token
    k3 = L.kl_penalised_rewards(torch.zeros(2), logps, ref, mask, kl_coef=1.0, kl=L.kl_k3)
    torch.testing.assert_close(k3, -L.kl_k3(logps, ref) * mask)


def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def test_masked_whiten_matches_trl():
    g = torch.Generator().manual_seed(0)
    values, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.3).float()
    mean = trl_masked_mean(values, mask)
    var = trl_masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    torch.testing.assert_close(L.masked_whiten(values, mask), (values - mean) * torch.rsqrt(var + 1e-8))
    torch.testing.assert_close(
        L.masked_whiten(values, mask, shift_mean=False), (values - mean) * torch.rsqrt(var + 1e-8) + mean
    )


def test_ppo_losses_match_trl():
    logps, old, _, mask, _ = online_batch(seed=1)
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g).requires_grad_()
    old_values = values.detach() + 0.4 * torch.randn(mask.shape, generator=g)
    returns = torch.randn(mask.shape, generator=g)
    # TRL (ppo_trainer.py, the minibatch loop): pg_losses, pg_losses2, masked_mean; vf_losses1/2, 0.5 * masked_mean
    ratio = torch.exp(logps - old)
    pg = trl_masked_mean(torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 0.8, 1.2)), mask)
    vclipped = torch.clamp(values, old_values - 0.2, old_values + 0.2)
    vf = 0.5 * trl_masked_mean(torch.max((values - returns) ** 2, (vclipped - returns) ** 2), mask)
    loss, metrics = L.ppo_policy_loss(logps, old, advantages, mask, clip_eps=0.2)
    value_loss, value_metrics = L.ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(pg.item(), abs=ATOL)
    assert value_loss.item() == pytest.approx(vf.item(), abs=ATOL)
    assert 0 < metrics["clipfrac"] < 1 and 0 < value_metrics["vf_clipfrac"] < 1
    value_loss.backward()
    assert values.grad[mask == 0].abs().sum() == 0  # padding gets no gradient


def test_ppo_policy_loss_unclipped_by_hand():
    logps = torch.log(torch.tensor([[1.1, 0.5]]))
    old = torch.zeros(1, 2)
    advantages = torch.tensor([[1.0, 1.0]])
    loss, metrics = L.ppo_policy_loss(logps, old, advantages, torch.ones(1, 2), clip_eps=0.2)
    # token 1: ratio 1.1 inside the clip range -> -1.1; token 2: ratio 0.5 < 0.8, max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-1.1 - 0.5) / 2)
    assert metrics["clipfrac"].item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The GRPO loss family (`policy_loss`): each member against TRL's GRPOTrainer._compute_loss with the same settings.


def trl_grpo_family(logps, old, ref, mask, advantages, entropies, *, loss_type, level, beta, eps_low, eps_high,
                    max_length, entropy_coef):
    """`trl_grpo_loss` with the importance-sampling level, max_completion_length, entropies and entropy bonus set."""
    from trl import GRPOTrainer

    t = trainer_namespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        max_completion_length=max_length,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=entropy_coef != 0.0,
        entropy_coef=entropy_coef,
        use_adaptive_entropy=False,
    )
    b, n = mask.shape
    inputs = {
        "prompt_ids": torch.ones(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.ones(b, n, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(t, None, inputs)
    return loss, {k: v[-1] for k, v in t._metrics["train"].items()}


# (our name, TRL loss_type, TRL importance_sampling_level, clip_eps, clip_eps_high)
FAMILY = [
    ("grpo", "grpo", "token", 0.2, 0.2),
    ("bnpo", "bnpo", "token", 0.2, 0.28),
    ("dr_grpo", "dr_grpo", "token", 0.2, 0.2),
    ("dapo", "dapo", "token", 0.2, 0.28),
    ("gspo", "grpo", "sequence", 3e-2, 4e-2),  # wider than the paper's 3e-4 so that this batch clips sequences
    ("cispo", "cispo", "token", 0.2, 1.2),
]


@pytest.mark.parametrize(("name", "loss_type", "level", "eps_low", "eps_high"), FAMILY)
@pytest.mark.parametrize(("kl_coef", "entropy_coef"), [(0.0, 0.0), (0.04, 0.01)])
def test_policy_loss_family_matches_trl(name, loss_type, level, eps_low, eps_high, kl_coef, entropy_coef):
    logps, old, ref, mask, advantages = online_batch()
    entropies = torch.rand(logps.shape, generator=torch.Generator().manual_seed(3)) * 2
    max_length = mask.shape[1] + 2
    expected, theirs = trl_grpo_family(logps, old, ref, mask, advantages, entropies, loss_type=loss_type,
                                       level=level, beta=kl_coef, eps_low=eps_low, eps_high=eps_high,
                                       max_length=max_length, entropy_coef=entropy_coef)
    settings = L.PolicyLossSettings(clip_eps=eps_low, clip_eps_high=eps_high, max_length=max_length)
    loss, metrics = L.policy_loss(name, logps, old, advantages, mask, settings, kl_coef=kl_coef, ref_logps=ref,
                                  entropy=entropies, entropy_coef=entropy_coef)
    assert loss.item() == pytest.approx(expected.item(), abs=ATOL)
    (trl_grad,) = torch.autograd.grad(expected, logps)
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grad, trl_grad)
    assert grad.abs().sum() > 0
    assert metrics["entropy"].item() == pytest.approx(theirs["entropy"], abs=ATOL)
    if kl_coef:
        assert metrics["kl"].item() == pytest.approx(theirs["kl"], abs=ATOL)
    if name == "cispo":
        assert metrics["clip_ratio/region_mean"].item() == pytest.approx(theirs["cispo_clip_ratio"], abs=ATOL)
    else:
        assert_metrics(metrics, theirs, ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"])


def test_policy_loss_members_differ_where_their_papers_do():
    logps, old, ref, mask, advantages = online_batch()
    settings = L.PolicyLossSettings(max_length=9)
    values = {name: L.policy_loss(name, logps, old, advantages, mask, settings)[0].item() for name in L.POLICY_LOSSES}
    assert len({round(v, 6) for v in values.values()}) == len(values)  # six different objectives
    # on-policy (ratio 1) GSPO is GRPO: the sequence weight is exp(0) too
    on = logps.detach()
    assert L.policy_loss("gspo", on, on, advantages, mask)[0].item() == pytest.approx(
        L.policy_loss("grpo", on, on, advantages, mask)[0].item())
    # Dr. GRPO's normaliser is a constant: doubling every length (same per-token loss) doubles its loss
    assert not L.POLICY_LOSSES["dr_grpo"].scale_rewards and L.POLICY_LOSSES["grpo"].scale_rewards


def test_policy_loss_errors():
    logps, old, ref, mask, advantages = online_batch()
    with pytest.raises(HoneError, match="did you mean dapo"):
        L.policy_loss("dappo", logps, old, advantages, mask)
    with pytest.raises(ValueError, match="max_length"):
        L.policy_loss("dr_grpo", logps, old, advantages, mask)
    with pytest.raises(ValueError, match="ref_logps"):
        L.policy_loss("grpo", logps, old, advantages, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        L.policy_loss("grpo", logps, old, advantages, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="twice"):
        L.register_policy_loss(L.POLICY_LOSSES["grpo"])


def test_zero_variance_groups_and_overlong_penalty():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, float("nan"), float("nan"), 2.0, 2.0, 2.0, 2.0])
    # groups of 4: [1,1,1,0] informative; [1,0.5,nan,nan] informative; [2,2,2,2] all equal
    assert L.zero_variance_groups(rewards, 4).tolist() == [False] * 8 + [True] * 4
    assert L.zero_variance_groups(torch.full((4,), float("nan")), 4).tolist() == [True] * 4
    lengths = torch.tensor([10, 12, 14, 16, 20])
    penalty = L.overlong_penalty(lengths, max_length=16, buffer=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.5, -1.0, -2.0]))
    assert L.overlong_penalty(lengths, 16, 0).abs().sum() == 0
