"""Training the makemore MLP with generated backward code only, against autograd."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NAMES = ROOT.parent / "shared" / "data" / "names.txt"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_makemore", ROOT / "scripts" / "train_makemore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(train):
    assert NAMES.is_file(), f"the names dataset is expected at {NAMES}"
    words = NAMES.read_text().splitlines()
    stoi, ((Xtr, Ytr), _, _) = train.splits(words, 3)
    return stoi, Xtr, Ytr


def test_dataset_is_the_lecture_split(data):
    stoi, Xtr, Ytr = data
    assert len(stoi) == 27 and stoi["."] == 0
    assert Xtr.shape[1] == 3 and Xtr.shape[0] == Ytr.shape[0] > 150_000


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_generated_and_autograd_train_alike_and_the_loss_falls(train, data, dtype, tolerance):
    stoi, Xtr, Ytr = data
    params = train.init_parameters(len(stoi), 10, 64, 3, torch.Generator().manual_seed(2147483647), dtype)
    difference, ms, losses = train.check(params, Xtr, Ytr, 300, 32, 100_000)
    assert difference < tolerance
    generated, autograd = torch.tensor(losses["generated"]), torch.tensor(losses["autograd"])
    assert (generated - autograd).abs().max() < 10 * tolerance
    assert generated[-50:].mean() < generated[:50].mean() - 0.3  # it learns


def test_module_of_generated_functions_trains_like_the_generated_backward(train, data):
    stoi, Xtr, Ytr = data
    params = train.init_parameters(len(stoi), 10, 32, 3, torch.Generator().manual_seed(1), torch.float64)
    model = train.MakemoreMLP(params)
    plain = {k: v.clone() for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        ix = torch.randint(0, Xtr.shape[0], (32,), generator=g)
        a, grads_a = train.step_module(model)(None, Xtr[ix], Ytr[ix])
        train.sgd({k: model.p[k] for k in train.PARAMETERS}, grads_a, 0.1)
        b, grads_b = train.step_generated(plain, Xtr[ix], Ytr[ix])
        train.sgd(plain, grads_b, 0.1)
        assert abs(a.item() - b.item()) < 1e-10
    assert all(torch.allclose(model.p[k].detach(), plain[k], atol=1e-10) for k in train.PARAMETERS)


def test_end_to_end_on_any_word_list(train, tmp_path, capsys):
    words = tmp_path / "words.txt"
    vocabulary = ["anna", "bob", "carla", "dave", "eve", "frank", "gina", "hugo"]
    words.write_text("\n".join(vocabulary * 20))
    plot = tmp_path / "curve.png"
    code = train.main(["--data", str(words), "--steps", "200", "--hidden", "16", "--samples", "3",
                       "--plot", str(plot), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "train loss" in out and "val loss" in out and "ms per step" in out
    assert plot.is_file() and plot.stat().st_size > 1000
    lines = out.splitlines()
    names = lines[lines.index(next(line for line in lines if line.startswith("val loss"))) + 1:]
    if names and names[0].startswith("loss curve"):
        names = names[1:]
    # the three sampled names close the output, each made of the word list's letters
    assert len(names) == 3 and all(set(name) <= set("".join(vocabulary)) for name in names), names


def test_missing_data_says_where_to_get_it(train, tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names.txt" in err[0] and "--data" in err[0]
