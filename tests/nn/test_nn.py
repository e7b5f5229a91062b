"""gatelab.nn: routers against a slow per-token reference, dispatch against a naive loop
over experts, capacity dropping, auxiliary losses by hand, gradients by finite
differences, and bad input."""

import math

import pytest
import torch

import gatelab as gl
import gatelab.nn as gn
import reference as ref
from cases import cases

D, E = 5, 8
f64 = torch.float64


def _x(t=11, dim=D, seed=0):
    return torch.randn(t, dim, generator=torch.Generator().manual_seed(seed), dtype=f64)


def _randomise(module, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
        for b in module.buffers():
            if b.is_floating_point() and b.dim() > 0:
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
    return module


ROUTER_CASES = {
    "mixtral": lambda: gn.Router(D, E, 2),
    "softmax-no-renorm": lambda: gn.Router(D, E, 3, renormalize=False),
    "topk-then-softmax": lambda: gn.Router(D, E, 2, order="topk_softmax", bias=True),
    "deepseek-sigmoid-groups": lambda: gn.Router(
        D, E, 2, "sigmoid", selection_bias=True, n_groups=2, topk_groups=1, scaling=2.5),
    "sigmoid-no-renorm": lambda: gn.Router(D, E, 3, "sigmoid", renormalize=False),
    "cosine-xmoe": lambda: gn.Router(D, E, 2, "cosine", proj_dim=3, temperature=0.3,
                                     learn_temperature=True),
    "cosine-x-side": lambda: gn.Router(D, E, 2, "cosine", unit_beta=False),
    "perturbed-cosine": lambda: gn.Router(D, E, 2, "perturbed_cosine", tau1=0.2, tau2=0.3),
    "laplace": lambda: gn.Router(D, E, 2, "laplace", bias=True, expanded=True),
    "gaussian": lambda: gn.Router(D, E, 1, "gaussian", expanded=True),
    "quadratic-low-rank": lambda: gn.Router(D, E, 2, "quadratic", rank=2),
    "hierarchical": lambda: gn.Router(D, E, 3, gl.HierarchicalGate(
        outer=gl.make_gate("softmax"), inner=gl.make_gate("laplace"), n_groups=2, n_inner=4),
        order="topk_softmax", bias=True),
}


def _router(case):
    return _randomise(ROUTER_CASES[case]().double())


def _reference_routing(router, x):
    """One token at a time, in plain Python: logits, selection, weights."""
    p = {k: v.detach() for k, v in router.scores.params().items()}
    rows = x.tolist()
    if router.proj is not None:
        w = router.proj.weight.tolist()
        rows = [[sum(a * b for a, b in zip(wr, row)) for wr in w] for row in rows]
    gate = router.gate
    if isinstance(gate, gl.HierarchicalGate):
        logits = [[math.log(v) for v in r] for r in ref.gate_weights(gate, rows, p)]
    else:
        logits = ref.gate_scores(gate, rows, p)
    tau = 1.0 if router.temperature is None else float(router.temperature.detach())
    bias = [0.0] * E if router.selection_bias is None else router.selection_bias.tolist()
    return [_select(router, [s / tau for s in row], bias) for row in logits]


def _select(router, logits, bias):
    if router.sigmoid:
        probs = [1 / (1 + math.exp(-s)) for s in logits]
    else:
        z = sum(math.exp(s) for s in logits)
        probs = [math.exp(s) / z for s in logits]
    by_logit = router.order == "topk_softmax" and not router.sigmoid
    choice = [(logits if by_logit else probs)[e] + bias[e] for e in range(E)]
    size = E // router.n_groups
    groups = sorted(range(router.n_groups), key=lambda g: -sum(
        sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]))[:router.topk_groups]
    allowed = [e for e in range(E) if e // size in groups]
    top = sorted(allowed, key=lambda e: -choice[e])[:router.top_k]
    if by_logit:
        z = sum(math.exp(logits[e]) for e in top)
        w = {e: math.exp(logits[e]) / z for e in top}
    else:
        total = sum(probs[e] for e in top) if router.renormalize else 1.0
        w = {e: probs[e] / total for e in top}
    return {e: v * router.scaling for e, v in w.items()}


@cases(ROUTER_CASES)
def test_router_matches_slow_per_token_reference(case):
    router = _router(case)
    x = _x()
    r = router(x)
    want = _reference_routing(router, x)
    got = [{} for _ in want]
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist()):
        got[t][e] = w
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        assert [g[e] for e in sorted(g)] == pytest.approx([w[e] for e in sorted(w)], rel=1e-12)


