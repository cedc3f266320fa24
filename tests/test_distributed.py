"""Generated layers under torch.distributed: 2 local processes (gloo, loopback), bounded in time.

* data-parallel as it is: the makemore network of generated Functions under DistributedDataParallel
  gets the gradients of one process averaging the two ranks' losses;
* the synced variants (``<layer>_synced.py``, from a declared batch axis): 2 ranks holding unequal
  parts of a batch give the output and every gradient of one process on the whole batch.

All of it runs in one 2-process group per module (``ranks`` fixture): each rank does every check
and returns its numbers; the tests compare them with one process here.
"""
import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from derive.ranks import run_ranks
from derive.layers import batchnorm, batchnorm3d, batchnorm_biased

ROOT = Path(__file__).resolve().parent.parent
SYNCED = {"batchnorm": (batchnorm, (9, 3)), "batchnorm_biased": (batchnorm_biased, (9, 3)),
          "batchnorm3d": (batchnorm3d, (9, 2, 3))}
ROWS = (4, 5)  # rows per rank: unequal
STEPS = 3


def _train_module():
    spec = importlib.util.spec_from_file_location("train_makemore", ROOT / "scripts" / "train_makemore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_synced", ROOT / "scripts" / "bench_synced.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    c = shape[1]
    gamma_shape = (c,) if len(shape) == 2 else (c, 1)
    gamma = torch.randn(gamma_shape, generator=g, dtype=torch.float64)
    beta = torch.randn(gamma_shape, generator=g, dtype=torch.float64)
    dout = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, gamma, beta, dout


def _makemore_batches(vocab, steps, rows):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, vocab, (rows, 3), generator=g), torch.randint(0, vocab, (rows,), generator=g))
            for _ in range(steps)]


def _checks(rank, world):
    """Everything one rank does: DDP training steps, then each synced layer on its rows."""
    import torch.distributed as dist

    train = _train_module()
    out = {}
    # 1. data-parallel as it is: DDP over the makemore network of generated Functions
    params = train.init_parameters(27, 10, 16, 3, torch.Generator().manual_seed(1), torch.float64)
    model = torch.nn.parallel.DistributedDataParallel(train.MakemoreMLP(params))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for Xb, Yb in _makemore_batches(27, STEPS, 2 * 8):
        optimizer.zero_grad()
        model(Xb[rank * 8:(rank + 1) * 8], Yb[rank * 8:(rank + 1) * 8]).backward()
        grads.append({k: p.grad.clone() for k, p in model.module.p.items()})
        optimizer.step()
    out["ddp"] = grads, {k: p.detach().clone() for k, p in model.module.p.items()}

    # 2. the synced variants: this rank's rows of one batch; count the messages
    calls = []
    collectives = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def counting(name):
        def counted(*args, **kwargs):
            sent = args[1] if name.startswith("all_gather") else args[0]
            calls.append((name, sent.numel()))
            return collectives[name](*args, **kwargs)
        return counted

    start = sum(ROWS[:rank])
    for name, (_, shape) in SYNCED.items():
        module = importlib.import_module(f"generated.{name}_synced")
        x, gamma, beta, dout = _inputs(shape, seed=3)
        x = x[start:start + ROWS[rank]].clone().requires_grad_(True)
        gamma.requires_grad_(True)
        beta.requires_grad_(True)
        calls.clear()
        for c in collectives:
            setattr(dist, c, counting(c))
        try:
            y = getattr(module, f"{name}_synced")(x, gamma, beta)
            y.backward(dout[start:start + ROWS[rank]])
            if name == "batchnorm_biased":  # nn.SyncBatchNorm's own Function on the same rows
                ours = list(calls)
                calls.clear()
                x2, gamma2, beta2 = (t.detach().clone().requires_grad_(True) for t in (x, gamma, beta))
                y2 = _bench_module().sync_batchnorm(x2, gamma2, beta2)
                y2.backward(dout[start:start + ROWS[rank]])
                out["SyncBatchNorm"] = y2.detach(), x2.grad, gamma2.grad, beta2.grad, list(calls)
                calls[:] = ours
        finally:
            for c, original in collectives.items():
                setattr(dist, c, original)
        out[name] = y.detach(), x.grad, gamma.grad, beta.grad, list(calls)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_checks, 2, timeout=120)


def test_generated_functions_under_ddp_give_one_process_averaging_the_ranks_losses(ranks):
    train = _train_module()
    params = train.init_parameters(27, 10, 16, 3, torch.Generator().manual_seed(1), torch.float64)
    model = train.MakemoreMLP(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (Xb, Yb) in enumerate(_makemore_batches(27, STEPS, 2 * 8)):
        optimizer.zero_grad()
        loss = (model(Xb[:8], Yb[:8]) + model(Xb[8:], Yb[8:])) / 2
        loss.backward()
        for rank in (0, 1):
            got = ranks[rank]["ddp"][0][step]
            for k, p in model.p.items():
                torch.testing.assert_close(got[k], p.grad, rtol=0, atol=1e-12, msg=f"rank {rank} d{k} step {step}")
        optimizer.step()
    for rank in (0, 1):
        for k, p in model.p.items():
            torch.testing.assert_close(ranks[rank]["ddp"][1][k], p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SYNCED))
