"""NuClass heads and losses on small hand-computed cases (expected values by plain math)."""

import math

import pytest
import torch

from heads.context import ContextHead, alpha_at
from heads.film import FiLMHead
from heads.gate import STAT_NAMES, GateHead, NuClass, mix, path_statistics
from heads.losses import (
    auto_pos_weight,
    binary_entropy_from_logit,
    class_balanced_weights,
    cross_entropy,
    gate_bce,
    gate_entropy_penalty,
    gate_loss,
    gate_targets,
    mixture_nll,
    selected_probs,
    selection_kl,
    stage2_loss,
    uncertainty_weights,
)

LN2, LN3 = math.log(2), math.log(3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layer_norm(u: torch.Tensor) -> torch.Tensor:
    mean = u.mean(dim=1, keepdim=True)
    var = ((u - mean) ** 2).mean(dim=1, keepdim=True)
    return (u - mean) / torch.sqrt(var + 1e-5)


# ------------------------------------------------------------------------- FiLM head


def test_film_head_shapes_and_features():
    torch.manual_seed(0)
    head = FiLMHead(12, n_tissues=3, n_classes=5, hidden=16)
    u, t = torch.randn(7, 12), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    z, h = head(u, t, return_features=True)
    assert z.shape == (7, 5) and h.shape == (7, 12) and head.feature_dim == 12
    assert head(u, t).shape == (7, 5)


def test_film_modulation_is_h_times_one_plus_gamma_plus_beta():
    torch.manual_seed(0)
    d = 4
    head = FiLMHead(d, n_tissues=2, n_classes=3, hidden=8)
    last = head.film_mlp[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[:d] = 1.0  # γ = 1
        last.bias[d:] = 0.5  # β = 0.5
    u = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, -1.0]])
    h = head.features(u, torch.tensor([0, 1]))
    torch.testing.assert_close(h, _layer_norm(u) * 2.0 + 0.5)


def test_film_gamma_beta_per_tissue_match_per_cell_computation():
    torch.manual_seed(1)
    head = FiLMHead(6, n_tissues=3, n_classes=2, hidden=8)
    u, t = torch.randn(5, 6), torch.tensor([2, 0, 1, 1, 2])
    gb = head.film_mlp(head.tissue_emb(t))  # per cell, the plain way
    gamma, beta = gb[:, :6], gb[:, 6:]
    torch.testing.assert_close(head.features(u, t), _layer_norm(u) * (1 + gamma) + beta)


def test_film_vs_concat():
    torch.manual_seed(0)
    film = FiLMHead(6, n_tissues=3, n_classes=4, hidden=8).eval()
    concat = FiLMHead(6, n_tissues=3, n_classes=4, film=False, hidden=8).eval()
    u = torch.randn(1, 6).repeat(3, 1)
    t = torch.tensor([0, 1, 2])
    assert concat.feature_dim == 6 + 32 and not hasattr(concat, "film_mlp")
    h = concat.features(u, t)
    torch.testing.assert_close(h[:, :6], _layer_norm(u))
    torch.testing.assert_close(h[:, 6:], concat.tissue_emb.weight[t])
    # both condition on the tissue: the same u gives different logits per tissue
    for head in (film, concat):
        z = head(u, t)
        assert not torch.allclose(z[0], z[1]) and not torch.allclose(z[1], z[2])


# ------------------------------------------------------------------------- context head


def test_alpha_ramp():
    assert alpha_at(0.0) == pytest.approx(0.25)
    assert alpha_at(1.0) == pytest.approx(0.625)
    assert alpha_at(2.0) == pytest.approx(1.0)
    assert alpha_at(7.5) == pytest.approx(1.0)


def test_context_head_exports_z_b_only():
    torch.manual_seed(0)
    head = ContextHead(10, 8, 4, proj=6, hidden=12).eval()
    u, c = torch.randn(5, 10), torch.randn(5, 8)
    z_b, feat = head(u, c, return_features=True)
    assert z_b.shape == (5, 4) and feat.shape == (5, 12) and head.feature_dim == 12
    # the exported prediction does not involve the internal gate at all
    with torch.no_grad():
        for p in head.gate.parameters():
            p.add_(1.0)
    torch.testing.assert_close(head(u, c), z_b)
    # α is a saved buffer, so a checkpoint carries the scale its weights were trained with
    assert "alpha" in head.state_dict()


