"""llama.cpp's rows in the bench (llamacpp.py): they score the very ids they are given, llama.cpp's BF16 agrees with
this project's backbone, requantized files appear whole, and without llama_cpp there is one line and no row."""
import filecmp
import importlib.abc
import importlib.util
import os
import sys
import threading
import types

import numpy as np
import pytest
import torch

import calibrate
import llamacpp
import load_weights
import scaling
from exit_policy import NEVER
from river import Engine

# A HumanEval-like problem of a few dozen tokens: the prompt is the context, the solution the scored target.
PROMPT = ('def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same forwards and backwards.\n'
          '    >>> is_palindrome("level")\n    True\n    >>> is_palindrome("river")\n    False\n    """\n')
SOLUTION = "    return text == text[::-1]\n"


# ------------------------------------------------------------------------------------------- without llama_cpp

class FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A llama_cpp whose import raises `error`, as llama-cpp-python's does when its shared library is missing
    (FileNotFoundError) or will not load (RuntimeError wrapping the loader's OSError: _ctypes_extensions.py)."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "llama_cpp" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


@pytest.fixture(params=["absent", "library missing", "library fails to load"])
def no_llama_cpp(request, monkeypatch):
    """llama_cpp made unimportable for the test: not installed, or installed with a native library that is missing
    or does not load."""
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    if request.param == "absent":
        monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ModuleNotFoundError
        return
    error = (FileNotFoundError("Shared library with base name 'llama' not found") if request.param == "library missing"
             else RuntimeError("Failed to load shared library '/x/libllama.so': libgomp.so.1: cannot open shared "
                               "object file: No such file or directory"))
    monkeypatch.setattr(sys, "meta_path", [FailingImport(error)] + sys.meta_path)


def test_without_llama_cpp_one_line_on_how_to_install_and_no_rows(no_llama_cpp, tmp_path, capsys):
    """llama_cpp_or_none: None and one line naming the install command; the bench's peer rows: none, nothing made
    on disk, no error; bench.py --context's llama.cpp figures: None after the same one line."""
    lines = []
    assert llamacpp.llama_cpp_or_none(lines.append) is None
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "llama_cpp is not importable" in lines[0] and "pip install llama-cpp-python==" in lines[0]
    lines.clear()
    cfg, _ = load_weights.load_config_and_tokenizer()
    assert llamacpp.peer_rows(["BF16", "Q4_K_M"], tmp_path / "llamacpp", cfg, lines.append) == []
    assert lines == [llamacpp.INSTALL] and not (tmp_path / "llamacpp").exists()
    args = types.SimpleNamespace(no_llamacpp=False, model=None, context=[16])
    assert scaling.peer_contexts(args, list(range(32)), 8) is None
    out, err = capsys.readouterr()
    assert out == "" and err == llamacpp.INSTALL + "\n"


# ---------------------------------------------------------------------------------------------- with llama_cpp

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bench.py's optional peer)")


@pytest.fixture(scope="module")
def bf16_row(llama_cpp, bundled, tmp_path_factory):
    """The bench's llama.cpp BF16 row of the bundled model."""
    model, _ = bundled
    gguf = llamacpp.requantized(llama_cpp, "BF16", tmp_path_factory.mktemp("llamacpp"))
    return llamacpp.LlamaCppRow("llama.cpp BF16", "BF16", gguf, 2, model.cfg.n_layers, 0, llama_cpp)


def by_hand_nll(llama_cpp, gguf, context, target):
    """Each target id's NLL from llama.cpp's logits over context + target evaluated at once in a Llama of the test's
    own (position i's logits predict id i + 1), the log-softmax written out in float64."""
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
    llm.eval(list(context) + list(target))
    logits = np.asarray(llm.scores[len(context) - 1:len(context) + len(target) - 1], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    llm.close()
    return -logp[np.arange(len(target)), target]


def test_llama_cpp_scores_the_very_ids_it_is_given(llama_cpp, bf16_row, bundled):
    """score(context, target): the logits whose NLL at each target id is llama.cpp's own for that id after the
    context and the targets before it, for a tokenized problem and for arbitrary ids no tokenizer would produce (a
    position off by one, a BOS added or a re-tokenization would miss these by nats)."""
    model, tokenizer = bundled
    context, solution = tokenizer.encode(PROMPT).ids, tokenizer.encode(SOLUTION).ids
    arbitrary = torch.randint(0, model.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    assert 20 <= len(context) <= 80 and len(solution) >= 8
    for target in (solution, arbitrary, solution[:1]):
        logits, depths, cache = bf16_row.score(context, target)
        assert logits.shape == (len(target), model.cfg.vocab_size) and depths == [] and cache is None
        got = -logits.double().log_softmax(-1).gather(1, torch.tensor(target)[:, None])[:, 0].numpy()
        expected = by_hand_nll(llama_cpp, bf16_row.gguf, context, target)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
        assert calibrate.scored(logits, target)[1] == pytest.approx(expected.sum(), rel=1e-5)


def test_llama_cpp_bf16_nll_is_the_backbones(bf16_row, bundled):
    """llama.cpp BF16 and this project's backbone, both the bundled GGUF's weights, score the problem within 0.01
    nats per token: the backbone teacher-forced through the Engine as the bench's backbone row scores, in the bench's
    bf16 and in fp32."""
    model, tokenizer = bundled
    context, target = tokenizer.encode(PROMPT).ids, tokenizer.encode(SOLUTION).ids
    nll = calibrate.scored(bf16_row.score(context, target)[0], target)[1] / len(target)
    for backbone in (model, scaling.load_backbone(None, "cpu", "bfloat16")):
        backbone_nll, _ = calibrate.mean_nll(Engine(backbone), NEVER, [(context, target)])
        assert abs(nll - backbone_nll) < 0.01, (backbone.dtype, nll, backbone_nll)


def test_each_file_reports_the_bits_per_weight_it_holds(llama_cpp, bundled, tmp_path_factory):
    """gguf_weights against the model's own parameter count: the BF16 file holds the bundled model's 134,515,008
    weights, its 61 norms in fp32 and everything else in bf16 (bits per weight by hand); asked for Q4_K_M on these
    576-wide rows, llama.cpp writes mostly Q5_0, above 5 bits per weight; IQ4_NL stays near 4.5. A decode step reads
    every tensor of a tied model, the embedding as its output head included."""
    model, _ = bundled
    n, norms = sum(p.numel() for p in model.parameters()), (2 * model.cfg.n_layers + 1) * model.cfg.d_model
    assert n == 134_515_008
    folder = tmp_path_factory.mktemp("bpw")
    bf16 = llamacpp.gguf_weights(llamacpp.requantized(llama_cpp, "BF16", folder))
    assert bf16["bits_per_weight"] == pytest.approx(8 * (2 * (n - norms) + 4 * norms) / n, rel=1e-9)
    assert bf16["step_weight_bytes"] == bf16["weight_mb"] * 2**20 and set(bf16["tensor_types"]) == {"BF16", "F32"}
    q4_k_m = llamacpp.gguf_weights(llamacpp.requantized(llama_cpp, "Q4_K_M", folder))
    assert q4_k_m["bits_per_weight"] > 5 and max(q4_k_m["tensor_types"], key=q4_k_m["tensor_types"].get) == "Q5_0"
    iq4_nl = llamacpp.gguf_weights(llamacpp.requantized(llama_cpp, "IQ4_NL", folder))
    assert 4.4 < iq4_nl["bits_per_weight"] < q4_k_m["bits_per_weight"] and "IQ4_NL" in iq4_nl["tensor_types"]


def test_requantized_files_appear_whole_when_two_runs_make_them_at_once(llama_cpp, tmp_path):
    """Two requantizations of one type into one empty folder, held until both are inside llama.cpp's quantizer: both
    return the one file, byte for byte what a lone run makes, and no temporary file is left."""
    inside = threading.Barrier(2, timeout=60)

    def quantize_together(*args):
        inside.wait()  # neither run starts before the other: both find no file and both write one
        return llama_cpp.llama_model_quantize(*args)
    racing = types.SimpleNamespace(llama_model_quantize_default_params=llama_cpp.llama_model_quantize_default_params,
                                   llama_model_quantize=quantize_together)
    folder, paths, errors = tmp_path / "shared", [], []

    def make():
        try:
            paths.append(llamacpp.requantized(racing, "Q4_0", folder))
        except Exception as err:  # noqa: BLE001 - the test reports any failure of either run
            errors.append(err)
    runs = [threading.Thread(target=make) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert not errors and len(paths) == 2 and paths[0] == paths[1]
    assert [p.name for p in folder.iterdir()] == [paths[0].name]  # no temporary file left
    alone = llamacpp.requantized(llama_cpp, "Q4_0", tmp_path / "alone")
    assert filecmp.cmp(paths[0], alone, shallow=False)
    llama_cpp.Llama(model_path=str(paths[0]), n_ctx=64, verbose=False).close()  # a whole GGUF: it loads


# ------------------------------------------------------------------------------------------------ ik_llama.cpp

def test_without_ik_llama_bench_one_line_and_no_rows_and_a_wrong_path_is_named(monkeypatch, tmp_path):
    """ik_rows: without IK_LLAMA_BENCH no row and one line saying how to have them; IK_LLAMA_BENCH naming a missing
    or a non-executable file: an error naming the variable and the path, before any row is made."""
    monkeypatch.delenv("IK_LLAMA_BENCH", raising=False)
    lines = []
    assert llamacpp.ik_rows(["a llama.cpp row"], lines.append) == []
    assert len(lines) == 1 and "IK_LLAMA_BENCH" in lines[0] and "\n" not in lines[0]
    plain = tmp_path / "llama-bench"
    plain.write_text("not a program")
    for path in (tmp_path / "absent", plain):
        monkeypatch.setenv("IK_LLAMA_BENCH", str(path))
        with pytest.raises(FileNotFoundError, match=f"IK_LLAMA_BENCH={path}: not an executable file"):
            llamacpp.ik_rows(["a llama.cpp row"], lines.append)


def test_ik_llama_times_the_llama_cpp_rows_file_and_scores_as_it(bf16_row, bundled):
    """Where IK_LLAMA_BENCH names ik_llama.cpp's llama-bench: a row without and one with run-time repacking per
    llama.cpp row, named after it, timing its very file (new_tokens - 1 decode steps after the prompt, a positive
    rate within a factor of 4 of llama.cpp's own on the same file), holding its file's figures and its scores."""
    if not os.environ.get("IK_LLAMA_BENCH"):
        pytest.skip("IK_LLAMA_BENCH is not set (ik_llama.cpp's llama-bench: bench.py's optional second peer)")
    rows = llamacpp.ik_rows([bf16_row], lambda line: None)
    assert [row.name for row in rows] == ["ik_llama.cpp BF16", "ik_llama.cpp BF16 -rtr"]
    assert [row.repack for row in rows] == [False, True] and all(row.twin is bf16_row for row in rows)
    model, tokenizer = bundled
    prompt, target = tokenizer.encode(PROMPT).ids, tokenizer.encode(SOLUTION).ids
    theirs = bf16_row.generate(prompt, 9).decode_tokens_per_s
    for row in rows:
        g = row.generate(prompt, 9)
        assert len(g.step_s) == 8 and g.prefill_s > 0 and theirs / 4 < g.decode_tokens_per_s < 4 * theirs
        assert row.file is bf16_row.file and row.score(prompt, target) is bf16_row.score(prompt, target)
        assert row.bytes_per_step([30], [len(prompt)]) == bf16_row.bytes_per_step([30], [len(prompt)])


# ---------------------------------------------------------------------------------------- imatrix-calibrated files

def test_without_llama_cpp_tools_one_line_and_a_folder_without_them_is_named(monkeypatch, tmp_path):
    """tools_or_none: without LLAMA_CPP_TOOLS None and one line saying how to have the imatrix rows; a folder without
    an executable llama-imatrix or llama-quantize: an error naming the variable, the folder and the missing tool."""
    monkeypatch.delenv("LLAMA_CPP_TOOLS", raising=False)
    lines = []
    assert llamacpp.tools_or_none(lines.append) is None
    assert len(lines) == 1 and "LLAMA_CPP_TOOLS" in lines[0] and "\n" not in lines[0]
    monkeypatch.setenv("LLAMA_CPP_TOOLS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"LLAMA_CPP_TOOLS={tmp_path}: no executable llama-imatrix there"):
        llamacpp.tools_or_none(lines.append)


def test_an_imatrix_file_is_its_type_made_otherwise_and_loads_in_llama_cpp(llama_cpp, bundled, tmp_path):
    """Where LLAMA_CPP_TOOLS names llama.cpp's tools: the IQ4_NL file made with an importance matrix (computed on the
    rounding split) holds mostly IQ4_NL at the plain file's bits per weight within 1% (llama.cpp picks a few tensors'
    types otherwise with a matrix), differs from it byte for byte, loads in the installed llama-cpp-python, and
    scores the problem within a few tenths of a nat of the plain file."""
    if not os.environ.get("LLAMA_CPP_TOOLS"):
        pytest.skip("LLAMA_CPP_TOOLS is not set (llama.cpp's imatrix tools: bench.py's optional calibrated peers)")
    tools = llamacpp.tools_or_none(lambda line: None)
    bf16 = llamacpp.requantized(llama_cpp, "BF16", tmp_path)
    calibrated = llamacpp.imatrix_quantized(tools, bf16, "IQ4_NL", tmp_path, 2)
    plain = llamacpp.requantized(llama_cpp, "IQ4_NL", tmp_path)
    a, b = llamacpp.gguf_weights(calibrated), llamacpp.gguf_weights(plain)
    assert max(a["tensor_types"], key=a["tensor_types"].get) == "IQ4_NL" and a["tensor_types"]["IQ4_NL"] > 0.7
    assert a["bits_per_weight"] == pytest.approx(b["bits_per_weight"], rel=0.01)
    assert not filecmp.cmp(calibrated, plain, shallow=False)
    model, tokenizer = bundled
    context, target = tokenizer.encode(PROMPT).ids, tokenizer.encode(SOLUTION).ids
    nll = [by_hand_nll(llama_cpp, f, context, target).mean() for f in (calibrated, plain)]
    assert abs(nll[0] - nll[1]) < 0.5, nll