def test_synced_layer_on_two_ranks_is_one_process_on_the_whole_batch(ranks, name):
    spec, shape = SYNCED[name]
    x, gamma, beta, dout = _inputs(shape, seed=3)
    x.requires_grad_(True)
    gamma.requires_grad_(True)
    beta.requires_grad_(True)
    y = spec(x, gamma, beta)  # the spec under autograd, one process, the whole batch
    y.backward(dout)
    outs, dxs, dgammas, dbetas, _ = zip(*(ranks[r][name] for r in (0, 1)))
    assert [o.shape[0] for o in outs] == list(ROWS)
    close = dict(rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(outs), y.detach(), **close)
    torch.testing.assert_close(torch.cat(dxs), x.grad, **close)
    # a parameter's gradient is each rank's share: data-parallel training adds them
    torch.testing.assert_close(dgammas[0] + dgammas[1], gamma.grad, **close)
    torch.testing.assert_close(dbetas[0] + dbetas[1], beta.grad, **close)
    # and a share alone is not the whole (the test could tell a rank that summed everything)
    assert (dgammas[0] - gamma.grad).abs().max() > 1e-6


def test_synced_biased_batchnorm_is_sync_batchnorm(ranks):
    """Against ``nn.SyncBatchNorm``'s autograd Function (its collectives; its five GPU-only per-rank
    ops given CPU implementations, ``scripts/bench_synced.py``), rank by rank, on unequal rows."""
    for rank in (0, 1):
        for ours, theirs in zip(ranks[rank]["batchnorm_biased"][:4], ranks[rank]["SyncBatchNorm"][:4]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SYNCED))
def test_synced_sums_travel_packed(ranks, name):
    """As few collective calls as ``nn.SyncBatchNorm`` makes (one all-gather of each rank's statistics
    in the forward, one all-reduce of the two gradient sums in the backward), counted on the same rows,
    and fewer than the sums that cross ranks: the forward's sums travel in one message although the
    squared deviations' sum needs the global mean first."""
    calls = ranks[0][name][4]
    theirs = ranks[0]["SyncBatchNorm"][4]
    module = importlib.import_module(f"generated.{name}_synced")
    crossing = module.__doc__.split("read off the derivation:")[1].split()
    sums = [w for w in crossing if w.startswith("sum_")]
    assert len(theirs) == 2 and [c for c, _ in theirs] == ["all_gather", "all_reduce"]
    assert calls and len(calls) <= len(theirs) < len(sums)
    assert f"{len(calls)} collective call(s) per forward + backward" in " ".join(module.__doc__.split())
    assert ranks[1][name][4] == calls  # every rank makes the same calls


def test_synced_layer_outside_a_process_group_is_one_line():
    from generated.batchnorm_synced import batchnorm_synced

    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError) as error:
        batchnorm_synced(x, torch.ones(3), torch.zeros(3))
    message = str(error.value)
    assert "\n" not in message and "init_process_group" in message and message.startswith("batchnorm_synced:")


def test_train_makemore_on_two_ranks_matches_one_process():
    """``train_makemore.py --ranks 2``, shortened: DDP with the synced batchnorm on 2 ranks, each
    with half of every batch, against one process on the same batches (float64)."""
    train = _train_module()
    words = (ROOT.parent / "shared" / "data" / "names.txt").read_text().splitlines()[:2000]
    stoi, ((Xtr, Ytr), _, _) = train.splits(words, 3)
    params = train.init_parameters(len(stoi), 10, 16, 3, torch.Generator().manual_seed(2147483647), torch.float64)
    difference, _, _ = train.ranks_check(params, Xtr, Ytr, 20, 32, 100_000, 2)
    assert difference < 1e-12


def test_batch_axis_declaration_mistakes_are_one_line():
    from derive.errors import SpecError
    from derive.spec import Tensor, layer

    with pytest.raises(SpecError, match=r"input 'x' declares batch='m', which is not one of its dimensions"):
        @layer(x=Tensor("n", "d", batch="m"))
        def f(x):
            return x.sum(0, keepdim=True)
    with pytest.raises(SpecError, match=r"inputs declare different batch axes: 'd', 'n'"):
        @layer(x=Tensor("n", "d", batch="n"), w=Tensor("n", "d", batch="d"))
        def g(x, w):
            return x * w


def test_only_layers_that_sum_over_the_batch_axis_get_a_synced_variant(tmp_path):
    """An activation or a row-wise norm declared with a batch axis is unchanged (its rows never
    meet); a mean over the batch becomes the mean over every rank."""
    from derive.kernel import build
    from derive.spec import Tensor, layer
    from derive.synced import build_synced, has_batch_sums

    @layer(x=Tensor("n", "d", batch="n"))
    def squash(x):
        out = torch.tanh(x) * x
        return out

    @layer(x=Tensor("n", "d", batch="n"), w=Tensor("d"))
    def scaled(x, w):
        out = x * w  # dw sums over the batch: a parameter's share, reduced by data-parallel training
        return out

    @layer(pred=Tensor("n", "d", batch="n"), target=Tensor("n", "d", differentiable=False))
    def squared_error(pred, target):
        diff = pred - target
        loss = (diff**2).sum() / (pred.shape[0] * pred.shape[1])
        return loss

    assert not has_batch_sums(build(squash)) and not has_batch_sums(build(scaled))
    synced = build_synced(build(squared_error))
    assert any("_across_ranks(" in code and "_count=n" in code for code, _ in synced.forward)
    assert any(line.startswith("sum_") for line in synced.crossing)


