import math

import pytest
import torch

import gatelab as gl
from gatelab.losses import TABLES, ExponentTable, translated_loss, voronoi_cells, voronoi_loss, wasserstein

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

# Truth: 2 experts in d = 1, blocks as in a softmax Gaussian MoE (last gate at zero).
TRUTH = {"beta1": T([[2.0], [0.0]]), "beta0": T([0.5, 0.0]), "a": T([[-1.0], [1.0]]),
         "b": T([1.0, -1.0]), "var": T([0.5, 0.25])}


def _estimate(**changes):
    est = {k: v.clone() for k, v in TRUTH.items()}
    est.update({k: T(v) for k, v in changes.items()})
    return est


def test_zero_at_the_truth():
    for table in (t for t, row in TABLES.items() if row.summed is None):
        res = voronoi_loss(TRUTH, TRUTH, table)
        assert res.total.item() == 0 and all(v.item() == 0 for v in res.blocks.values())


def test_d1_by_hand_exact_specified():
    est = _estimate(beta0=[0.6, 0.0], a=[[-1.1], [1.0]], b=[1.0, -0.8])
    res = voronoi_loss(est, TRUTH, "D1")
    # fitted masses on the truth's scale: exp(beta0) / sum exp(beta0) * (e^0.5 + e^0)
    scale = (math.exp(0.5) + 1) / (math.exp(0.6) + 1)
    m = [math.exp(0.6) * scale, scale]
    mass = abs(m[0] - math.exp(0.5)) + abs(m[1] - 1)
    atoms = m[0] * 0.1 + m[1] * 0.2   # |Delta a| of expert 1, |Delta b| of 2
    assert res.total.item() == pytest.approx(mass + atoms)
    assert res.mass.item() == pytest.approx(mass)
    # Per-block errors: one atom per cell, so each is that atom's distance; max over cells.
    assert res.blocks["a"].item() == pytest.approx(0.1) and res.blocks["b"].item() == pytest.approx(0.2)
    assert res.cells.tolist() == [0, 1]


def test_d2_softmax_by_hand_over_specified():
    # Three fitted experts: two split the first true atom, one sits on the second.
    est = {"beta1": T([[2.1], [1.9], [0.0]]), "beta0": T([math.log(0.8), math.log(0.9), 0.0]),
           "a": T([[-1.0], [-0.8], [1.0]]), "b": T([1.2, 1.0, -1.0]), "var": T([0.5, 0.6, 0.25])}
    res = voronoi_loss(est, TRUTH, "D2-softmax")
    assert res.cells.tolist() == [0, 0, 1]
    scale = (math.exp(0.5) + 1) / (0.8 + 0.9 + 1)   # fitted masses on the truth's scale
    mass = abs((0.8 + 0.9) * scale - math.exp(0.5)) + abs(scale - 1)
    # Cell of size 2: rbar = 4, so beta1 and b get 4, a and var get 2.
    first = 0.8 * scale * (0.1 ** 4 + 0.0 ** 2 + 0.2 ** 4 + 0.0 ** 2)
    second = 0.9 * scale * (0.1 ** 4 + 0.2 ** 2 + 0.0 ** 4 + 0.1 ** 2)
    assert res.total.item() == pytest.approx(mass + first + second)
    # Cell 0's mass-weighted mean |Delta a| = (0.8 * 0 + 0.9 * 0.2) / 1.7; cell 1's is 0.
    assert res.blocks["a"].item() == pytest.approx(0.9 * 0.2 / 1.7)
    assert res.blocks["var"].item() == pytest.approx(0.9 * 0.1 / 1.7)