def test_context_head_alpha_scales_context_and_training_fusion():
    torch.manual_seed(0)
    head = ContextHead(10, 8, 3, proj=6, hidden=12, dropout=0.0).eval()
    u, c = torch.randn(4, 10), torch.randn(4, 8)
    head.set_alpha(0.0)
    torch.testing.assert_close(head(u, c), head(u, torch.randn(4, 8)))  # α = 0: no context
    head.set_alpha(1.0)
    assert not torch.allclose(head(u, c), head(u, torch.randn(4, 8)))
    # z_F = z_A + g z_B with g = sigmoid(0) = 0.5 when the gate's last layer is zero
    with torch.no_grad():
        head.gate[2].weight.zero_()
        head.gate[2].bias.zero_()
    z_a, a = torch.randn(4, 3), torch.rand(4)
    z_f, z_b, g = head.forward_train(u, c, z_a, a)
    torch.testing.assert_close(g, torch.full((4,), 0.5))
    torch.testing.assert_close(z_f, z_a + 0.5 * z_b)


def test_context_dropout_zeroes_context_for_the_batch_in_training_only():
    torch.manual_seed(0)
    head = ContextHead(10, 8, 3, proj=6, hidden=12, dropout=0.0, context_dropout=1.0)
    u, c = torch.randn(4, 10), torch.randn(4, 8)
    head.train()
    _, feat = head(u, c, return_features=True)
    # the raw context is zeroed before its LayerNorm: c' = proj(LN bias) = proj(0) = proj bias
    torch.testing.assert_close(feat[:, 6:], head.proj_c.bias.expand(4, -1))
    torch.testing.assert_close(head(u, c), head(u, torch.randn(4, 8)))
    head.eval()
    assert not torch.allclose(head(u, c), head(u, torch.randn(4, 8)))


# ------------------------------------------------------------------------- gate


def test_path_statistics_hand_computed():
    p_a = torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    p_b = torch.tensor([[0.1, 0.1, 0.8], [0.0, 1.0, 0.0]])
    s = path_statistics(p_a, p_b)
    assert s.shape == (2, 8) and len(STAT_NAMES) == 8
    h_a0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / LN3
    h_b0 = -(2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8)) / LN3
    expected = torch.tensor(
        [
            [0.5, h_a0, 0.2, 0.8, h_b0, 0.7, 0.3, 0.3],
            [1 / 3, 1.0, 0.0, 1.0, 0.0, 1.0, 2 / 3, 2 / 3],
        ]
    )
    torch.testing.assert_close(s, expected)
    # Δ can be negative; |Δ| is not
    s2 = path_statistics(p_b[:1], p_a[:1])
    assert s2[0, 6] == pytest.approx(-0.3) and s2[0, 7] == pytest.approx(0.3)


def test_mix_hand_computed():
    p_a = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    p_b = torch.tensor([[0.0, 1.0], [0.6, 0.4]])
    out = mix(p_a, p_b, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.25], [0.4, 0.6]]))


def test_gate_head_shapes_and_mixture():
    torch.manual_seed(0)
    gate = GateHead(12, 10, 4, proj=8, hidden=(16, 8)).eval()
    h_a, f_b = torch.randn(6, 12), torch.randn(6, 10)
    p_a, p_b = torch.randn(6, 4).softmax(1), torch.randn(6, 4).softmax(1)
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.fill_(-LN3)  # sigmoid(-ln 3) = 0.25
    p_mix, g, logit = gate(h_a, f_b, p_a, p_b)
    assert p_mix.shape == (6, 4) and g.shape == (6,) and logit.shape == (6,)
    torch.testing.assert_close(g, torch.full((6,), 0.25))
    torch.testing.assert_close(p_mix, 0.75 * p_a + 0.25 * p_b)
    torch.testing.assert_close(p_mix.sum(1), torch.ones(6))
    assert gate.mlp[0].in_features == 2 * 8 + 8


