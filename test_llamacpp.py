"""llama.cpp's rows in the bench (llamacpp.py): they score the very ids they are given, llama.cpp's BF16 agrees with
this project's backbone, requantized files appear whole, and without llama_cpp there is one line and no row."""
import builtins
import threading

import pytest
import torch

import calibrate
import llamacpp
from exit_policy import NEVER
from river import Engine


def test_without_llama_cpp_one_line_and_no_rows(monkeypatch):
    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)
    monkeypatch.delitem(__import__("sys").modules, "llama_cpp", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    monkeypatch.setattr(llamacpp.importlib, "import_module", lambda name: no_llama_cpp(name))
    lines = []
    assert llamacpp.peer_rows(["BF16", "Q4_K_M"], "/nonexistent", 30, lines.append) == []
    assert len(lines) == 1 and "pip install" in lines[0] and "llama-cpp-python" in lines[0]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bench.py's optional peer)")


def test_requantized_files_appear_whole_when_two_runs_make_them_at_once(llama_cpp, tmp_path):
    paths, errors = [], []

    def make():
        try:
            paths.append(llamacpp.requantized(llama_cpp, "Q4_0", tmp_path))
        except Exception as err:  # noqa: BLE001 - the test reports any failure of either run
            errors.append(err)
    runs = [threading.Thread(target=make) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert not errors and len(paths) == 2 and paths[0] == paths[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[0].name]  # no temporary file left
    llama_cpp.Llama(model_path=str(paths[0]), n_ctx=64, verbose=False)    # a whole GGUF: it loads


def test_llama_cpp_scores_the_ids_it_is_given_and_agrees_with_the_backbone(llama_cpp, bundled, tmp_path):
    """score() returns, for each target id, llama.cpp's logits after the context and the targets before it: equal
    to a one-position-at-a-time evaluation done here; its BF16 NLL on a scored problem is within 0.01 nats of this
    project's backbone on the same ids."""
    model, tokenizer = bundled
    context, target = calibrate.quality_sequences(tokenizer, 1, 24)[0]
    row = llamacpp.LlamaCppRow("llama.cpp BF16", "BF16", llamacpp.requantized(llama_cpp, "BF16", tmp_path), 2,
                               model.cfg.n_layers, llama_cpp)
    logits, _, _ = row.score(context, target)
    assert logits.shape == (len(target), model.cfg.vocab_size)
    by_hand = llama_cpp.Llama(model_path=str(row.gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    by_hand.eval(list(context))
    expected = [torch.tensor(by_hand.scores[len(context) - 1])]
    for token in target[:-1]:
        by_hand.eval([token])
        expected.append(torch.tensor(by_hand.scores[by_hand.n_tokens - 1]))
    expected = torch.stack(expected).float()
    # one batch and single positions round differently inside llama.cpp (up to ~0.4 in a logit); a shifted position
    # would miss by nats: each target's log-probability within 0.15, and the same top choice nearly everywhere
    ids = torch.tensor(target)[:, None]
    got_logp, expected_logp = (t.log_softmax(-1).gather(1, ids) for t in (logits, expected))
    torch.testing.assert_close(got_logp, expected_logp, rtol=0, atol=0.15)
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    nll = calibrate.scored(logits, target)[1] / len(target)
    backbone, _ = calibrate.mean_nll(Engine(model), NEVER, [(context, target)])
    assert abs(nll - backbone) < 0.01
