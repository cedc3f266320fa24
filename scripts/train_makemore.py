"""Train the makemore MLP with the generated backward only (no ``loss.backward()``), or with
autograd, or check both side by side.

    python scripts/train_makemore.py                      # 200,000 steps, generated backward
    python scripts/train_makemore.py --backward autograd  # the same with loss.backward()
    python scripts/train_makemore.py --check 100          # both ways from one initialization
    python scripts/train_makemore.py --ranks 2 --steps 1000  # DDP on 2 gloo processes, synced batchnorm,
                                                             # against one process on the same batches

The set-up is the lecture's: names shuffled with random.seed(42), 80/10/10 split, block size 3,
embedding 10, hidden 200, batch 32, generator seed 2147483647, Bessel-corrected batchnorm, SGD at
learning rate 0.1 then 0.01 from step 100,000.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from derive.layers.makemore_model import makemore_model  # noqa: E402  (the spec: autograd's reference)
from generated import batchnorm as fused_batchnorm  # noqa: E402
from generated import batchnorm_synced  # noqa: E402
from generated import cross_entropy as fused_cross_entropy  # noqa: E402
from generated import embedding_steps, linear_steps, makemore_model_steps, tanh_steps  # noqa: E402

DATA_CANDIDATES = [ROOT.parent / "shared" / "data" / "names.txt", ROOT / "names.txt", Path("names.txt")]
DATA_SOURCE = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
PARAMETERS = ("C", "W1", "b1", "bngain", "bnbias", "W2", "b2")


# -- data --------------------------------------------------------------------------------------
def find_data(path: str | None) -> Path | None:
    if path:
        return Path(path) if Path(path).is_file() else None
    return next((p for p in DATA_CANDIDATES if p.is_file()), None)


def build_dataset(words: list[str], stoi: dict, block_size: int):
    X, Y = [], []
    for w in words:
        context = [0] * block_size
        for ch in w + ".":
            ix = stoi[ch]
            X.append(context)
            Y.append(ix)
            context = context[1:] + [ix]
    return torch.tensor(X), torch.tensor(Y)


def splits(words: list[str], block_size: int):
    chars = sorted(set("".join(words)))
    stoi = {s: i + 1 for i, s in enumerate(chars)}
    stoi["."] = 0
    words = list(words)
    random.seed(42)
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return stoi, [build_dataset(ws, stoi, block_size) for ws in (words[:n1], words[n1:n2], words[n2:])]


# -- model -------------------------------------------------------------------------------------
def init_parameters(vocab: int, n_embd: int, n_hidden: int, block_size: int, g, dtype) -> dict:
    """The lecture's initialization (non-zero biases and batchnorm parameters, as in the exercise)."""
    fan_in = n_embd * block_size
    params = dict(
        C=torch.randn((vocab, n_embd), generator=g),
        W1=torch.randn((fan_in, n_hidden), generator=g) * (5 / 3) / fan_in**0.5,
        b1=torch.randn(n_hidden, generator=g) * 0.1,
        W2=torch.randn((n_hidden, vocab), generator=g) * 0.1,
        b2=torch.randn(vocab, generator=g) * 0.1,
        bngain=torch.randn((1, n_hidden), generator=g).view(n_hidden) * 0.1 + 1.0,
        bnbias=torch.randn((1, n_hidden), generator=g).view(n_hidden) * 0.1,
    )
    return {k: v.to(dtype) for k, v in params.items()}


def step_generated(params: dict, Xb, Yb):
    """Forward and the generated backward, without autograd."""
    with torch.no_grad():
        loss, cache = makemore_model_steps.forward(Xb=Xb, Yb=Yb, **params)
        grads = makemore_model_steps.backward(cache)
    return loss, {k: grads[f"d{k}"] for k in PARAMETERS}


def step_autograd(params: dict, Xb, Yb):
    """Forward through the spec and ``loss.backward()``."""
    for p in params.values():
        p.grad = None
        p.requires_grad_(True)
    loss = makemore_model(Xb=Xb, Yb=Yb, **params)
    loss.backward()
    return loss.detach(), {k: params[k].grad for k in PARAMETERS}


class MakemoreMLP(torch.nn.Module):
    """An ordinary nn.Module built from generated autograd Functions, trained with loss.backward()."""

    def __init__(self, params: dict, batchnorm=fused_batchnorm.batchnorm):
        super().__init__()
        self.p = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in params.items()})
        self.batchnorm = batchnorm  # batchnorm_synced.batchnorm_synced: batch statistics over every rank

    def forward(self, Xb, Yb):
        p = self.p
        embcat = embedding_steps.embedding(p["C"], Xb)
        hpreact = self.batchnorm(linear_steps.linear(embcat, p["W1"], p["b1"]), p["bngain"], p["bnbias"])
        logits = linear_steps.linear(tanh_steps.tanh(hpreact), p["W2"], p["b2"])
        return fused_cross_entropy.cross_entropy(logits, Yb)