def test_gate_default_mlp_is_264_256_64_1():
    gate = GateHead(1536, 1024, 16)
    linears = [m for m in gate.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(264, 256), (256, 64), (64, 1)]


def test_nuclass_forward_and_frozen_heads():
    torch.manual_seed(0)
    local = FiLMHead(10, 2, 3, hidden=8)
    context = ContextHead(10, 6, 3, proj=4, hidden=8)
    model = NuClass(local, context, GateHead(local.feature_dim, context.feature_dim, 3, proj=4,
                                             hidden=(8, 4)))
    u, t, c = torch.randn(5, 10), torch.tensor([0, 1, 0, 1, 0]), torch.randn(5, 6)
    out = model(u, t, c, freeze_heads=True)
    assert out["p_mix"].shape == (5, 3) and out["g"].shape == (5,)
    out["p_mix"].sum().backward()
    assert all(p.grad is None for p in local.parameters())
    assert any(p.grad is not None for p in model.gate.parameters())


# ------------------------------------------------------------------------- losses


def test_class_balanced_weights_hand_computed():
    # β = 0.5: w = (1 - β)/(1 - β^n) = [1, 0.5/0.875 = 4/7] -> normalised to sum 2: [14/11, 8/11]
    w = class_balanced_weights(torch.tensor([1, 3]), beta=0.5)
    torch.testing.assert_close(w, torch.tensor([14 / 11, 8 / 11]))
    # equal counts -> all ones; a class without cells -> 0, the rest still sum to C
    torch.testing.assert_close(class_balanced_weights(torch.tensor([100, 100])), torch.ones(2))
    torch.testing.assert_close(
        class_balanced_weights(torch.tensor([0, 5, 5])), torch.tensor([0.0, 1.5, 1.5])
    )
    # rarer classes weigh more
    w = class_balanced_weights(torch.tensor([10, 1000, 100000]))
    assert w[0] > w[1] > w[2] and w.sum().item() == pytest.approx(3.0)


