"""Expert parallelism: 2 processes on the gloo backend (CPU) must reproduce the
single-process layer's outputs and gradients."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gatelab.nn as gn

WORLD, D, TOKENS = 2, 6, 9
LAYER = {"dim": D, "ffn_dim": 5, "n_experts": 4, "top_k": 2, "n_shared": 1,
         "aux": {"load_balance": 1.0}}


def _layer():
    torch.manual_seed(0)
    layer = gn.MoELayer(**LAYER).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD, TOKENS, D, generator=g, dtype=torch.float64)
    return x, torch.randn(WORLD, TOKENS, D, generator=g, dtype=torch.float64)


def _rank_main(rank, out_dir):
    # A file store, not TCP: rank 0 then runs no store-server thread, which a CI run once
    # saw abort at exit ("terminate called without an active exception") and which
    # needs a free port besides.
    store = "file://" + os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD)
    try:
        layer = gn.ExpertParallelMoE(_layer())
        x, g = _inputs()
        xr = x[rank].clone().requires_grad_()
        out = layer(xr)
        (out.output * g[rank]).sum().add(out.aux_loss).backward()
        torch.save({"out": out.output.detach(), "x_grad": xr.grad,
                    "counts": out.expert_counts,
                    "grads": {n: p.grad for n, p in layer.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        del layer, out  # drop the autograd graph that holds the group before teardown
        dist.barrier()  # neither rank tears down while the other still talks
    finally:
        dist.destroy_process_group()
    # Everything the test reads is saved: leave without the interpreter's teardown, where
    # a gloo thread still aborts now and then ("terminate called without an active
    # exception", seen in two CI runs, never in isolation). An exception above still
    # propagates, so spawn still reports a failing rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_two_gloo_ranks_match_the_single_process_layer(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    full = _layer()
    x, g = _inputs()
    xs = x.clone().requires_grad_()
    outs = [full(xs[r]) for r in range(WORLD)]  # each rank's batch, as the ranks saw it
    loss = sum((o.output * g[r]).sum() + o.aux_loss for r, o in enumerate(outs))
    loss.backward()
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["out"], outs[r].output.detach())
        torch.testing.assert_close(ranks[r]["x_grad"], xs.grad[r])
        assert torch.equal(ranks[r]["counts"], outs[r].expert_counts)
    local = LAYER["n_experts"] // WORLD
    for name, p in full.named_parameters():
        key = "layer." + name
        if name.startswith("experts."):  # each rank holds the complete gradient of its slice
            got = torch.cat([ranks[r]["grads"][key] for r in range(WORLD)])
        else:  # replicated: the ranks' gradients add up to the full one
            got = sum(ranks[r]["grads"][key] for r in range(WORLD))
        torch.testing.assert_close(got, p.grad, msg=f"gradient of {name}")
    assert ranks[0]["grads"]["layer.experts.down_proj"].shape[0] == local