@cases(ROUTER_CASES)
def test_gradients_through_every_router_match_finite_differences(case):
    router = _router(case)
    x = _x(6)
    params = [p.detach().clone().requires_grad_() for n, p in router.named_parameters()]
    assert params
    torch.autograd.gradcheck(lambda x_, *ps: _with_params(router, x_, ps),
                             (x.clone().requires_grad_(), *params), eps=1e-6, atol=1e-6)


def _with_params(router, x, params):
    """Call ``router`` with its parameters replaced by ``params`` (functional call)."""
    names = [n for n, _ in router.named_parameters()]
    r = torch.func.functional_call(router, dict(zip(names, params)), (x,))
    return r.weight, r.probs


# --- dispatch, experts and capacity ------------------------------------------------

def _layer(**kw):
    return _randomise(gn.MoELayer(D, 7, E, **{"top_k": 2, **kw}).double(), std=0.4)


def _naive(layer, x, keep=None):
    """Loop over tokens and their experts, each expert applied on its own."""
    r = layer.router(x)
    out = torch.zeros_like(x)
    for s, (t, e, w) in enumerate(zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight)):
        if keep is None or keep[s]:
            out[t] = out[t] + w * layer.experts.expert(e, x[t:t + 1])[0]
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


@pytest.mark.parametrize("kw", [{}, {"expert": "gelu"}, {"n_shared": 1, "shared_gate": True},
                                {"router": "laplace", "top_k": 3, "expanded": True},
                                {"expert": "swiglu", "activation": "gelu_tanh", "top_k": 1}],
                         ids=["swiglu", "gelu", "shared", "laplace-top3", "top1"])
def test_dispatch_matches_naive_loop_over_experts_with_gradients(kw):
    layer = _layer(**kw)
    x = _x(13).reshape(13, D).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    got = layer(x).output
    want = _naive(layer, x2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    params = list(layer.parameters())
    grads = torch.autograd.grad((got * g).sum(), [x, *params], allow_unused=True)
    grads_naive = torch.autograd.grad((want * g).sum(), [x2, *params], allow_unused=True)
    for a, b in zip(grads, grads_naive):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_layer_keeps_batch_shape_and_counts_assignments():
    layer = _layer()
    x = _x(12).reshape(3, 4, D)
    out = layer(x)
    assert out.output.shape == x.shape
    assert int(out.expert_counts.sum()) == 12 * 2
    assert out.dropped == 0
    torch.testing.assert_close(out.output.reshape(12, D), _naive(layer, x.reshape(12, D)))


def test_capacity_drops_exactly_the_later_tokens_of_full_experts():
    layer = _layer(capacity_factor=0.5)
    x = _x(20)
    r = layer.router(x)
    capacity = layer.capacity(r.expert_index.numel())
    assert capacity == math.ceil(0.5 * 40 / E)
    seen, keep = {}, []
    for e in r.expert_index.tolist():  # token-major order: earliest tokens first
        seen[e] = seen.get(e, 0) + 1
        keep.append(seen[e] <= capacity)
    out = layer(x)
    assert out.dropped == keep.count(False) > 0
    torch.testing.assert_close(out.output, _naive(layer, x, keep), rtol=1e-12, atol=1e-12)


def test_grouped_linear_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 3, generator=g, dtype=f64, requires_grad=True)
    w = torch.randn(4, 2, 3, generator=g, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gn.grouped_linear(a, b, [2, 0, 4, 1]), (x, w))