def test_d2_laplace_by_hand_over_specified():
    """MODELS.md: in the Laplace Gaussian MoE (arXiv 2402.03226) W and a get exponent 2,
    b gets rbar and the variance rbar/2, in a cell of more than one fitted atom."""
    truth = {"W": T([[0.0], [1.0]]), "beta0": T([0.5, 0.0]), "a": T([[-1.0], [1.0]]),
             "b": T([1.0, -1.0]), "var": T([0.5, 0.25])}
    est = {"W": T([[0.1], [0.0], [1.0]]), "beta0": T([math.log(0.8), math.log(0.9), 0.0]),
           "a": T([[-1.0], [-0.7], [1.0]]), "b": T([1.2, 1.0, -1.0]), "var": T([0.5, 0.6, 0.25])}
    res = voronoi_loss(est, truth, "D2-laplace")
    assert res.cells.tolist() == [0, 0, 1]
    scale = (math.exp(0.5) + 1) / (0.8 + 0.9 + 1)
    mass = abs((0.8 + 0.9) * scale - math.exp(0.5)) + abs(scale - 1)
    # Cell of size 2, rbar = 4: |dW|^2, |da|^2, |db|^4, |dvar|^2.
    first = 0.8 * scale * (0.1 ** 2 + 0.0 ** 2 + 0.2 ** 4 + 0.0 ** 2)
    second = 0.9 * scale * (0.0 ** 2 + 0.3 ** 2 + 0.0 ** 4 + 0.1 ** 2)
    assert res.total.item() == pytest.approx(mass + first + second, rel=1e-12)


def test_the_mass_term_ignores_a_common_shift_of_the_intercepts():
    """An exact split of the last true atom over the last two fitted experts: the gate is
    the truth's, whatever constant is added to every intercept, so the loss is 0; pinning
    the last fitted intercept at 0 (the truth's convention) would double that atom's mass."""
    half = math.log(0.5)
    est = {"beta1": T([[2.0], [0.0], [0.0]]), "a": T([[-1.0], [1.0], [1.0]]),
           "b": T([1.0, -1.0, -1.0]), "var": T([0.5, 0.25, 0.25])}
    for shift in (0.0, -half, 3.0):
        est["beta0"] = T([0.5, half, half]) + shift
        res = voronoi_loss(est, TRUTH, "D2-softmax")
        assert res.cells.tolist() == [0, 1, 1]
        assert res.total.item() == pytest.approx(0.0, abs=1e-12)


def test_a_diverged_gate_gives_a_defined_loss_not_nan():
    # An intercept run off to +inf: expert 0 takes all the mass, a finite mass error.
    res = voronoi_loss(_estimate(beta0=[1000.0, 0.0]), TRUTH, "D1")
    m_true = [math.exp(0.5), 1.0]
    assert res.mass.item() == pytest.approx(abs(sum(m_true) - m_true[0]) + m_true[1])
    # A gate slope run off to infinity: an infinite loss, also for the atom left no mass.
    for beta0 in ([0.0, 0.0], [1000.0, 0.0]):
        res = voronoi_loss(_estimate(beta0=beta0, beta1=[[2.0], [float("inf")]]), TRUTH, "D1")
        assert res.total.item() == float("inf") and res.blocks["beta1"].item() == float("inf")


def test_d2_laplace_and_strong_tables():
    assert TABLES["D2-laplace"].exponent("W", 3) == 2.0
    assert TABLES["D2-laplace"].exponent("b", 3) == 6.0
    assert TABLES["D2-laplace"].exponent("var", 2) == 2.0
    assert TABLES["D2-strong"].exponent("kappa1", 5) == 2.0
    assert TABLES["D2-softmax"].exponent("a", 1) == 1.0
    # a hierarchical gate's prefixed blocks take the rows of their bare names
    assert TABLES["D2-softmax"].exponent("inner.beta1", 2) == 4.0
    assert TABLES["D2-laplace"].exponent("inner.W", 3) == 2.0
    own = ExponentTable("own", "example", shared={"inner.W": 3.0, "W": 2.0})
    assert own.exponent("inner.W", 2) == 3.0 and own.exponent("outer.W", 2) == 2.0


def test_a_new_paper_is_a_new_table_row():
    table = ExponentTable("mine", "example", shared={"a": "3*rbar", "b": 1.5}, rbar={2: 4.0})
    assert table.exponent("a", 2) == 12.0 and table.exponent("b", 2) == 1.5
    est = {k: torch.cat([v[:1], v]) for k, v in TRUTH.items()}
    est["a"] = T([[-1.1], [-0.9], [1.0]])
    est["beta0"] = T([0.0, 0.0, 0.0])
    res = voronoi_loss(est, TRUTH, table)
    assert res.cells.tolist() == [0, 0, 1]