def step_module(model: MakemoreMLP):
    def step(params, Xb, Yb):
        model.zero_grad(set_to_none=True)
        loss = model(Xb, Yb)
        loss.backward()
        return loss.detach(), {k: model.p[k].grad for k in PARAMETERS}
    return step


def sgd(params: dict, grads: dict, lr: float) -> None:
    with torch.no_grad():
        for k in PARAMETERS:
            params[k] -= lr * grads[k]


# -- evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(params: dict, Xtr):
    """Batchnorm statistics over the whole training set (Bessel-corrected, as in training)."""
    hpreact = params["C"][Xtr].view(Xtr.shape[0], -1) @ params["W1"] + params["b1"]
    return hpreact.mean(0, keepdim=True), hpreact.var(0, keepdim=True, unbiased=True)


@torch.no_grad()
def logits_of(params: dict, stats, X):
    bnmean, bnvar = stats
    hpreact = params["C"][X].view(X.shape[0], -1) @ params["W1"] + params["b1"]
    hpreact = params["bngain"] * (hpreact - bnmean) * (bnvar + 1e-5) ** -0.5 + params["bnbias"]
    return torch.tanh(hpreact) @ params["W2"] + params["b2"]


def split_loss(params: dict, stats, X, Y) -> float:
    return F.cross_entropy(logits_of(params, stats, X), Y).item()


@torch.no_grad()
def sample(params: dict, stats, itos: dict, block_size: int, count: int = 20) -> list[str]:
    g = torch.Generator().manual_seed(2147483647 + 10)
    names = []
    for _ in range(count):
        out, context = [], [0] * block_size
        while True:
            probs = F.softmax(logits_of(params, stats, torch.tensor([context])), dim=1)
            ix = torch.multinomial(probs, num_samples=1, generator=g).item()
            context = context[1:] + [ix]
            if ix == 0:
                break
            out.append(ix)
        names.append("".join(itos[i] for i in out))
    return names


# -- training ------------------------------------------------------------------------------------
def train(params, X, Y, steps: int, step_fn, g, batch_size: int, decay_at: int, progress: bool = True):
    """Plain SGD; returns the loss of every step and the milliseconds per step."""
    from tqdm import tqdm

    losses, seconds = [], 0.0
    bar = tqdm(range(steps), disable=not progress, mininterval=0.5, desc="training")
    for i in bar:
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
        start = time.perf_counter()
        loss, grads = step_fn(params, X[ix], Y[ix])
        sgd(params, grads, 0.1 if i < decay_at else 0.01)
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if i % 1000 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses, 1000 * seconds / max(steps, 1)


def check(params0: dict, X, Y, steps: int, batch_size: int, decay_at: int):
    """Both backwards from one initialization on the same batches, steps interleaved."""
    generated = {k: v.clone() for k, v in params0.items()}
    reference = {k: v.clone() for k, v in params0.items()}
    g = torch.Generator().manual_seed(2147483647)
    times = {"generated": 0.0, "autograd": 0.0}
    losses = {"generated": [], "autograd": []}
    for i in range(steps):
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
        lr = 0.1 if i < decay_at else 0.01
        for name, params, fn in (("generated", generated, step_generated), ("autograd", reference, step_autograd)):
            start = time.perf_counter()
            loss, grads = fn(params, X[ix], Y[ix])
            sgd(params, grads, lr)
            times[name] += time.perf_counter() - start
            losses[name].append(loss.item())
    difference = max(float((generated[k] - reference[k].detach()).abs().max()) for k in PARAMETERS)
    ms = {k: 1000 * v / max(steps, 1) for k, v in times.items()}
    return difference, ms, losses


def _rank_training(rank: int, world: int, params: dict, X, Y, steps: int, batch_size: int, decay_at: int):
    """One rank of ``--ranks``: DDP over the network with the synced batchnorm, on its rows of each batch."""
    model = MakemoreMLP(params, batchnorm=batchnorm_synced.batchnorm_synced)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    g = torch.Generator().manual_seed(2147483647)
    start = time.perf_counter()
    for i in range(steps):
        ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
        rows = ix.tensor_split(world)[rank]
        model.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: a rank's mean loss, weighted by its share of the batch,
        # makes that the gradient of the mean over the whole batch (equal shares: weight 1)
        loss = ddp(X[rows], Y[rows]) * (world * rows.numel() / batch_size)
        loss.backward()
        with torch.no_grad():
            for p in model.p.values():
                p -= (0.1 if i < decay_at else 0.01) * p.grad
    seconds = time.perf_counter() - start
    return {k: p.detach().clone() for k, p in model.p.items()}, 1000 * seconds / max(steps, 1)