def test_expert_choice_fills_every_expert_with_its_best_tokens():
    router = _randomise(gn.ExpertChoiceRouter(D, 4, capacity_factor=1.5).double())
    x = _x(10)
    r = router(x)
    capacity = math.ceil(1.5 * 10 / 4)
    assert torch.equal(torch.bincount(r.expert_index), torch.full((4,), capacity))
    for e in range(4):
        chosen = set(r.token_index[r.expert_index == e].tolist())
        best = set(r.probs[:, e].argsort(descending=True)[:capacity].tolist())
        assert chosen == best
    layer = gn.MoELayer(D, 6, 4, router=router).double()
    _randomise(layer.experts)
    torch.testing.assert_close(layer(x).output, _naive(layer, x))


def test_auxiliary_loss_free_bias_moves_load_towards_the_mean():
    router = gn.Router(D, 4, 1, "sigmoid", selection_bias=True)
    router.update_bias(torch.tensor([10, 2, 4, 0]), rate=0.1)
    torch.testing.assert_close(router.selection_bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))  # mean load 4
    with pytest.raises(ValueError, match="selection_bias=True"):
        gn.Router(D, 4, 1).update_bias(torch.ones(4))


# --- auxiliary losses by hand -----------------------------------------------------

def test_load_balancing_loss_by_hand_in_both_conventions():
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    # top-1, both tokens on expert 0: f = (1, 0), P = (0.625, 0.375): L = 2 * 0.625
    assert float(gn.load_balancing_loss(probs, torch.tensor([2, 0]), 1)) == pytest.approx(1.25)
    counts = torch.tensor([2, 2])  # top-2: every token uses both experts
    assert float(gn.load_balancing_loss(probs, counts, 2, "switch")) == pytest.approx(1.0)
    assert float(gn.load_balancing_loss(probs, counts, 2, "hf")) == pytest.approx(2.0)


def test_load_balancing_hf_convention_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(logits.softmax(-1).topk(2).indices.reshape(-1), minlength=6)
    ours = gn.load_balancing_loss(logits.softmax(-1), counts, 2, "hf")
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), 6, 2))
    assert transformers.__version__.startswith("5.")