def test_missing_rbar_is_an_error_with_a_fix():
    est = {k: torch.cat([v[:1]] * 4 + [v[1:]]) for k, v in TRUTH.items()}
    with pytest.raises(ValueError, match="rbar only for cells of size \\[2, 3\\]; a cell has 4"):
        voronoi_loss(est, TRUTH, "D2-softmax")
    with pytest.raises(ValueError, match="Unknown loss table 'D3'. Valid names: D1, D2-laplace"):
        voronoi_loss(TRUTH, TRUTH, "D3")


def test_batched_equals_loop_and_label_switching_does_not_matter():
    g = torch.Generator().manual_seed(0)
    est = {k: v + 0.1 * torch.randn((5, 3, *v.shape[1:]), generator=g, dtype=v.dtype)
           if k != "beta0" else torch.randn(5, 3, generator=g, dtype=v.dtype)
           for k, v in {k: torch.cat([v[:1], v]) for k, v in TRUTH.items()}.items()}
    est["var"] = est["var"].abs()
    batched = voronoi_loss(est, TRUTH, "D2-softmax")
    perm = torch.tensor([2, 0, 1])
    for r in range(5):
        one = voronoi_loss({k: v[r] for k, v in est.items()}, TRUTH, "D2-softmax")
        torch.testing.assert_close(batched.total[r], one.total)
        permuted = voronoi_loss({k: v[r][perm] for k, v in est.items()}, TRUTH, "D2-softmax")
        torch.testing.assert_close(permuted.total, one.total)


def test_cells_by_nearest_atom():
    cells = voronoi_cells(T([[0.0], [0.9], [2.2], [5.0]]), T([[0.0], [1.0], [2.0]]))
    assert cells.tolist() == [0, 1, 2, 2]


def test_sigmoid_masses():
    est = _estimate(beta0=[0.0, 0.0])
    res = voronoi_loss(est, TRUTH, "D1", model=gl.MoERegression(2, 1, "sigmoid"))
    assert res.mass.item() == pytest.approx(abs(0.5 - 1 / (1 + math.exp(-0.5))))


def test_wasserstein_by_hand():
    pytest.importorskip("scipy")
    assert wasserstein(TRUTH, TRUTH).item() == pytest.approx(0.0, abs=1e-12)
    # Equal masses, atoms moved by 0.1 and 0.3 in one block: W1 = (0.1 + 0.3) / 2.
    truth = {"beta0": T([0.0, 0.0]), "a": T([[0.0], [10.0]])}
    est = {"beta0": T([0.0, 0.0]), "a": T([[0.1], [10.3]])}
    assert wasserstein(est, truth).item() == pytest.approx(0.2)
    assert wasserstein(est, truth, order=2).item() == pytest.approx(math.sqrt((0.01 + 0.09) / 2))
    # Batched: one value per replicate.
    both = {k: torch.stack([v, truth[k]]) for k, v in est.items()}
    torch.testing.assert_close(wasserstein(both, truth), T([0.2, 0.0]), atol=1e-9, rtol=0)


def test_a_cell_beyond_the_table_raises_or_gives_an_infinite_loss():
    truth = {"beta1": torch.tensor([[1.0], [-1.0]]), "beta0": torch.tensor([0.0, 0.0]),
             "a": torch.tensor([[0.0], [5.0]]), "b": torch.tensor([0.0, 0.0]),
             "var": torch.tensor([1.0, 1.0])}
    # Four fitted atoms all nearest the first true atom: rbar(4) is not in D2-softmax.
    est = {"beta1": torch.tensor([[[1.0], [1.1], [0.9], [1.2]], [[1.0], [-1.0], [1.0], [-1.0]]]),
           "beta0": torch.zeros(2, 4),
           "a": torch.tensor([[[0.1], [0.2], [0.0], [0.3]], [[0.1], [5.0], [0.0], [5.1]]]),
           "b": torch.zeros(2, 4), "var": torch.ones(2, 4)}
    with pytest.raises(ValueError, match="rbar only for cells of size"):
        voronoi_loss(est, truth, "D2-softmax")
    loss = voronoi_loss(est, truth, "D2-softmax", strict=False)
    assert math.isinf(float(loss.total[0])) and math.isfinite(float(loss.total[1]))


