"""Hugging Face interoperability: convert transformers 5.x MoE blocks into ``MoELayer``s
with the same weights, and swap the routers of a loaded transformers model for any
gatelab gate. transformers is not imported here: blocks are recognised by class name and
read through their attributes, so gatelab does not depend on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._specs import from_spec, to_spec
from ..gates import Gate
from .layer import MoELayer
from .routers import Router

__all__ = ["from_hf", "swap_router", "load_swapped", "HFRouter", "SUPPORTED_BLOCKS",
           "CONFIG_KEY"]

#: The config entry where ``swap_router`` records the router it put in, so that
#: ``load_swapped`` can build the same model before loading a saved checkpoint.
CONFIG_KEY = "gatelab_router"

SUPPORTED_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "DeepseekV3MoE")

# Hugging Face activation names -> gatelab's.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu"}


def _need(obj: Any, path: str) -> Any:
    """Follow a dotted attribute path, or say which weight the block lacks."""
    for part in path.split("."):
        if not hasattr(obj, part):
            raise KeyError(f"The block has no '{path}' ({type(obj).__name__} lacks '{part}'). "
                           "Load the checkpoint completely (no missing keys) before converting, "
                           f"or build a gatelab MoELayer directly. Supported: {SUPPORTED_BLOCKS}.")
        obj = getattr(obj, part)
    return obj


def _activation(block: nn.Module) -> str:
    name = getattr(getattr(block.experts, "config", None), "hidden_act", "silu")
    if name not in _ACTIVATIONS:
        raise ValueError(f"Activation '{name}' has no gatelab equivalent; known: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def _router_options(block: nn.Module, kind: str) -> dict[str, Any]:
    gate: Any = block.gate
    if kind == "MixtralSparseMoeBlock":
        return {"router": "softmax", "renormalize": True, "router_dtype": torch.float32,
                "jitter": float(getattr(block, "jitter_noise", 0.0) or 0.0)}
    if kind == "Qwen2MoeSparseMoeBlock":
        return {"router": "softmax", "renormalize": bool(gate.norm_topk_prob),
                "router_dtype": torch.float32}
    return {"router": "sigmoid", "renormalize": bool(gate.norm_topk_prob),
            "router_dtype": torch.float32, "cast_input": True, "selection_bias": True,
            "n_groups": gate.num_group, "topk_groups": gate.topk_group,
            "scaling": float(gate.routed_scaling_factor)}


def _copy(dst: Tensor, src: Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"'{name}' has shape {tuple(src.shape)}; the gatelab layer expects "
                         f"{tuple(dst.shape)}. Is the block's config consistent with its weights?")
    with torch.no_grad():
        dst.copy_(src)


def _copy_mlp(dst: nn.Module, src: nn.Module) -> None:
    for name in ("gate_proj", "up_proj", "down_proj"):
        _copy(getattr(dst, name).weight, _need(src, f"{name}.weight"), name)


def from_hf(block: nn.Module) -> MoELayer:
    """A ``MoELayer`` equal to a transformers 5.x ``MixtralSparseMoeBlock``,
    ``Qwen2MoeSparseMoeBlock`` or ``DeepseekV3MoE`` on the same weights (copied, in the
    block's dtype and device). The layer returns an ``MoEOutput``; its ``.output`` is what
    the block returns. Routers compute probabilities in float32 as the blocks do."""
    kind = type(block).__name__
    if kind not in SUPPORTED_BLOCKS:
        raise TypeError(f"from_hf converts {', '.join(SUPPORTED_BLOCKS)}; got {kind}. For other "
                        "blocks build a MoELayer and copy the weights, or use swap_router.")
    experts = _need(block, "experts")
    n_experts, two_f, dim = _need(experts, "gate_up_proj").shape
    shared_name = {"Qwen2MoeSparseMoeBlock": "shared_expert", "DeepseekV3MoE": "shared_experts"}
    shared = _need(block, shared_name[kind]) if kind in shared_name else None
    layer = MoELayer(dim, two_f // 2, n_experts, _need(block, "gate.top_k"),
                     activation=_activation(block), aux={},
                     shared_ffn_dim=shared.gate_proj.out_features if shared is not None else None,
                     shared_gate=kind.startswith("Qwen2"), **_router_options(block, kind))
    ref = _need(block, "gate.weight")
    layer.to(device=ref.device, dtype=experts.gate_up_proj.dtype)
    router: Any = layer.router  # attributes through nn.Module: typed loosely
    _copy(router.scores.beta1, ref, "gate.weight")
    if kind == "DeepseekV3MoE":
        _copy(router.selection_bias, _need(block, "gate.e_score_correction_bias"),
              "gate.e_score_correction_bias")
    mine: Any = layer
    _copy(mine.experts.gate_up_proj, experts.gate_up_proj, "experts.gate_up_proj")
    _copy(mine.experts.down_proj, _need(experts, "down_proj"), "experts.down_proj")
    if shared is not None:
        _copy_mlp(mine.shared, shared)
    if kind.startswith("Qwen2"):
        _copy(mine.shared.gate.weight, _need(block, "shared_expert_gate.weight"),
              "shared_expert_gate.weight")
    return layer


def _old_router(gate: Any) -> tuple[int, int, Tensor, Tensor | None] | None:
    """(n_experts, dim, a tensor giving dtype and device, the (E, D) weight to carry over or
    None) of a transformers router or of a router swapped in before; None if not a router."""
    if isinstance(gate, HFRouter):
        params = gate.router.scores.params()
        beta1 = params.get("beta1")
        keep = beta1 if beta1 is not None and beta1.dim() == 2 else None
        return gate.num_experts, gate.hidden_dim, next(iter(params.values())), keep
    weight = getattr(gate, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:
        return *weight.shape, weight, weight
    return None


class HFRouter(nn.Module):
    """A gatelab ``Router`` behind the interface transformers' MoE blocks call:
    ``router(hidden_states) -> (router_logits, top_k_weights (T, K), top_k_index (T, K))``."""

    def __init__(self, router: Router):
        super().__init__()
        self.router = router
        self.top_k = router.top_k
        self.num_experts = router.n_experts
        self.hidden_dim = router.dim

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.router(hidden_states.reshape(-1, self.hidden_dim))
        shape = (-1, r.top_k)
        return r.logits, r.weight.view(shape), r.expert_index.view(shape)


def swap_router(model: nn.Module, gate: str | Gate = "softmax", **router_options: Any) -> list[str]:
    """Replace, in place, the router (``.gate``) of every transformers MoE block in
    ``model`` by a gatelab ``Router`` with ``gate``, keeping the experts. Returns the names
    of the blocks changed. ``top_k`` defaults to each block's own. Where the new gate has
    a ``beta1`` block of the old router weight's shape (softmax, sigmoid, cosine gates),
    the old weight is copied into it, so training continues from what the router learned;
    other gates start from their default initialisation.

    A transformers model keeps working as it did: its auxiliary load-balancing loss
    (``output_router_logits=True``) reads the new routers' logits (transformers collects
    them by a hook on its router class; the new routers get the same hook), and the swap
    is recorded in ``model.config`` (``CONFIG_KEY``), so that ``save_pretrained`` followed
    by ``load_swapped`` restores the swapped model, router weights included.
    """
    swapped = []
    recorder = _router_logits_recorder(model)
    for name, module in model.named_modules():
        old = _old_router(getattr(module, "gate", None))
        if old is None or not hasattr(module, "experts"):
            continue
        n_experts, dim, like, weight = old
        options = {"top_k": getattr(module.gate, "top_k", 2), **router_options}
        router = Router(dim, n_experts, gate=gate, **options).to(like.device, like.dtype)
        beta1 = getattr(router.scores, "beta1", None)
        if weight is not None and isinstance(beta1, nn.Parameter) and beta1.shape == weight.shape:
            _copy(beta1, weight, f"{name}.gate.weight")
        new = HFRouter(router)
        if recorder is not None and isinstance(module.gate, (recorder[0], HFRouter)):
            recorder[1](new, "router_logits", recorder[2])
        module.gate = new
        swapped.append(name)
    if not swapped:
        raise ValueError("No transformers MoE block (a module with .experts and a .gate "
                         "holding a 2-D .weight) was found in the model.")
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {"gate": to_spec(gate),
                                     "options": {k: _plain(v) for k, v in router_options.items()}})
    return swapped


def _router_logits_recorder(model: nn.Module):
    """(router class, hook installer, output index) of a transformers model that records
    router logits (``_can_record_outputs["router_logits"]``), or None."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    target = getattr(spec, "target_class", None)
    if target is None:
        return None
    from transformers.utils.output_capturing import install_output_capuring_hook
    return target, install_output_capuring_hook, getattr(spec, "index", 0)