# -- the forward's sums in one message, for layers written as users write them -------------------
# Ranks simulated by threads in this process: each thread runs the synced forward on its rows, and
# the module's collectives exchange values through a barrier (what gloo does between processes).

def skew_scaled(x, eps=1e-5):
    """Standardised third moment, per feature (a skewness-scaled normalization)."""
    m = x.mean(0, keepdim=True)
    c = x - m
    var = (c**2).mean(0, keepdim=True)
    skew = (c**3).mean(0, keepdim=True)
    return c * skew / (var + eps) ** 2


def mad_scaled(x, eps=1e-5):
    """Normalised by the mean absolute deviation: not a polynomial in the mean."""
    m = x.mean(0, keepdim=True)
    c = x - m
    return c / ((c.abs()).mean(0, keepdim=True) + eps)


def _threaded_forward(source: str, name: str, parts: list, constants: dict, others: tuple = ()):
    import threading
    import types

    module = types.ModuleType(f"{name}_synced")
    exec(compile(source, f"{name}_synced.py", "exec"), module.__dict__)
    world = len(parts)
    barrier, box, calls = threading.Barrier(world), {}, []

    class Collectives:  # torch.distributed as the generated module calls it, across threads
        @staticmethod
        def get_world_size():
            return world

        @staticmethod
        def all_gather(out, tensor):
            rank = threading.current_thread().rank
            box[("gather", rank)] = tensor.clone()
            barrier.wait()
            for r in range(world):
                out[r].copy_(box[("gather", r)])
            calls.append("all_gather")
            barrier.wait()

        @staticmethod
        def all_reduce(tensor):
            rank = threading.current_thread().rank
            box[("reduce", rank)] = tensor.clone()
            barrier.wait()
            tensor.copy_(sum(box[("reduce", r)] for r in range(world)))
            calls.append("all_reduce")
            barrier.wait()

    module.torch = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    module.torch.distributed = Collectives
    results = [None] * world

    def run(rank):
        threading.current_thread().rank = rank
        x = parts[rank]
        results[rank] = module._forward(x, *others, *constants.values(), *x.shape)[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, calls


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("spec, one_message", [(skew_scaled, True), (mad_scaled, False)])
def test_forward_sums_that_read_the_global_mean_travel_with_it_when_polynomial(spec, one_message):
    """A sum that reads the global mean (central moments) is a polynomial in it: its Taylor terms
    about each rank's own mean travel in the first message, and 3 unequal ranks give one process's
    output on the whole batch. ``|x - mean|`` is not a polynomial: it waits for a second message."""
    from derive.codegen import render_synced
    from derive.generate import build_named
    from derive.spec import Constant, Tensor, layer
    from derive.synced import synced_cached

    declared = layer(x=Tensor("n", "d", batch="n"), eps=Constant(1e-5, positive=True))(spec)
    synced = synced_cached(build_named(declared))
    assert synced.gathers is one_message
    forward_messages = sum(1 for code, _ in synced.forward if "_ranks(" in code)
    assert forward_messages == (1 if one_message else 2)
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 + 30
    parts = list(x.split([3, 4, 5]))
    got, calls = _threaded_forward(render_synced(synced), declared.name, parts, {"eps": 1e-5})
    assert len(calls) == 3 * forward_messages  # each rank's calls
    torch.testing.assert_close(torch.cat(got), spec(x), rtol=0, atol=1e-12)


def test_gathered_variance_in_float32_is_as_accurate_as_autograd_on_one_process():
    """Standing rule, across ranks: at an offset of 1e3 (float32) the synced biased batchnorm's
    output on 2 ranks is within 4x the error of autograd through the spec in one process."""
    from derive.layers import batchnorm_biased as spec

    source = (ROOT / "generated" / "batchnorm_biased_synced.py").read_text()
    g = torch.Generator().manual_seed(11)
    x64 = torch.randn(64, 8, generator=g, dtype=torch.float64) + 1e3
    gamma, beta = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    exact = spec(x64, gamma, beta)
    x, gamma32, beta32 = x64.float(), gamma.float(), beta.float()
    got, calls = _threaded_forward(source, "batchnorm_biased", list(x.split([24, 40])), {"eps": 1e-5},
                                   others=(gamma32, beta32))
    assert calls == ["all_gather", "all_gather"]
    ours = (torch.cat(got).double() - exact).abs().max().item()
    autograd = (spec(x, gamma32, beta32).double() - exact).abs().max().item()
    assert ours <= 4 * autograd + 1e-6, (ours, autograd)