# Sigmoid-gated ReLU FFN experts in d = 1 (arXiv 2405.13997), for the cell-sum table.
SIGMOID = gl.MoERegression(2, 1, "sigmoid", "ffn")
FFN_TRUTH = {"beta1": T([[1.0], [-1.0]]), "beta0": T([0.5, 0.0]), "kappa1": T([[0.6], [-0.8]]),
             "kappa0": T([0.8, 0.6]), "kappa2": T([1.5, -2.0]), "nu": T(0.01)}


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_cell_sum_loss_is_zero_when_a_split_output_scale_adds_up():
    # The fit the sigmoid study finds: expert 1 twice with kappa2 split 0.5 / 1.0, so the
    # regression function is the truth's. The mass table scores it as far off; cell sums do not.
    est = {"beta1": T([[1.0], [1.0], [-1.0]]), "beta0": T([0.5, 0.5, 0.0]),
           "kappa1": T([[0.6], [0.6], [-0.8]]), "kappa0": T([0.8, 0.8, 0.6]),
           "kappa2": T([0.5, 1.0, -2.0]), "nu": T(0.01)}
    model = gl.MoERegression(3, 1, "sigmoid", "ffn")
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).unsqueeze(-1)
    torch.testing.assert_close(model.predict(x, est), SIGMOID.predict(x, FFN_TRUTH))
    summed = voronoi_loss(est, FFN_TRUTH, "D2-sigmoid", model=model, truth_model=SIGMOID)
    assert summed.total.item() == pytest.approx(0.0, abs=1e-12)
    plain = voronoi_loss(est, FFN_TRUTH, "D2-strong", model=model, truth_model=SIGMOID)
    assert plain.mass.item() == pytest.approx(_sig(0.5))   # two full masses for one atom
    assert plain.total.item() > 0.5


def test_cell_sum_loss_by_hand_over_specified():
    # Two experts share true atom 1 (kappa2 split 0.7 / 0.9, beta1 off by 0.1 and 0.2, the
    # second's beta0 off by 0.1); one sits on atom 2 with kappa0 off by 0.05.
    est = {"beta1": T([[1.1], [0.8], [-1.0]]), "beta0": T([0.5, 0.6, 0.0]),
           "kappa1": T([[0.6], [0.6], [-0.8]]), "kappa0": T([0.8, 0.8, 0.65]),
           "kappa2": T([0.7, 0.9, -2.0]), "nu": T(0.01)}
    model = gl.MoERegression(3, 1, "sigmoid", "ffn")
    res = voronoi_loss(est, FFN_TRUTH, "D2-sigmoid", model=model, truth_model=SIGMOID)
    assert res.cells.tolist() == [0, 0, 1]
    s1, s2, s3 = 0.7 * _sig(0.5), 0.9 * _sig(0.6), -2.0 * _sig(0.0)
    cell_sums = abs(s1 + s2 - 1.5 * _sig(0.5)) + abs(s3 - (-2.0 * _sig(0.0)))
    # Cell 1 has two experts: exponent 2 on beta1, beta0, kappa1, kappa0; weights |m_i c_i|.
    shared = s1 * 0.1 ** 2 + s2 * (0.2 ** 2 + 0.1 ** 2)
    single = abs(s3) * 0.05                     # one expert: exponent 1
    assert res.mass.item() == pytest.approx(cell_sums)
    assert res.total.item() == pytest.approx(cell_sums + shared + single)
    # Per block, the worst cell's |m c|-weighted mean error.
    assert res.blocks["beta1"].item() == pytest.approx((s1 * 0.1 + s2 * 0.2) / (s1 + s2))
    assert res.blocks["beta0"].item() == pytest.approx(s2 * 0.1 / (s1 + s2))
    assert res.blocks["kappa0"].item() == pytest.approx(0.05)
    assert "kappa2" not in res.blocks


def test_cell_sum_loss_ignores_an_expert_with_no_output():
    # A third expert with kappa2 = 0 adds nothing to f, whatever its other parameters.
    est = {"beta1": T([[1.0], [-1.0], [7.0]]), "beta0": T([0.5, 0.0, 3.0]),
           "kappa1": T([[0.6], [-0.8], [0.0]]), "kappa0": T([0.8, 0.6, -1.0]),
           "kappa2": T([1.5, -2.0, 0.0]), "nu": T(0.01)}
    model = gl.MoERegression(3, 1, "sigmoid", "ffn")
    res = voronoi_loss(est, FFN_TRUTH, "D2-sigmoid", model=model, truth_model=SIGMOID)
    assert res.total.item() == pytest.approx(0.0, abs=1e-12)
    assert all(v.item() == pytest.approx(0.0, abs=1e-12) for v in res.blocks.values())