def test_cross_entropy_smoothing_and_weights_hand_computed():
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])  # p = [1/4, 3/4]
    y = torch.tensor([1, 0])
    nll1, nll0 = math.log(4 / 3), math.log(4)
    assert cross_entropy(logits, y).item() == pytest.approx((nll1 + nll0) / 2)
    # smoothing 0.1, C = 2: 0.9 nll_y + 0.1 * mean_c nll_c
    ls = [0.9 * nll1 + 0.05 * (nll0 + nll1), 0.9 * nll0 + 0.05 * (nll0 + nll1)]
    per_cell = cross_entropy(logits, y, smoothing=0.1, reduction="none")
    torch.testing.assert_close(per_cell, torch.tensor(ls))
    # class weights [2, 1]: weighted mean (1 * l_cell0 + 2 * l_cell1) / (1 + 2)
    got = cross_entropy(logits, y, weight=torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx((1 * nll1 + 2 * nll0) / 3)
    # weights and smoothing: a cell's smoothing term carries its own class's weight, as its
    # NLL term does; cell 0 (y=1, weight 1), cell 1 (y=0, weight 2); mean over sum w[y] = 3
    got = cross_entropy(logits, y, smoothing=0.1, weight=torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx((1 * ls[0] + 2 * ls[1]) / 3)
    per_cell = cross_entropy(logits, y, smoothing=0.1, weight=torch.tensor([2.0, 1.0]), reduction="none")
    torch.testing.assert_close(per_cell, torch.tensor([ls[0], 2 * ls[1]]))


def test_cross_entropy_equals_torch_where_weights_and_smoothing_do_not_meet():
    """Random 64x5 logits, class-balanced weights: torch's weighted CE without smoothing, and
    torch's label-smoothed CE without weights, exactly."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=gen) * 2
    y = torch.randint(0, 5, (64,), generator=gen)
    w = class_balanced_weights(torch.tensor([400, 60, 9, 3, 1000]))
    for reduction in ("mean", "none"):
        ref = torch.nn.CrossEntropyLoss(weight=w, reduction=reduction)(logits, y)
        torch.testing.assert_close(cross_entropy(logits, y, weight=w, reduction=reduction), ref)
        ref = torch.nn.CrossEntropyLoss(label_smoothing=0.1, reduction=reduction)(logits, y)
        torch.testing.assert_close(cross_entropy(logits, y, smoothing=0.1, reduction=reduction), ref)


def test_weighted_smoothed_cross_entropy_keeps_a_majority_cell_majority():
    """One majority-class cell, class weights [0.026, 1.974] (76:1), smoothing 0.1, free logits
    optimised to the loss minimum: the prediction stays the cell's class. (torch's
    `cross_entropy(weight=w, label_smoothing=0.1)` puts the optimum on the rare class past
    19:1: its optimum p_rare = 1.974 * 0.05 / (0.026 * 0.95 + 1.974 * 0.05) = 0.8.)"""
    w = torch.tensor([0.026, 1.974])
    y = torch.tensor([0])
    z = torch.zeros(1, 2, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        cross_entropy(z, y, smoothing=0.1, weight=w).backward()
        opt.step()
    p = z.detach().softmax(1)[0]
    assert p.argmax().item() == 0
    assert p[1].item() == pytest.approx(0.05, abs=1e-3)  # the smoothing target: ε / C


def test_uncertainty_weighted_stage2_loss_hand_computed():
    torch.testing.assert_close(uncertainty_weights(torch.tensor([0.5, 1.0, 0.0])),
                               torch.tensor([0.25, 0.0, 1.0]))
    z_f = torch.zeros(2, 2)  # uniform: CE = ln 2 whatever the smoothing
    z_b = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    y = torch.tensor([1, 0])
    a = torch.tensor([0.5, 1.0])
    nll, nll_other = math.log(4 / 3), math.log(4)
    aux = 0.95 * nll + 0.025 * (nll + nll_other)  # both cells alike, class weights 1
    expected = (0.25 * LN2 + 0.0) / 2 + 0.3 * aux
    got = stage2_loss(z_f, z_b, y, a, torch.ones(2), smoothing=0.05, aux_weight=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # class weights [2, 1], a = 1 (no fused term): each cell's whole aux term, smoothing
    # included, carries its own class's weight; z_B gives both cells p = [1/4, 3/4]
    z_b = torch.tensor([[0.0, LN3], [0.0, LN3]])
    aux = [0.95 * nll + 0.025 * (nll + nll_other), 0.95 * nll_other + 0.025 * (nll + nll_other)]
    got = stage2_loss(z_f, z_b, y, torch.ones(2), torch.tensor([2.0, 1.0]), smoothing=0.05, aux_weight=0.3)
    assert got.item() == pytest.approx(0.3 * (1 * aux[0] + 2 * aux[1]) / 3, rel=1e-6)


def test_gate_targets_and_weights_hand_computed():
    p_a = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.7, 0.3], [0.3, 0.7]])
    p_b = torch.tensor([[0.3, 0.7], [0.45, 0.55], [0.9, 0.1], [0.4, 0.6]])
    y = torch.tensor([1, 0, 0, 0])
    t, w, gap = gate_targets(p_a, p_b, y)
    # only B right, only A right, both right, both wrong
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(t, torch.tensor([1.0, 0.0, sig(2.0), sig(1.0)]))
    torch.testing.assert_close(gap, torch.tensor([0.3, -0.35, 0.2, 0.1]))
    torch.testing.assert_close(w, torch.tensor([3.3, 3.35, 1.2, 1.1]))
    sel = selected_probs(p_a, p_b, t)
    torch.testing.assert_close(sel, torch.stack([p_b[0], p_a[1], p_b[2], p_b[3]]))


def test_mixture_nll_hand_computed():
    p_mix = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    got = mixture_nll(p_mix, torch.tensor([1, 0]), torch.tensor([2.0, 1.0]))
    assert got.item() == pytest.approx((2 * math.log(4 / 3) + LN2) / 2)


def test_auto_pos_weight_and_gate_bce_hand_computed():
    # share of positives q = 1.5 / 4 = 0.375 -> pos_weight (1 - q) / q = 5 / 3
    assert auto_pos_weight(torch.tensor([1.0, 0.0, 0.0, 0.5])).item() == pytest.approx(5 / 3)
    # the authors clamp q to [0.001, 0.999], not pos_weight to [0.1, 10]
    assert auto_pos_weight(torch.ones(3)).item() == pytest.approx(0.001 / 0.999, rel=1e-3)
    assert auto_pos_weight(torch.zeros(3)).item() == pytest.approx(999.0, rel=1e-3)
    t = torch.zeros(1000)
    t[:46] = 1.0  # 4.6% positives: pos_weight 20.7 (a [0.1, 10] clamp would give 10)
    assert auto_pos_weight(t).item() == pytest.approx(0.954 / 0.046, rel=1e-5)
    # cell 1: g = 0.5, t = 1, w = 2, pw = 3 -> -2 * 3 ln 0.5 = 6 ln 2
    # cell 2: g = 0.75, t = 0, w = 1 -> -ln 0.25 = 2 ln 2; mean = 4 ln 2
    got = gate_bce(torch.tensor([0.0, LN3]), torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0]),
                   torch.tensor(3.0))
    assert got.item() == pytest.approx(4 * LN2)


def test_selection_kl_hand_computed():
    p_sel = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p_mix = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    kl2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = selection_kl(p_sel, p_mix, torch.tensor([1.0, 2.0]))
    assert got.item() == pytest.approx((LN2 + 2 * kl2) / 2)


def test_gate_entropy_penalty_hand_computed():
    h_075 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(binary_entropy_from_logit(torch.tensor([0.0, LN3])),
                               torch.tensor([LN2, h_075]))
    got = gate_entropy_penalty(torch.tensor([0.0, LN3]), torch.tensor([-0.4, 0.2]))
    assert got.item() == pytest.approx((0.4 * LN2 + 0.2 * h_075) / 2)


def test_gate_loss_combines_terms_with_their_weights():
    # one cell, both paths uniform (argmax 0 = y: both "right"), gap 0 -> t = 0.5, w = 1;
    # g = 0.5 -> p_mix uniform. nll = ln 2, bce (pw = 1) = ln 2, KL = 0, entropy term = 0,
    # heads' CE = ln 2 each.
    out = {
        "z_a": torch.zeros(1, 2), "z_b": torch.zeros(1, 2),
        "p_a": torch.full((1, 2), 0.5), "p_b": torch.full((1, 2), 0.5),
        "p_mix": torch.full((1, 2), 0.5), "gate_logit": torch.zeros(1),
    }
    y = torch.tensor([0])
    total, terms = gate_loss(out, y, heads_trainable=False)
    assert set(terms) == {"nll", "bce", "kl", "entropy"}
    assert total.item() == pytest.approx(2 * LN2, abs=1e-6)
    total, terms = gate_loss(out, y, heads_trainable=True)
    assert terms["heads_ce"].item() == pytest.approx(0.05 * LN2)
    assert total.item() == pytest.approx(2.05 * LN2, abs=1e-6)
    # a case where the KL and entropy terms are live: only B right, g = 0.5
    out2 = {
        "z_a": torch.zeros(1, 2), "z_b": torch.zeros(1, 2),
        "p_a": torch.tensor([[0.8, 0.2]]), "p_b": torch.tensor([[0.2, 0.8]]),
        "p_mix": torch.tensor([[0.5, 0.5]]), "gate_logit": torch.zeros(1),
    }
    total, terms = gate_loss(out2, torch.tensor([1]), heads_trainable=False)
    w = 1 + 2 + 0.6
    kl = 0.2 * math.log(0.2 / 0.5) + 0.8 * math.log(0.8 / 0.5)
    assert terms["nll"].item() == pytest.approx(w * LN2)
    # t = 1 -> share of positives clamps to 0.999, pos_weight 0.001/0.999: BCE = -w pw ln 0.5
    assert terms["bce"].item() == pytest.approx(w * (0.001 / 0.999) * LN2, rel=1e-3)
    assert terms["kl"].item() == pytest.approx(0.1 * w * kl)
    assert terms["entropy"].item() == pytest.approx(0.05 * LN2 * 0.6)
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()))