def test_z_loss_cv_squared_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert float(gn.z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    assert float(gn.cv_squared(torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx(0.25)
    assert float(gn.load_loss(torch.tensor([3, 3, 3]))) == 0.0
    confident = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(gn.entropy_loss(confident)) == pytest.approx(-math.log(2))
    assert float(gn.entropy_loss(torch.full((2, 2), 0.5))) == pytest.approx(0.0, abs=1e-7)
    weights = torch.tensor([[0.5, 0.0], [1.0, 0.5]])
    assert float(gn.importance_loss(weights)) == pytest.approx(0.5 / (1.0 + 1e-10))


def test_layer_reports_the_losses_it_is_asked_for():
    layer = _layer(aux={"load_balance": 0.5, "z_loss": 2.0, "importance": 1.0, "load": 0.0,
                        "entropy": 1.0})
    out = layer(_x(9))
    aux = out.aux_losses
    assert set(aux) == {"load_balance", "z_loss", "importance", "load", "entropy"}
    want = 0.5 * aux["load_balance"] + 2.0 * aux["z_loss"] + aux["importance"] + aux["entropy"]
    torch.testing.assert_close(out.aux_loss, want)
    torch.testing.assert_close(aux["z_loss"], gn.z_loss(out.router_logits))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_top_k_gate_routes_as_it_weighs_in_the_models(k):
    """A router over the catalogue's top-K gate gives each token the gate's own weights:
    its k experts are the nonzero entries of gate.weights(x), with the same values."""
    gate = gl.make_gate("topk", top_k=k)
    router = _randomise(gn.Router(D, E, gate=gate, bias=True).double())
    assert (router.top_k, router.order) == (k, "topk_softmax")
    x = _x()
    routing = router(x)
    dense = gate.weights(x, {n: p.detach() for n, p in router.scores.params().items()})
    sparse = torch.zeros_like(dense)
    sparse[routing.token_index, routing.expert_index] = routing.weight.detach()
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
    assert bool(((dense > 0).sum(-1) == k).all())


# --- bad input ----------------------------------------------------------------------

def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="top_k <= n_experts"):
        gn.MoELayer(D, 7, 4, top_k=5)
    with pytest.raises(ValueError, match="hidden size 5"):
        _layer()(torch.randn(3, 6, dtype=f64))
    with pytest.raises(ValueError, match="Unknown gate 'sofmax'"):
        gn.MoELayer(D, 7, 4, router="sofmax")
    with pytest.raises(ValueError, match="n_groups=3 must divide"):
        gn.Router(D, 8, 2, n_groups=3)
    with pytest.raises(ValueError, match="differs from its gate's top_k=2"):
        gn.Router(D, 8, 3, gl.make_gate("topk", top_k=2))
    with pytest.raises(ValueError, match="top-K sparse softmax"):
        gn.Router(D, 8, None, gl.make_gate("topk", top_k=2), order="softmax_topk")
    with pytest.raises(ValueError, match="auxiliary loss"):
        gn.MoELayer(D, 7, 4, aux={"balance": 1.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_grouped_mm_backend_matches_the_loop_on_cuda(dtype):
    torch.manual_seed(0)
    layers = {b: gn.MoELayer(64, 96, 16, 4, backend=b).cuda().to(dtype) for b in ("loop", "grouped_mm")}
    layers["grouped_mm"].load_state_dict(layers["loop"].state_dict())
    x = torch.randn(300, 64, device="cuda", dtype=dtype)
    outs, grads = {}, {}
    for b, layer in layers.items():
        xx = x.clone().requires_grad_()
        outs[b] = layer(xx).output
        outs[b].float().square().sum().backward()
        grads[b] = (xx.grad, layer.experts.gate_up_proj.grad, layer.experts.down_proj.grad)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(outs["grouped_mm"], outs["loop"], **tol)
    for a, b in zip(grads["grouped_mm"], grads["loop"]):
        torch.testing.assert_close(a, b, **tol)


def test_checkpoint_with_missing_keys_names_the_fix():
    layer = _layer()
    state = layer.state_dict()
    del state["experts.down_proj"]
    with pytest.raises(KeyError, match="lacks 1 of this layer's entries: experts.down_proj"):
        layer.load_state_dict(state)
    layer.load_state_dict(state, strict=False)  # the documented way out works


def test_jitter_and_noisy_top_k_act_in_training_only():
    router = _randomise(gn.Router(D, E, 2, jitter=0.1, noisy=True).double())
    x = _x()
    router.eval()
    first = router(x)
    torch.testing.assert_close(router(x).weight, first.weight)  # deterministic in eval
    router.train()
    torch.manual_seed(0)
    noisy = router(x)
    assert not torch.allclose(noisy.logits, first.logits)
    noisy.weight.sum().backward()
    assert router.w_noise.grad is not None and router.w_noise.grad.abs().sum() > 0


def test_routers_compute_distance_gates_by_one_matmul_unless_told_otherwise():
    from gatelab.gates import make_gate
    Router = gn.Router
    torch.manual_seed(0)
    by_name = Router(16, 4, 2, "laplace")
    given = Router(16, 4, 2, make_gate("laplace"))
    assert by_name.gate.expanded and not given.gate.expanded
    assert not Router(16, 4, 2, "gaussian", expanded=False).gate.expanded
    given.load_state_dict(by_name.state_dict())
    x = torch.randn(8, 16)
    torch.testing.assert_close(by_name(x).logits, given(x).logits, atol=1e-5, rtol=1e-5)
    assert Router(16, 4, 2, "softmax").gate == make_gate("softmax")  # gates without distances unchanged