def test_cell_sum_loss_needs_absolute_masses_and_an_output_scale():
    softmax = gl.MoERegression(2, 1, "softmax", "ffn")
    with pytest.raises(ValueError, match="relative"):
        voronoi_loss(FFN_TRUTH, FFN_TRUTH, "D2-sigmoid", model=softmax)
    linear = gl.MoERegression(2, 1, "sigmoid")
    truth = {"beta1": T([[1.0], [-1.0]]), "beta0": T([0.5, 0.0]), "a": T([[1.0], [2.0]]),
             "b": T([0.0, 1.0]), "nu": T(0.01)}
    with pytest.raises(ValueError, match="kappa2"):
        voronoi_loss(truth, truth, "D2-sigmoid", model=linear)


# --- the loss minimised over the common translation of the gate parameters -----------------

def _shifted(est, t0=0.0, t1=0.0):
    return {**est, "beta0": est["beta0"] + t0, "beta1": est["beta1"] + t1}


def test_translated_d1_by_hand():
    # beta1 off by 0.2 on the first (heavier) expert only. The best t1 is the weighted
    # median of the gaps, -0.2, which moves the 0.2 onto the lighter second expert; the
    # masses are s * softmax(1, 0) * (e^.5 + 1), s the best of the kinks m*_j / S_j and 1.
    est = _estimate(beta0=[0.5 + 0.5, 0.0], beta1=[[2.2], [0.0]])
    plain = voronoi_loss(est, TRUTH, "D1")
    res = translated_loss(est, TRUTH, "D1", shift_blocks=["beta1"])
    base = torch.softmax(T([1.0, 0.0]), 0) * (math.exp(0.5) + 1)
    m_true = T([math.exp(0.5), 1.0])
    best = min(float((s * base - m_true).abs().sum() + s * base[1] * 0.2)
               for s in (m_true / base).tolist() + [1.0])
    assert res.total.item() == pytest.approx(best, rel=1e-9)
    assert res.total.item() < plain.total.item()
    assert res.mass.item() == pytest.approx(res.total.item() - 0.2 * float(
        res.cell_masses[1]), rel=1e-9)


def _brute_force(est, table, ts, ss):
    """min over a grid of (t1, s) of the pinned loss of the shifted, rescaled estimate."""
    rel = torch.softmax(est["beta0"], -1) * TRUTH["beta0"].exp().sum()
    grid = {k: v.expand(len(ts), len(ss), *v.shape) for k, v in est.items()}
    grid["beta1"] = grid["beta1"] + ts[:, None, None, None]
    return float(voronoi_loss(grid, TRUTH, table, mass=ss[None, :, None] * rel).total.min())


@pytest.mark.parametrize("table,rows", [("D1", [0, 1]), ("D2-softmax", [0, 1, 1]),
                                        ("D2-softmax", [0, 0, 1, 1])])
def test_translated_loss_is_the_minimum_over_a_grid_of_translations(table, rows):
    # Exact-specified D1 (its optimum sits where one atom's gap closes); the last true atom
    # split by the last two experts (the case pinning gets wrong); every cell split, where
    # the optimum lies between the aligning translations and only the search finds it.
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        est = {k: TRUTH[k][rows] + 0.15 * torch.randn(TRUTH[k][rows].shape, generator=g,
                                                      dtype=torch.float64) for k in TRUTH}
        est["var"] = est["var"].abs()
        est = {**est, "beta0": est["beta0"] - est["beta0"][-1], "beta1": est["beta1"] - est["beta1"][-1]}
        res = translated_loss(est, TRUTH, table, shift_blocks=["beta1"])
        grid = _brute_force(est, table, torch.linspace(-0.6, 0.6, 601), torch.linspace(0.6, 1.6, 501))
        assert res.total.item() <= grid + 1e-9
        assert res.total.item() >= grid - 0.01 * grid   # the grid's resolution
        assert res.total.item() <= voronoi_loss(est, TRUTH, table).total.item()


