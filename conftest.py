"""Shared test helpers (a minimal copy for test_bench.py, from test_river.py: the branch moving test_river.py's
helpers here holds the full version, which replaces this one at the merge)."""
import re

import pytest
import torch

import kernels
import load_weights
from load_weights import load_model
from model import Transformer

ISAS_HERE = kernels.usable_isas()


def tiny_model(cfg, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def bundled():
    model, tokenizer = load_model()
    return model, tokenizer


@pytest.fixture
def weights_never_load(monkeypatch):
    """Loading any model's weights fails the test: the errors under test must come before."""
    def refuse(*args):
        raise AssertionError("model weights were loaded before the error")
    monkeypatch.setattr(load_weights, "load_hf_folder", refuse)


def assert_usage_error(raised, capsys, message):
    """argparse's exit: status 2, nothing on stdout, the usage and then one error line naming the argument."""
    assert raised.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert re.search(r": error: " + message, err.splitlines()[-1]), err
