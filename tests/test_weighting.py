"""Loss-weighting strategies: each against its paper's formula by hand, then training and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from clue_mtl.runs.folder import RunFolder
from clue_mtl.recipes.multitask import Trainer
from clue_mtl.weighting import METHODS, StepContext, build_weighting
from clue_mtl.weighting.base import gram_matrix
from clue_mtl.weighting.gradnorm import GradNorm
from clue_mtl.weighting.mgda import min_norm_weights
from clue_mtl.weighting.pcgrad import pcgrad_coefficients


def context(shared=(), last=None, step=0, **extra) -> StepContext:
    shared = list(shared)
    return StepContext(backward=lambda t: t.backward(), shared_parameters=list(shared),
                       last_shared_parameters=list(shared if last is None else last), features={}, step=step,
                       **extra)


def leaf_losses(values: dict[str, float]) -> dict[str, torch.Tensor]:
    return {task: torch.tensor(value, requires_grad=True) for task, value in values.items()}


def linear_losses(theta: torch.Tensor, directions: dict[str, tuple], offsets: dict[str, float] | None = None):
    """L_t = g_t . theta (+ offset): the gradient w.r.t. theta is exactly g_t."""
    offsets = offsets or {}
    return {t: torch.tensor(g, dtype=theta.dtype) @ theta + offsets.get(t, 0.0) for t, g in directions.items()}


# ------------------------------------------------------------------------------------------------ by hand
def test_uncertainty_loss_and_gradients_by_hand():
    # s = (0, 0.5), L = (2, 1):
    #   total = e^0 * 2 + 0 + e^-0.5 * 1 + 0.5 = 3.1065307
    #   d/ds_i = 1 - e^-s_i L_i = (1 - 2, 1 - 0.6065307) = (-1, 0.3934693)
    #   d/dL_i = e^-s_i = (1, 0.6065307)
    weighting = build_weighting("uncertainty", ["a", "b"])
    with torch.no_grad():
        weighting.log_variances.copy_(torch.tensor([0.0, 0.5]))
    losses = leaf_losses({"a": 2.0, "b": 1.0})
    total = weighting.backward(losses, context())
    assert total.item() == pytest.approx(3.1065307, abs=1e-6)
    assert weighting.log_variances.grad.tolist() == pytest.approx([-1.0, 0.3934693], abs=1e-6)
    assert [losses["a"].grad.item(), losses["b"].grad.item()] == pytest.approx([1.0, 0.6065307], abs=1e-6)
    assert list(weighting.task_weights().values()) == pytest.approx([1.0, 0.6065307], abs=1e-6)


def test_dwa_on_a_loss_history_by_hand():
    # window 2, T = 2. Steps 0-3 record (4,2,1), (4,2,1), (2,2,2), (2,2,2); weights 1 until then.
    # Step 4: recent mean (2,2,2) / previous mean (4,2,1) = r = (0.5, 1, 2);
    #   w = 3 exp(r/2) / sum exp(r/2) = 3 (e^.25, e^.5, e^1) / 5.6510 = (0.681659, 0.875268, 1.443073).
    # Step 4 records (1,1,1); the ring now holds steps 1-4. Step 5: recent = mean(steps 3,4) = (1.5,1.5,1.5),
    #   previous = mean(steps 1,2) = (3, 2, 1.5): r = (0.5, 0.75, 1) -> w = (0.877918, 0.994812, 1.127270).
    weighting = build_weighting("dwa", ["a", "b", "c"], {"window": 2, "temperature": 2.0})
    history = [(4, 2, 1), (4, 2, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1)]
    seen = []
    for step, values in enumerate(history):
        losses = leaf_losses(dict(zip("abc", map(float, values))))
        weighting.backward(losses, context(step=step))
        seen.append([losses[t].grad.item() for t in "abc"])  # d total / d L_i = w_i
    assert seen[:4] == [[1.0, 1.0, 1.0]] * 4
    assert seen[4] == pytest.approx([0.681659, 0.875268, 1.443073], abs=1e-5)
    assert seen[5] == pytest.approx([0.877918, 0.994812, 1.127270], abs=1e-5)
    assert weighting.recorded.item() == 6


def test_dtp_weights_by_hand():
    # First step: k = accuracy = (0.5, 0.9); w = -(1-k)^2 log k = (0.25 * 0.693147, 0.01 * 0.105361)
    #   = (0.173287, 0.00105361).
    # Second step, accuracies (0.7, 0.5), decay 0.9: k = (0.9*0.5 + 0.1*0.7, 0.9*0.9 + 0.1*0.5) = (0.52, 0.86);
    #   w = (0.48^2 * 0.653926, 0.14^2 * 0.150823) = (0.150665, 0.00295613).
    weighting = build_weighting("dtp", ["a", "b"], {"gamma": 2.0, "decay": 0.9})
    for accuracies, expected in [((0.5, 0.9), (0.173287, 0.00105361)), ((0.7, 0.5), (0.150665, 0.00295613))]:
        losses = leaf_losses({"a": 1.0, "b": 1.0})
        weighting.backward(losses, context(accuracies=dict(zip("ab", map(torch.tensor, accuracies)))))
        assert [losses[t].grad.item() for t in "ab"] == pytest.approx(expected, rel=1e-4)
    assert weighting.kpi.tolist() == pytest.approx([0.52, 0.86], abs=1e-6)

    # The likelihood KPI is exp(-L): L = ln 2 gives k = 0.5, weight 0.173287, with no accuracies needed.
    likelihood = build_weighting("dtp", ["a"], {"kpi": "likelihood"})
    losses = leaf_losses({"a": math.log(2)})
    likelihood.backward(losses, context())
    assert losses["a"].grad.item() == pytest.approx(0.173287, rel=1e-4)
    with pytest.raises(ValueError, match="accuracies"):
        build_weighting("dtp", ["a"]).backward(leaf_losses({"a": 1.0}), context())


def test_pcgrad_projection_by_hand():
    # g1 = (1,0), g2 = (-1,1), g1.g2 = -1 < 0:
    #   g1' = g1 - (-1)/|g2|^2 g2 = (1,0) + (-0.5, 0.5) = (0.5, 0.5)
    #   g2' = g2 - (-1)/|g1|^2 g1 = (-1,1) + (1,0) = (0, 1);  sum = (0.5, 1.5).
    # The heads keep their own gradients (3 and 5); a gradient already there (accumulation) is added to.
    theta = nn.Parameter(torch.zeros(2))
    heads = {"a": nn.Parameter(torch.zeros(())), "b": nn.Parameter(torch.zeros(()))}
    theta.grad = torch.tensor([10.0, 20.0])
    losses = linear_losses(theta, {"a": (1.0, 0.0), "b": (-1.0, 1.0)})
    losses = {"a": losses["a"] + 3 * heads["a"], "b": losses["b"] + 5 * heads["b"]}
    build_weighting("pcgrad", ["a", "b"]).backward(losses, context([theta]))
    assert theta.grad.tolist() == pytest.approx([10.5, 21.5])
    assert (heads["a"].grad.item(), heads["b"].grad.item()) == (3.0, 5.0)

    # Non-conflicting gradients pass unchanged: g1 = (1,0), g2 = (1,1) -> (2, 1).
    gram = torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert pcgrad_coefficients(gram, [[1], [0]]).tolist() == [1.0, 1.0]


def test_pcgrad_coefficient_space_matches_the_vector_algorithm():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    grads[2] = -grads[0] + 0.3 * grads[1]  # make conflicts certain
    for orders in ([[1, 2], [0, 2], [0, 1]], [[2, 1], [2, 0], [1, 0]]):
        expected = torch.zeros(7, dtype=torch.float64)
        for i in range(3):  # the paper's Algorithm 1, on the vectors themselves
            projected = grads[i].clone()
            for j in orders[i]:
                dot = projected @ grads[j]
                if dot < 0:
                    projected -= dot / (grads[j] @ grads[j]) * grads[j]
            expected += projected
        combined = pcgrad_coefficients(grads @ grads.T, orders) @ grads
        assert torch.allclose(combined, expected, atol=1e-12)


def test_mgda_min_norm_by_hand():
    def solve(*grads):
        g = torch.tensor(grads, dtype=torch.float64)
        return min_norm_weights(g @ g.T).tolist()

    # Orthogonal unit pair: the min-norm point of the segment is its midpoint, alpha = (0.5, 0.5).
    assert solve((1, 0), (0, 1)) == pytest.approx([0.5, 0.5])
    # g1 = (1,0), g2 = (1,1): gamma = (G22 - G12) / (G11 + G22 - 2 G12) = (2-1)/(1+2-2) = 1 -> alpha = (1, 0):
    # g1 is itself the min-norm point (g1 . (g2 - g1) = 0 >= 0).
    assert solve((1, 0), (1, 1)) == pytest.approx([1.0, 0.0])
    # Three tasks whose hull holds the origin: (1,0)/3 + (0,1)/3 + (-1,-1)/3 = 0 -> alpha = (1/3, 1/3, 1/3).
    assert solve((1, 0), (0, 1), (-1, -1)) == pytest.approx([1 / 3] * 3, abs=1e-9)
    # Three orthonormal vectors: by symmetry alpha = (1/3, 1/3, 1/3), |d|^2 = 1/3.
    assert solve((1, 0, 0), (0, 1, 0), (0, 0, 1)) == pytest.approx([1 / 3] * 3, abs=1e-9)
    # A third, long gradient outside the useful face: hull of (1,0), (0,1), (2,2) -> (0.5, 0.5, 0).
    assert solve((1, 0), (0, 1), (2, 2)) == pytest.approx([0.5, 0.5, 0.0], abs=1e-9)
    # Equal gradients (singular Gram): any split is optimal; the result is on the simplex.
    alpha = solve((1, 1), (1, 1), (1, 1))
    assert sum(alpha) == pytest.approx(1.0) and min(alpha) >= 0

    # Through the strategy: shared gradient alpha-combined, heads unchanged.
    theta = nn.Parameter(torch.zeros(2))
    head = nn.Parameter(torch.zeros(()))
    losses = linear_losses(theta, {"a": (1.0, 0.0), "b": (0.0, 1.0)})
    losses["a"] = losses["a"] + 4 * head
    weighting = build_weighting("mgda", ["a", "b"])
    weighting.backward(losses, context([theta]))
    assert theta.grad.tolist() == pytest.approx([0.5, 0.5])
    assert head.grad.item() == 4.0
    assert list(weighting.task_weights().values()) == pytest.approx([0.5, 0.5])


def test_gradnorm_target_and_weight_direction_by_hand():
    # L0 = (2, 2), now L = (1, 1.8): rates L/L0 = (0.5, 0.9), mean 0.7, r = (0.714286, 1.285714).
    # Norms at the last layer ||grad L_i|| = (3, 1), w = (1, 1): G = (3, 1), mean 2;
    # target = 2 r^1.5 = (1.207363, 2.915726): the slower task b gets the larger target.
    # d/dw sum |w_i n_i - target_i| = sign(G - target) n = (+3, -1): descent raises w_b, lowers w_a.
    theta = nn.Parameter(torch.zeros(2))
    weighting = build_weighting("gradnorm", ["a", "b"], {"initial_steps": 1})
    directions = {"a": (3.0, 0.0), "b": (0.0, 1.0)}
    weighting.backward(linear_losses(theta, directions, {"a": 2.0, "b": 2.0}), context([theta]))
    weighting.weights.grad, theta.grad = None, None
    weighting.backward(linear_losses(theta, directions, {"a": 1.0, "b": 1.8}), context([theta], step=1))
    targets = weighting.targets(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.8]), torch.tensor([2.0, 2.0]))
    assert targets.tolist() == pytest.approx([1.207363, 2.915726], abs=1e-5)
    assert weighting.weights.grad.tolist() == pytest.approx([3.0, -1.0])
    assert theta.grad.tolist() == pytest.approx([3.0, 1.0])  # w_a g_a + w_b g_b with w = (1, 1)
    assert (weighting.initial_sum / weighting.initial_count).tolist() == [2.0, 2.0]


def test_gradnorm_initial_losses_average_the_first_steps_then_hold():
    # initial_steps 2: L(0) at step 0 = (2, 4); at step 1 = mean((2, 4), (4, 2)) = (3, 3); then fixed.
    weighting = build_weighting("gradnorm", ["a", "b"], {"initial_steps": 2})
    seen = []
    for step, values in enumerate([(2.0, 4.0), (4.0, 2.0), (1.0, 1.0), (9.0, 9.0)]):
        with torch.no_grad():
            seen.append(weighting.initial_losses(torch.tensor(values), context(step=step)).tolist())
    assert seen == [[2.0, 4.0], [3.0, 3.0], [3.0, 3.0], [3.0, 3.0]]
    # under accumulation one step's micro-batches count as one step: (2, 4) and (4, 2) -> (3, 3)
    weighting = build_weighting("gradnorm", ["a", "b"], {"initial_steps": 1})
    for micro, values in enumerate([(2.0, 4.0), (4.0, 2.0)]):
        with torch.no_grad():
            estimate = weighting.initial_losses(torch.tensor(values), context(micro_batch=micro, micro_batches=2))
    assert estimate.tolist() == [3.0, 3.0] and weighting.initial_count.item() == 1


def test_gradnorm_norms_are_of_the_gradient_averaged_over_processes():
    # This rank's gradients at W: a -> (3, 0), b -> (0, 1); the other rank's: a -> (-3, 0), b -> (0, 3).
    # Norms of the mean gradient: a -> 0, b -> 2 (a mean of per-rank norms would say 3 and 2).
    theta = nn.Parameter(torch.zeros(2))
    other = torch.tensor([[-3.0, 0.0], [0.0, 3.0]])

    def reduce_mean(tensor):
        return (tensor + other) / 2 if tensor.ndim == 2 else tensor

    weighting = build_weighting("gradnorm", ["a", "b"])
    losses = linear_losses(theta, {"a": (3.0, 0.0), "b": (0.0, 1.0)})
    norms = weighting.gradient_norms(losses, context([theta], reduce_mean=reduce_mean))
    assert norms.tolist() == pytest.approx([0.0, 2.0])


def test_learned_weights_take_the_mean_gradient_of_a_steps_micro_batches():
    # uncertainty, s = 0: d/ds = 1 - L per micro-batch; micro-batch losses 3 and 1 -> mean (-2 + 0) / 2 = -1
    weighting = build_weighting("uncertainty", ["a"])
    for micro, value in enumerate([3.0, 1.0]):
        weighting.backward(leaf_losses({"a": value}), context(micro_batch=micro, micro_batches=2))
    assert weighting.log_variances.grad.tolist() == pytest.approx([-1.0])
    # GradNorm: two micro-batches of the same losses give the gradient one batch of them gives
    theta = nn.Parameter(torch.zeros(2))
    directions, offsets = {"a": (3.0, 0.0), "b": (0.0, 1.0)}, {"a": 2.0, "b": 1.0}
    grads = []
    for micro_batches in (1, 2):
        weighting = build_weighting("gradnorm", ["a", "b"])
        for micro in range(micro_batches):
            weighting.backward(linear_losses(theta, directions, offsets),
                               context([theta], micro_batch=micro, micro_batches=micro_batches))
        grads.append(weighting.weights.grad.tolist())
    assert grads[1] == pytest.approx(grads[0]) and any(abs(g) > 0 for g in grads[0])


def test_gradnorm_checkpoints_from_before_averaged_initial_losses_still_load():
    weighting = build_weighting("gradnorm", ["a", "b"], {"initial_steps": 20})
    old = {"weights": torch.tensor([0.8, 1.2]), "initial_losses": torch.tensor([2.0, 3.0]),
           "has_initial": torch.tensor(True)}
    weighting.load_state_dict(old)
    assert weighting.weights.tolist() == pytest.approx([0.8, 1.2])
    with torch.no_grad():  # the old L(0) holds: collection is complete
        assert weighting.initial_losses(torch.tensor([9.0, 9.0]), context()).tolist() == [2.0, 3.0]


def test_dtp_advances_its_kpi_once_per_optimiser_step():
    # decay 0.9. Step 0, micro-batch accuracies 0.5 then 0.7: k = 0.6 after the step (not 0.9*0.5+0.1*0.7).
    # Step 1, 0.2 then 0.4: the first micro-batch is weighted from 0.9*0.6 + 0.1*0.2 = 0.56, the
    # second from 0.9*0.6 + 0.1*0.3 = 0.57, which is k after the step.
    weighting = build_weighting("dtp", ["a"], {"decay": 0.9})
    weights = []
    for step, accuracies in enumerate([(0.5, 0.7), (0.2, 0.4)]):
        for micro, accuracy in enumerate(accuracies):
            weighting.backward(leaf_losses({"a": 1.0}), context(
                step=step, micro_batch=micro, micro_batches=2, accuracies={"a": torch.tensor(accuracy)}))
            weights.append(weighting.weights.item())
        assert weighting.kpi.item() == pytest.approx([0.6, 0.57][step])
    expected = [weighting.priorities(torch.tensor(k), 2.0).item() for k in (0.5, 0.6, 0.56, 0.57)]
    assert weights == pytest.approx(expected, abs=1e-6)


def test_gradnorm_gives_the_slower_task_the_larger_weight():
    # Equal gradient norms; loss a falls 1% a step, loss b 10% a step. Over the steps w_a > w_b.
    theta = nn.Parameter(torch.zeros(2))
    weighting = GradNorm(["a", "b"], alpha=1.5)
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.025)
    for step in range(30):
        losses = linear_losses(theta, {"a": (1.0, 0.0), "b": (0.0, 1.0)}, {"a": 0.99 ** step, "b": 0.9 ** step})
        weighting.backward(losses, context([theta], step=step))
        optimizer.step()
        optimizer.zero_grad()
        theta.grad = None
    weights = weighting.task_weights()
    assert weights["a"] > 1.2 > 0.8 > weights["b"]
    assert sum(weights.values()) == pytest.approx(2.0)


def test_gradnorm_brings_gradient_norms_together():
    # Two regression tasks through one shared layer; task b's loss is 100x task a's. GradNorm lowers w_b
    # until w_a |grad_W L_a| and w_b |grad_W L_b| meet: their ratio moves from ~100 toward 1.
    torch.manual_seed(0)
    shared, heads = nn.Linear(4, 4), nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    x, y = torch.randn(64, 4), torch.randn(64, 2)
    weighting = GradNorm(["a", "b"])
    model_optimizer = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=1e-3)
    weighting_optimizer = torch.optim.Adam(weighting.parameters(), lr=0.025)

    def log_ratio(losses, step):  # |log(G_b / G_a)|, 0 when the weighted norms are equal
        norms = weighting.gradient_norms(losses, context(shared.parameters(), step=step))
        weights = weighting.task_weights()
        return abs(math.log(weights["b"] * norms[1].item() / (weights["a"] * norms[0].item())))

    ratios = []
    for step in range(120):
        hidden = torch.tanh(shared(x))
        losses = {"a": F.mse_loss(heads["a"](hidden)[:, 0], y[:, 0]),
                  "b": 100 * F.mse_loss(heads["b"](hidden)[:, 0], y[:, 1])}
        ratios.append(log_ratio(losses, step))
        weighting.backward(losses, context(shared.parameters(), step=step))
        model_optimizer.step(), weighting_optimizer.step()
        model_optimizer.zero_grad(), weighting_optimizer.zero_grad()
    # Adam's momentum overshoots once, then the ratio settles near 1 (about 1.5 here, from 187 at the start).
    assert math.exp(ratios[0]) > 100
    assert math.exp(sum(ratios[-30:]) / 30) < 2  # geometric mean of the ratio over the last 30 steps
    assert weighting.task_weights()["a"] > 10 * weighting.task_weights()["b"]


def test_famo_one_update_by_hand():
    # xi = (ln 3, 0): z = (0.75, 0.25).
    # Step 0, L = (2, 1): w = (z/L) / sum(z/L) = (0.375, 0.25) / 0.625 = (0.6, 0.4); no previous losses -> grad 0.
    # Step 1, L = (1, 1): w = z = (0.75, 0.25). delta = log L_prev - log L = (ln 2, 0); <z, delta> = 0.519860;
    #   grad xi = z (delta - <z,delta>) + gamma xi = (0.75*0.173287 + 0.01 ln 3, 0.25*(-0.519860))
    #           = (0.140951, -0.129965).
    # Adam's first step moves each coordinate by lr against the gradient's sign: xi = (ln 3 - 0.025, 0.025).
    weighting = build_weighting("famo", ["a", "b"], {"gamma": 0.01})
    with torch.no_grad():
        weighting.logits.copy_(torch.tensor([math.log(3), 0.0]))
    losses = leaf_losses({"a": 2.0, "b": 1.0})
    weighting.backward(losses, context())
    assert [losses[t].grad.item() for t in "ab"] == pytest.approx([0.6, 0.4])
    assert weighting.logits.grad.tolist() == [0.0, 0.0]
    weighting.logits.grad = None
    losses = leaf_losses({"a": 1.0, "b": 1.0})
    weighting.backward(losses, context(step=1))
    assert [losses[t].grad.item() for t in "ab"] == pytest.approx([0.75, 0.25])
    assert weighting.logits.grad.tolist() == pytest.approx([0.140951, -0.129965], abs=1e-6)
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.025)
    optimizer.step()
    assert weighting.logits.tolist() == pytest.approx([math.log(3) - 0.025, 0.025], abs=1e-6)


def test_dwa_records_one_row_per_optimiser_step_under_accumulation():
    # Two micro-batches per step: the step's row is their mean; the weights stay those of the history.
    weighting = build_weighting("dwa", ["a", "b"], {"window": 1, "temperature": 1.0})
    for step, micro_losses in enumerate([[(4, 2), (2, 2)], [(1, 2), (3, 2)], [(1, 1), (1, 1)]]):
        for micro, values in enumerate(micro_losses):
            losses = leaf_losses(dict(zip("ab", map(float, values))))
            weighting.backward(losses, context(step=step, micro_batch=micro, micro_batches=2))
    assert weighting.recorded.item() == 3
    # rows: step 0 (3, 2), step 1 (2, 2), step 2 (1, 1); ring of 2 holds steps 1 and 2.
    assert sorted(weighting.history.tolist()) == [[1.0, 1.0], [2.0, 2.0]]
    # the weights used in step 2 come from steps 0 and 1: r = (2/3, 1), w = 2 softmax(r)
    r = torch.tensor([2 / 3, 1.0])
    assert list(weighting.task_weights().values()) == pytest.approx((2 * torch.softmax(r, 0)).tolist(), abs=1e-6)
    assert weighting.pending.tolist() == [0.0, 0.0]
    assert "pending" not in weighting.state_dict()


def test_famo_updates_its_logits_once_per_optimiser_step_under_accumulation():
    # Step 0: micro-batches L = (2, 1), (4, 1): mean (3, 1), no previous losses, logits' gradient 0.
    # Step 1: micro-batches L = (1, 1), (2, 1): each weighted by its own losses; one gradient from
    #   previous (3, 1) and mean (1.5, 1), as a single batch with those losses would give.
    weighting = build_weighting("famo", ["a", "b"], {"gamma": 0.0})
    steps = [[(2.0, 1.0), (4.0, 1.0)], [(1.0, 1.0), (2.0, 1.0)]]
    for step, micro_losses in enumerate(steps):
        for micro, values in enumerate(micro_losses):
            losses = leaf_losses(dict(zip("ab", values)))
            weighting.backward(losses, context(step=step, micro_batch=micro, micro_batches=2))
            z = torch.tensor([0.5, 0.5])
            expected = (z / torch.tensor(values)) / (z / torch.tensor(values)).sum()
            assert [losses[t].grad.item() for t in "ab"] == pytest.approx(expected.tolist())
            if step == 0 or micro == 0:
                assert weighting.logits.grad is None or weighting.logits.grad.tolist() == [0.0, 0.0]
    expected = weighting.logit_gradient(torch.tensor([3.0, 1.0]), torch.tensor([1.5, 1.0]))
    assert weighting.logits.grad.tolist() == pytest.approx(expected.tolist(), abs=1e-7)
    assert weighting.previous_losses.tolist() == [1.5, 1.0]


def test_gradient_methods_average_over_processes_through_reduce_mean():
    calls = []

    def reduce_mean(tensor):
        calls.append(tuple(tensor.shape))
        return tensor

    theta, head = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    for method in ("pcgrad", "mgda"):
        calls.clear()
        losses = linear_losses(theta, {"a": (1.0, 0.0), "b": (0.0, 1.0)})
        losses["a"] = losses["a"] + head.sum()
        weighting = build_weighting(method, ["a", "b"])
        assert weighting.manual_gradients
        weighting.backward(losses, context([theta], reduce_mean=reduce_mean, head_parameters=[head]))
        assert (2, 2) in calls and (3,) in calls  # tasks x shared parameters, then the heads
    assert not build_weighting("equal", ["a"]).manual_gradients


# ------------------------------------------------------------------------------------------------ training
TASKS = {"t1": 3, "t2": 4, "t3": 2}
PARAMS = {"dwa": "weighting.params={window: 1}", "fixed": "weighting.params={weights: {ocnli: 2.0}}"}
LEARNED = {"uncertainty", "gradnorm", "dwa", "dtp", "famo", "mgda"}  # weights that move during training


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_through_the_trainer_and_resumes_exactly(tiny_config, tmp_path, method):
    """The real training step (`Trainer`), bf16: every task's loss and weight in every record,
    learned weights that move and others that stay, and a run interrupted at step 2 that ends
    where the straight one does."""
    config = tiny_config(f"weighting.method={method}", "train.steps=4", "train.eval_every=4",
                         "train.mixed_precision=bf16", *([PARAMS[method]] if method in PARAMS else []))
    straight = Trainer(config, tmp_path / "straight", show_progress=False)
    straight.train()
    Trainer(config, tmp_path / "resumed", show_progress=False).train(until_step=2)
    resumed = Trainer(config, tmp_path / "resumed", resume=True, show_progress=False)
    resumed.train()

    records = [m for m in RunFolder(tmp_path / "straight").metrics() if m["kind"] == "train"]
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    assert all(set(m["loss"]) == set(m["weights"]) == {"ocnli", "ocemotion", "tnews"} for m in records)
    assert all(m["loss"][t] > 0 and m["weights"][t] >= 0 for m in records for t in m["loss"])  # MGDA's may be 0
    assert (records[-1]["weights"] != records[0]["weights"]) == (method in LEARNED)
    for name, tensor in straight.unwrapped.state_dict().items():
        assert torch.equal(tensor, resumed.unwrapped.state_dict()[name]), name
    straight_log, resumed_log = (RunFolder(tmp_path / run).metrics(timings=False) for run in ("straight", "resumed"))
    assert straight_log == resumed_log
    if straight.weighting_optimizer is not None:  # the learned weights' Adam moments, too
        pairs = zip(straight.weighting_optimizer.state_dict()["state"].values(),
                    resumed.weighting_optimizer.state_dict()["state"].values())
        assert all(torch.equal(a[key], b[key]) for a, b in pairs for key in ("exp_avg", "exp_avg_sq"))
    straight_state, resumed_state = straight.weighting.state_dict(), resumed.weighting.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, tensor in straight_state.items():
        assert torch.equal(tensor, resumed_state[name]), name


@pytest.mark.parametrize("method, keys", [
    ("uncertainty", {"log_variances"}),
    ("gradnorm", {"weights", "initial_sum", "initial_count"}),
    ("dwa", {"history", "recorded", "weights"}),
    ("dtp", {"kpi", "observed", "weights"}),
    ("famo", {"logits", "min_losses", "previous_losses", "has_previous", "weights"}),
    ("mgda", {"weights"}),
])
def test_all_state_is_in_the_state_dict(tiny_config, tmp_path, method, keys):
    trainer = Trainer(tiny_config(f"weighting.method={method}", "train.steps=3", "train.eval_every=3",
                                  *([PARAMS[method]] if method in PARAMS else [])), tmp_path, show_progress=False)
    trainer.train()
    state = trainer.weighting.state_dict()
    assert set(state) == keys
    fresh = build_weighting(method, ["ocnli", "ocemotion", "tnews"], trainer.config.weighting.params)
    fresh.load_state_dict(state)
    assert trainer.weighting.task_weights() == fresh.task_weights()


@pytest.mark.parametrize("method, params", [
    ("dwa", {"window": 0}), ("dwa", {"temperature": 0}), ("dtp", {"kpi": "f1"}), ("famo", {"gamma": -1}),
    ("gradnorm", {"beta": 1}),
])
def test_bad_parameters_fail_loudly(method, params):
    with pytest.raises(ValueError):
        build_weighting(method, list(TASKS), params)


def test_the_gram_matrix_is_accumulated_in_float64():
    # a.b = 1e8 - 1 is exact in float64; float32 (24-bit mantissa) rounds it to 1e8
    task_grads = torch.tensor([[1e4, 1.0], [1e4, -1.0]], dtype=torch.float32)
    assert (task_grads @ task_grads.T)[0, 1].item() == 1e8
    gram = gram_matrix(task_grads, chunk=1)
    assert gram.dtype == torch.float64 and gram[0, 1].item() == 99_999_999.0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_steps_once_per_optimiser_step_under_accumulation(tiny_config, tmp_path, method):
    """Two micro-batches per step through the real trainer: histories, counts and moving averages
    advanced once per optimiser step, not per micro-batch."""
    trainer = Trainer(tiny_config(f"weighting.method={method}", "train.steps=3", "train.eval_every=3",
                                  "train.grad_accumulation=2", *([PARAMS[method]] if method in PARAMS else [])),
                      tmp_path, show_progress=False)
    trainer.train()
    records = [m for m in RunFolder(tmp_path).metrics() if m["kind"] == "train"]
    assert [m["step"] for m in records] == [1, 2, 3]
    assert all(w >= 0 for m in records for w in m["weights"].values())
    assert (records[-1]["weights"] != records[0]["weights"]) == (method in LEARNED)
    weighting = trainer.weighting
    counters = {"dwa": lambda: weighting.recorded.item(), "gradnorm": lambda: weighting.initial_count.item()}
    if method in counters:
        assert counters[method]() == 3
    for name, buffer in weighting.named_buffers():
        if name == "pending":  # a step's micro-batch sums: empty between steps
            assert buffer.abs().sum().item() == 0, name


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch_for_every_method(tiny_config, tiny_bert, tmp_path):
    """DDP over gloo, 2 x 12 rows a step, against one process taking the same 24 rows: every
    method's losses and weights agree step by step (a sum over processes where a mean belongs, or
    a statistic averaged per rank where the global one is meant, would not). Dropout is off, so
    the two runs compute the same functions of the same rows."""
    import json
    import shutil

    from forked import run_ranks

    from clue_mtl.config import save_config

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_bert, encoder)
    config_file = encoder / "config.json"
    settings = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**settings, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    methods = sorted(METHODS)

    def config(method: str, batch: int):
        return tiny_config(f"model.encoder={encoder}", "model.dropout=0.0", "train.steps=3", "train.eval_every=3",
                           f"train.batch_size={batch}", f"weighting.method={method}",
                           *([PARAMS[method]] if method in PARAMS else []))

    paths = []
    for method in methods:
        paths.append(tmp_path / f"{method}.yaml")
        save_config(config(method, 12), paths[-1])
    # two forks of this process (test_train.py launches its ranks with torch.distributed.run itself)
    result = run_ranks("ddp_worker", [*map(str, paths), str(tmp_path / "ddp")], port=29631, cwd=tmp_path,
                       timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in (tmp_path / "ddp").glob("rank*.json")]
    assert len(ranks) == 2 * len(methods) and {rank["world_size"] for rank in ranks} == {2}
    for number, method in enumerate(methods):
        single = Trainer(config(method, 24), tmp_path / f"single-{method}", show_progress=False)
        single.train()
        logs = [[(m["loss"], m["weights"]) for m in RunFolder(path).metrics() if m["kind"] == "train"]
                for path in (tmp_path / "ddp" / f"run{number}", tmp_path / f"single-{method}")]
        assert len(logs[0]) == len(logs[1]) == 3
        for (loss_two, weights_two), (loss_one, weights_one) in zip(*logs):
            for task in loss_one:
                assert loss_two[task] == pytest.approx(loss_one[task], rel=1e-3), (method, task)
                assert weights_two[task] == pytest.approx(weights_one[task], rel=1e-3, abs=1e-5), (method, task)


def test_famo_matches_the_official_update_given_the_same_losses():
    """The official FAMO code (Liu et al., github.com/Cranial-XIX/FAMO, `FAMO.get_weighted_loss`
    and `FAMO.update`, transcribed): the model's gradient from the weighted log losses, and the
    logits' gradient (autograd of the softmax against the change of log losses, plus Adam's
    weight decay gamma * w). The kit takes "before" from the previous step instead of a second
    forward pass of the same batch; given the same two loss vectors, both updates agree."""
    gamma, before, after = 0.01, torch.tensor([1.2, 0.7, 2.0]), torch.tensor([1.0, 0.69, 1.5])
    logits = torch.tensor([0.3, -0.2, 0.1])

    # official: loss = sum(log D * z / c), c = sum(z / D) detached; d/dw softmax(w) . delta + gamma w
    theta = nn.Parameter(torch.ones(3))
    z = torch.softmax(logits, -1)
    d = before * theta  # L_i = before_i * theta_i: grad_theta_i L_i = before_i
    (d.log() * z / (z / d).sum().detach()).sum().backward()
    official_model = theta.grad.clone()
    w = logits.clone().requires_grad_(True)
    delta = (before + 1e-8).log() - (after + 1e-8).log()
    (official_logits,) = torch.autograd.grad(torch.softmax(w, -1), w, grad_outputs=delta)
    official_logits = official_logits + gamma * logits

    weighting = build_weighting("famo", ["a", "b", "c"], {"gamma": gamma})
    with torch.no_grad():
        weighting.logits.copy_(logits)
    theta.grad = None
    weighting.backward({t: before[i] * theta[i] for i, t in enumerate("abc")}, context([theta]))
    assert theta.grad.tolist() == pytest.approx(official_model.tolist(), rel=1e-5)
    assert weighting.logit_gradient(before, after).tolist() == pytest.approx(official_logits.tolist(), rel=1e-5)