def ranks_check(params0: dict, X, Y, steps: int, batch_size: int, decay_at: int, world: int):
    """``steps`` of DDP on ``world`` gloo processes (each with its rows of every batch, the
    batchnorm's statistics over all of them) and of one process on the whole batches: the largest
    parameter difference, and ms per step each way."""
    from derive.ranks import run_ranks

    results = run_ranks(_rank_training, world, (params0, X, Y, steps, batch_size, decay_at),
                        timeout=60 + steps * 0.5)
    model = MakemoreMLP(params0)
    params = {k: model.p[k] for k in PARAMETERS}
    g = torch.Generator().manual_seed(2147483647)
    _, ms_one = train(params, X, Y, steps, step_module(model), g, batch_size, decay_at, progress=False)
    difference = max(float((ranks[k] - params[k].detach()).abs().max()) for ranks, _ in results for k in PARAMETERS)
    return difference, max(ms for _, ms in results), ms_one


def plot(losses: list[float], path: Path, backward: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 1000 if len(losses) >= 10_000 else max(1, len(losses) // 20)
    t = torch.tensor(losses[: len(losses) // window * window]).log10().view(-1, window).mean(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(torch.arange(len(t)) * window, t)
    ax.set_xlabel("step")
    ax.set_ylabel(f"log10 loss (mean of {window} steps)")
    ax.set_title(f"makemore MLP, {backward} backward")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a file with one word per line (default: the makemore names list)")
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--decay-at", type=int, default=100_000, help="step from which the learning rate is 0.01")
    p.add_argument("--backward", choices=("generated", "autograd", "module"), default="generated",
                   help="generated code (default), loss.backward() through the spec, or an nn.Module of "
                        "generated Functions with loss.backward()")
    p.add_argument("--check", type=int, metavar="N", help="run N steps both ways and compare")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="train on N local gloo processes (DDP, batchnorm statistics over every rank) and "
                        "compare with one process on the same batches (use with --steps)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--plot", default="makemore_loss.png", help="where to write the loss curve")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = find_data(args.data)
    if data is None:
        print(f"no word list found ({args.data or 'names.txt'}); get the names list from {DATA_SOURCE} "
              f"and pass --data PATH", file=sys.stderr)
        return 2
    words = [w.strip() for w in data.read_text().splitlines() if w.strip()]
    block_size, n_embd = 3, 10
    stoi, ((Xtr, Ytr), (Xdev, Ydev), _) = splits(words, block_size)
    itos = {i: s for s, i in stoi.items()}
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(2147483647)
    params = init_parameters(len(stoi), n_embd, args.hidden, block_size, g, dtype)
    print(f"{len(words)} words, vocabulary {len(stoi)}, {Xtr.shape[0]} training examples, "
          f"{sum(p.numel() for p in params.values())} parameters, {torch.get_num_threads()} threads")

    if args.check:
        difference, ms, _ = check(params, Xtr, Ytr, args.check, args.batch_size, args.decay_at)
        print(f"check over {args.check} steps ({args.dtype}): largest parameter difference {difference:.3e}")
        print(f"ms per step: generated {ms['generated']:.3f}, autograd {ms['autograd']:.3f} "
              f"(generated/autograd = {ms['generated'] / ms['autograd']:.2f})")
        return 0

    if args.ranks:
        difference, ms_ranks, ms_one = ranks_check(params, Xtr, Ytr, args.steps, args.batch_size, args.decay_at,
                                                   args.ranks)
        print(f"{args.steps} steps on {args.ranks} ranks ({args.dtype}, {args.batch_size // args.ranks} rows each "
              f"of every batch of {args.batch_size}) against one process on the same batches: largest "
              f"parameter difference {difference:.3e}")
        print(f"ms per step: {args.ranks} ranks {ms_ranks:.3f}, one process {ms_one:.3f}")
        return 0

    start = time.perf_counter()
    if args.backward == "generated":
        step = step_generated
    elif args.backward == "autograd":
        step = step_autograd
    else:
        model = MakemoreMLP(params)
        params = {k: model.p[k] for k in PARAMETERS}
        step = step_module(model)
    losses, ms = train(params, Xtr, Ytr, args.steps, step, g, args.batch_size, args.decay_at, not args.quiet)
    params = {k: v.detach() for k, v in params.items()}
    stats = calibrate(params, Xtr)
    print(f"{args.steps} steps with the {args.backward} backward: {ms:.3f} ms per step, "
          f"{time.perf_counter() - start:.0f} s in all")
    print(f"train loss {split_loss(params, stats, Xtr, Ytr):.4f}")
    print(f"val loss {split_loss(params, stats, Xdev, Ydev):.4f}")
    if args.plot:
        plot(losses, Path(args.plot), args.backward)
        print(f"loss curve: {args.plot}")
    for name in sample(params, stats, itos, block_size, args.samples):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