def test_translated_loss_does_not_see_a_common_shift_of_the_gate():
    g = torch.Generator().manual_seed(5)
    est = {k: TRUTH[k][[0, 1, 1]] + 0.2 * torch.randn(TRUTH[k][[0, 1, 1]].shape, generator=g,
                                                      dtype=torch.float64) for k in TRUTH}
    est["var"] = est["var"].abs()
    base = translated_loss(est, TRUTH, "D2-softmax", shift_blocks=["beta1"]).total
    for t0, t1 in [(0.7, -0.4), (-2.0, 1.3)]:
        moved = _shifted(est, t0, t1)
        assert voronoi_loss(moved, TRUTH, "D2-softmax").total != pytest.approx(
            voronoi_loss(est, TRUTH, "D2-softmax").total)
        again = translated_loss(moved, TRUTH, "D2-softmax", shift_blocks=["beta1"]).total
        assert again.item() == pytest.approx(base.item(), rel=1e-6)


def test_translated_loss_batched_equals_looped():
    g = torch.Generator().manual_seed(7)
    est = {k: TRUTH[k][[0, 0, 1]] + 0.2 * torch.randn(4, *TRUTH[k][[0, 0, 1]].shape, generator=g,
                                                      dtype=torch.float64) for k in TRUTH}
    est["var"] = est["var"].abs()
    est["beta1"][1, 2] = float("inf")              # a run-off replicate stays infinite
    batched = translated_loss(est, TRUTH, "D2-softmax", shift_blocks=["beta1"], strict=False)
    assert torch.isinf(batched.total[1])
    for r in (0, 2, 3):
        one = translated_loss({k: v[r] for k, v in est.items()}, TRUTH, "D2-softmax",
                                 shift_blocks=["beta1"])
        assert batched.total[r].item() == pytest.approx(one.total.item(), rel=1e-9)
        assert batched.cells[r].tolist() == one.cells.tolist()


def test_a_sigmoid_gate_has_no_translation_and_a_quadratic_gate_shifts_a_and_beta1():
    assert gl.MoERegression(2, 1, "sigmoid").gate.translations(2, 1) == {}
    assert gl.MoERegression(2, 1, "softmax").gate.translations(2, 1) == {"beta1": (1, 1)}
    assert gl.MoERegression(2, 2, "quadratic").gate.translations(2, 2) == {"A": (1, 2, 2),
                                                                           "beta1": (1, 2)}
    assert gl.MoERegression(2, 2, "quadratic_monomial").gate.translations(2, 2) == {"A": (1, 2, 2)}


def test_a_hierarchical_gate_is_translated_group_by_group():
    """Each group's inner softmax is invariant to its own shift of inner.beta1: the
    translated loss does not see a different shift per group, the pinned loss does."""
    from gatelab.fit.init import near_truth_starts
    from gatelab.studies import catalogue
    from gatelab.studies.runner import translation_blocks
    study = catalogue.get("hierarchical-over")
    setting = next(s for s in study.settings if s.name == "SS over")
    model, truth = study.fitted_model(setting), study.truth_params(setting, 1000)
    shifts = translation_blocks(model, setting)
    assert shifts == {"inner.beta1": (2, 1, 1)}
    g = torch.Generator().manual_seed(2)
    est = model.normalise({k: v[0] for k, v in near_truth_starts(model, truth, 30, 1, g).items()})
    options = {"model": model, "truth_model": study.truth_model(setting)}
    pinned = voronoi_loss(est, truth, "D2-softmax", **options).total
    base = translated_loss(est, truth, "D2-softmax", shift_blocks=shifts, **options).total
    assert base <= pinned
    moved = {**est, "inner.beta1": est["inner.beta1"] + T([[[0.8]], [[-1.5]]])}
    assert voronoi_loss(moved, truth, "D2-softmax", **options).total > 1.5 * pinned
    again = translated_loss(moved, truth, "D2-softmax", shift_blocks=shifts, **options).total
    assert again.item() == pytest.approx(base.item(), rel=1e-6)
    # naming the block alone, the model's gate supplies its per-group shift
    named = translated_loss(moved, truth, "D2-softmax", shift_blocks=["inner.beta1"], **options).total
    assert named.item() == pytest.approx(again.item(), rel=1e-12)