def load_swapped(path: str, model_class: type | None = None, **from_pretrained: Any) -> nn.Module:
    """A transformers model saved (``save_pretrained``) after ``swap_router``, with the
    same gatelab routers and their trained weights. ``model_class`` defaults to the
    config's first architecture (e.g. ``MixtralForCausalLM``); other keyword arguments go
    to ``from_pretrained``. The routers are swapped in as the model is built, before the
    weights load, so transformers' own loading (key renames, merged experts) fills them;
    a router weight missing from the checkpoint is an error, not a random start."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(path)
    spec = getattr(config, CONFIG_KEY, None)
    if not spec:
        raise ValueError(f"{path} holds no swapped router (no '{CONFIG_KEY}' in its config); "
                         f"load it with from_pretrained.")
    base = model_class or getattr(transformers, config.architectures[0])
    gate, options = from_spec(spec["gate"]), {k: _unplain(v) for k, v in spec["options"].items()}

    class Swapped(base):  # type: ignore[valid-type, misc]  # a class chosen at run time
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            swap_router(self, gate, **options)

    Swapped.__name__, Swapped.__qualname__ = base.__name__, base.__qualname__
    model, info = Swapped.from_pretrained(path, output_loading_info=True, **from_pretrained)
    lost = [k for k in info.get("missing_keys", []) if ".gate." in k]
    if lost:
        raise ValueError(f"{path} lacks the weights of the swapped routers {lost}; was it "
                         f"saved after swap_router with the same gate?")
    return model


def _plain(value: Any) -> Any:
    """A router option in a JSON-able form (torch dtypes as {"dtype": "float32"})."""
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    return to_spec(value)


def _unplain(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"dtype"}:
        return getattr(torch, value["dtype"])
    return from_spec(value)
