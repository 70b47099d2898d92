"""The command lines: river.py's (and kv_strategies.py's, which adds the strategies as modes): what each mode loads and
reports, the quality budget, the text streamed as it is generated, and every bad argument or file as a one-line
error."""
import collections
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import calibrate
import kv_strategies
import load_weights
import river as river_module
import river_cli
from conftest import DEEP, assert_usage_error, fastest_within, strict_json, tiny_river
from exit_policy import similarity
from model import LlamaConfig
from river import DEFAULT_TAU, Engine
from river_cli import main as river_main


# ----------------------------------------------------------------------------------------------------- river.py

def times_read_per_layer(reads):
    """{block: how many times each of its tensors was read} from a Counter of HF tensor names read."""
    per_layer = collections.defaultdict(set)
    for name, count in reads.items():
        if name.startswith("model.layers."):
            per_layer[int(name.split(".")[2])].add(count)
    return {layer: counts.pop() if len(counts) == 1 else counts for layer, counts in per_layer.items()}


def test_cli_json_output_is_strict_json(capsys, reads):
    """River capped at 3 blocks on the bundled model: no token runs a fourth, and blocks 3.. are read once (for their
    river copies) and never held; blocks 0..2 twice (their copies, then the blocks kept)."""
    river_main(["--prompt", "The capital of France is", "--max-new-tokens", "3", "--json", "--mode", "river",
                "--max-backbone-depth", "3"])
    out = strict_json(capsys.readouterr().out)
    assert len(out["tokens"]) == 3 and len(out["depths"]) == 3 and max(out["depths"]) <= 3
    assert {"text", "decode_tokens_per_s"} <= out.keys()
    assert out["max_backbone_depth"] == 3 and out["held_blocks"] == 3
    assert out["rule"] == {"tau": DEFAULT_TAU, "min_layer": 0, "max_depth": 3}
    assert out["tau"] == DEFAULT_TAU and out["quality_budget"] is None and out["calibration"] is None
    assert times_read_per_layer(reads) == {layer: 2 if layer < 3 else 1 for layer in range(30)}
    river_main(["--prompt", "Hi", "--max-new-tokens", "1", "--json", "--mode", "backbone"])
    out = strict_json(capsys.readouterr().out)
    assert len(out["tokens"]) == 1 and out["decode_tokens_per_s"] is None, "no decode step, no rate"
    assert out["rule"] == {"tau": None, "min_layer": 0, "max_depth": None} and out["held_blocks"] == 30


def test_cli_river_with_tau_above_one_writes_the_backbones_reply(capsys):
    """River's defaults otherwise (GPTQ copies, the last block and the LM head 8-bit) with --tau 1.5: a chat reply
    token for token the backbone's, every token through all 30 backbone blocks; --json still reports the 8-bit head."""
    argv = ["--prompt", "Give me three tips for staying focused while studying.", "--chat", "--max-new-tokens", "24",
            "--json"]
    river_main(argv + ["--tau", "1.5"])
    river = strict_json(capsys.readouterr().out)
    river_main(argv + ["--mode", "backbone"])
    backbone = strict_json(capsys.readouterr().out)
    assert river["tokens"] == backbone["tokens"] and len(river["tokens"]) == 24
    assert river["depths"] == [30] * 24 and river["head_bits"] == 8 and river["mode"] == "river"


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "argument --prompt: the prompt is empty"),
    (["--tau", "nan"], "argument --tau: tau must be a finite real number"),
    (["--tau", "inf"], "argument --tau: tau must be a finite real number"),
    (["--tau", "x"], "argument --tau: invalid float value: 'x'"),
    (["--temperature", "nan"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "argument --temperature: temperature must be a finite number >= 0"),
    (["--top-p", "0"], r"argument --top-p: top_p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"argument --top-p: top_p must be in \(0, 1\]"),
    (["--top-p", "nan"], r"argument --top-p: top_p must be in \(0, 1\], got nan"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: max_new_tokens must be a positive int, got 0"),
    (["--max-new-tokens", "9000"], "argument --max-new-tokens: prompt of 1 tokens plus 9000 new tokens exceeds "
                                   "the model's context of 8192"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--bits", "3"], "argument --bits: invalid choice: 3"),
    (["--group-size", "40"], "argument --group-size: group_size must be a positive multiple of 32"),
    (["--group-size", "128"], "argument --group-size: group_size 128 does not divide the model's d_model 576"),
    (["--seed", str(2**64)], "argument --seed: seed must be None or an int"),
    (["--device", "tpu"], "argument --device: device 'tpu' is not supported; use cpu or cuda"),
    pytest.param(["--device", "cuda"], "argument --device: device cuda was asked for, but torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the error when CUDA is absent")),
    (["--max-backbone-depth", "31"], r"argument --max-backbone-depth: backbone blocks held must be an int in "
                                     r"\[0, 30\] \(the model's blocks\), got 31"),
    # the id the case had before check_held's message named the blocks held (issue 18 keeps every test id)
    pytest.param(["--max-backbone-depth", "-1"], r"argument --max-backbone-depth: backbone blocks held must be an int "
                                                 r"in \[0, 30\]",
                 id=r"argv20-argument --max-backbone-depth: max_backbone_depth must be an int in \[0, 30\]"),
    (["--max-backbone-depth", "2.5"], "argument --max-backbone-depth: invalid int value: '2.5'"),
    (["--max-backbone-depth", "3", "--mode", "backbone"],
     r"argument --max-backbone-depth: caps River's backbone \(--mode river\); --mode backbone runs every backbone "
     "block"),
    (["--quality-budget", "nan"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "inf"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "0"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget=-0.1"], "argument --quality-budget: quality budget must be a finite NLL increase > 0"),
    (["--quality-budget", "x"], "argument --quality-budget: invalid float value: 'x'"),
    (["--quality-budget", "0.1", "--tau", "0.9"], "argument --tau: not allowed with argument --quality-budget"),
    (["--tau", "0.9", "--quality-budget", "0.1"], "argument --quality-budget: not allowed with argument --tau"),
    (["--quality-budget", "0.1", "--mode", "quantized"], r"argument --quality-budget: picks River's tau \(--mode "
                                                         r"river\); --mode quantized has none"),
])
def test_cli_bad_argument_is_a_usage_error_before_any_weight_loads(argv, message, capsys, weights_never_load):
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x"] + argv)
    assert_usage_error(raised, capsys, message)


@pytest.mark.parametrize("argv, held, read_twice", [
    (["--mode", "river", "--max-backbone-depth", "2"], 2, {0, 1}),
    (["--mode", "river", "--max-backbone-depth", "0"], 0, set()),
    (["--mode", "river"], 4, {0, 1, 2, 3}),
    (["--mode", "quantized"], 0, set()),
    (["--mode", "quantized", "--max-backbone-depth", "3"], 0, set()),
    (["--mode", "backbone"], 4, set()),
])
def test_cli_loads_only_the_blocks_its_mode_runs(deep_checkpoint, argv, held, read_twice, capsys, reads):
    """Each mode holds what it runs and nothing more: River its first D backbone blocks (default all), the quantized
    mode none (with or without a cap); River and the quantized mode read every block once for its river copy, and
    again only the backbone blocks they keep; the backbone reads each block once."""
    river_main(["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "3", "--json"] + argv)
    out = strict_json(capsys.readouterr().out)
    assert out["held_blocks"] == held
    assert max(out["depths"]) <= (0 if "quantized" in argv else held)
    assert times_read_per_layer(reads) == {layer: 2 if layer in read_twice else 1 for layer in range(DEEP.n_layers)}


# ----------------------------------------------------------------------------------- the text as it is generated

class Stdout:
    """A stdout stand-in: each write, with how many engine forward passes had run when it came."""

    def __init__(self, forwards):
        self.forwards, self.writes = forwards, []

    def write(self, text):
        self.writes.append((text, len(self.forwards)))
        return len(text)

    def flush(self):
        pass


@pytest.fixture
def forwards(monkeypatch):
    """A list that gets the depth of every Engine.forward call (a spy on the class: the native step included)."""
    calls, forward = [], Engine.forward

    def counted(self, *args, **kwargs):
        result = forward(self, *args, **kwargs)
        calls.append(result[1])
        return result
    monkeypatch.setattr(Engine, "forward", counted)
    return calls


def test_cli_text_streams_as_it_is_generated(deep_checkpoint, forwards, monkeypatch):
    """Without --json the text reaches stdout token by token while generating (after the first forward pass, before
    the last), then one summary line; it is the text --json reports. With --json nothing is written until every
    forward pass has run, and then one JSON object."""
    argv = ["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "12"]
    stdout = Stdout(forwards)
    monkeypatch.setattr(sys, "stdout", stdout)
    river_main(argv + ["--json"])
    n_forwards = len(forwards)
    assert n_forwards > 2 and {count for _, count in stdout.writes} == {n_forwards}, "--json wrote before the end"
    reply = strict_json("".join(text for text, _ in stdout.writes))
    assert len(reply["tokens"]) == n_forwards and reply["text"].strip()
    forwards.clear()
    stdout.writes.clear()
    river_main(argv)
    assert len(forwards) == n_forwards
    *streamed, (summary, at_the_end), (newline, _) = stdout.writes
    assert "".join(text for text, _ in streamed) == reply["text"] + "\n"
    assert re.fullmatch(r"\[river\] decode [\d.]+ tok/s, mean backbone blocks per token [\d.]+ of 4", summary)
    assert newline == "\n" and at_the_end == n_forwards
    counts = [count for text, count in streamed if text.strip()]
    assert counts == sorted(counts) and counts[0] == 1 and len(set(counts)) > 2 and counts[-2] < n_forwards, \
        "the text did not arrive as it was generated"


def test_the_stream_prints_a_character_split_across_tokens_whole():
    """River's TextStream: after each token, every character complete by then and none that is not (a character
    whose bytes span tokens, 日, 語 and 🙂 in the bundled tokenizer, arrives whole, once its last byte has); close()
    adds what is left and a newline."""
    _, tokenizer = load_weights.load_config_and_tokenizer()
    text = "日本語 🙂 ok"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) - 2, "the case is built for characters split across tokens"
    out = Stdout([])
    stream = river_cli.TextStream(tokenizer, out)
    printed = []
    for i, token in enumerate(ids):
        stream(token)
        whole = tokenizer.decode(ids[:i + 1]).rstrip("\ufffd")  # the complete characters of the first i + 1
        printed.append("".join(text for text, _ in out.writes))
        assert printed[-1] == whole, (i, printed[-1], whole)
    assert not any("\ufffd" in text for text, _ in out.writes)
    assert {"語", "🙂"} <= {text.strip() for text, _ in out.writes}, "a split character was printed in pieces"
    stream.close()
    assert "".join(text for text, _ in out.writes) == text + "\n"
    cut = river_cli.TextStream(tokenizer, Stdout([]))
    for token in tokenizer.encode("日本語").ids[:-1]:  # the last character lacks its last byte
        cut(token)
    cut.close()
    assert "".join(text for text, _ in cut.out.writes) == tokenizer.decode(tokenizer.encode("日本語").ids[:-1]) + "\n"


def test_the_stream_is_not_timed(monkeypatch):
    """generate calls on_token with each token once, in order, outside the timed prefill and steps: with a clock that
    moves only when the stream is called, prefill_s and every step_s are zero."""
    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model, river = tiny_river(cfg, 0, 4)
    clock = [0.0]
    monkeypatch.setattr(river_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    seen = []

    def slow(token):
        seen.append(token)
        clock[0] += 3600.0
    result = Engine(model, river).generate([1, 2, 3], 6, similarity(0.5), on_token=slow)
    assert seen == result.tokens and len(seen) == 6
    assert result.prefill_s == 0.0 and result.step_s == [0.0] * 5


# ------------------------------------------------------------------------------------------- the quality budget

@pytest.fixture
def small_calibration(monkeypatch):
    """--quality-budget on a choosing split of two problems with targets of 6 tokens (the wiring, in seconds),
    recording each call of choosing_sequences, the backbone blocks held by the model calibrate_tau ran on, and the exit
    rule of each NLL it computed."""
    monkeypatch.setattr(calibrate, "CHOOSING", range(100, 102))
    monkeypatch.setattr(calibrate, "MAX_TARGET", 6)
    calls = types.SimpleNamespace(sequences=[], engine_depths=[], rules=[])
    choosing_sequences, calibrate_tau, mean_nll = (calibrate.choosing_sequences, calibrate.calibrate_tau,
                                                   calibrate.mean_nll)

    def recorded_sequences(*args, **kwargs):
        calls.sequences.append((args[1:], kwargs))
        return choosing_sequences(*args, **kwargs)

    def recorded_tau(engine, *args, **kwargs):
        calls.engine_depths.append(len(engine.model.blocks))
        return calibrate_tau(engine, *args, **kwargs)

    def recorded_nll(engine, rule, sequences):
        calls.rules.append(rule)
        return mean_nll(engine, rule, sequences)
    monkeypatch.setattr(calibrate, "choosing_sequences", recorded_sequences)
    monkeypatch.setattr(calibrate, "calibrate_tau", recorded_tau)
    monkeypatch.setattr(calibrate, "mean_nll", recorded_nll)
    return calls


def test_cli_quality_budget_picks_tau_on_the_calibration_split(deep_checkpoint, small_calibration, capsys):
    """--quality-budget on a tiny checkpoint: tau chosen on the choosing split with the whole backbone loaded, the fastest tau within the budget by the reported per-tau results, the cap applied to the run
    after it; strict JSON with the budget, the tau and every tau's results; the tau named on stderr."""
    budget = 0.001  # on this checkpoint and split, between the increases of the two taus that exit earliest
    river_main(["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "3", "--json",
                "--quality-budget", str(budget), "--max-backbone-depth", "2", "--eight-bit-layers", "-1",
                "--rounding", "nearest"])  # the budget lies between two taus' increases with nearest rounding
    captured = capsys.readouterr()
    out = strict_json(captured.out)
    assert [args for args, _ in small_calibration.sequences] == [(2, 6)]
    assert small_calibration.engine_depths == [DEEP.n_layers], "calibrated on a capped backbone"
    assert [rule.max_depth for rule in small_calibration.rules] == [None] * (1 + len(calibrate.CALIBRATION_TAUS))
    calibration = out["calibration"]
    assert out["quality_budget"] == budget and out["held_blocks"] == DEEP.n_layers
    assert out["rule"] == {"tau": out["tau"], "min_layer": 0, "max_depth": 2}
    assert list(calibration["nll_increase"]) == list(calibration["mean_backbone_blocks"]) == [
        str(tau) for tau in calibrate.CALIBRATION_TAUS]
    by_hand = types.SimpleNamespace(nll_increase={float(t): v for t, v in calibration["nll_increase"].items()},
                                    mean_backbone_blocks={float(t): v for t, v in
                                                          calibration["mean_backbone_blocks"].items()})
    assert out["tau"] == calibration["tau"] == fastest_within(by_hand, budget)
    assert out["tau"] is not None and max(calibration["nll_increase"].values()) > budget
    assert max(out["depths"]) <= 2
    assert f"quality budget {budget:g}: tau {out['tau']:g} " in captured.err


def test_cli_quality_budget_no_tau_meets_is_a_one_line_error(deep_checkpoint, small_calibration, monkeypatch, capsys):
    """Every tau costing more than the budget (River's NLL raised by a nat): a one-line error, exit status 1,
    nothing on stdout, after the per-tau results on stderr."""
    mean_nll = calibrate.mean_nll
    monkeypatch.setattr(calibrate, "mean_nll", lambda engine, rule, sequences: (
        lambda nll, depths: (nll + rule.checks_similarity, depths))(*mean_nll(engine, rule, sequences)))
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x", "--model", str(deep_checkpoint), "--quality-budget", "0.5", "--json"])
    assert raised.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert re.fullmatch(r"error: no tau of 0.5 0.8 .* 0.99 meets the quality budget 0.5: the smallest NLL increase "
                        r"on the choosing split is \+\d\.\d{4} \(tau [\d.]+\)", err.splitlines()[-1]), err
    assert len(err.splitlines()) == 1 + len(calibrate.CALIBRATION_TAUS)


# -------------------------------------------------------------------------------- bad checkpoints and processes

def truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def reshape_a_tensor(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(9, 16)
    save_file(tensors, folder / "model.safetensors")


def drop_a_config_field(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (shutil.rmtree, r"model folder \S+ckpt does not exist"),
    (lambda folder: (folder / "model.safetensors").unlink(), r"weights file \S+model.safetensors is missing"),
    (truncate_weights, r"weights file \S+model.safetensors is truncated or corrupt"),
    (reshape_a_tensor, r"tensor model.layers.0.self_attn.k_proj.weight has shape \(9, 16\), config.json implies"),
    (lambda folder: (folder / "config.json").write_text("{"), r"config.json is not valid JSON"),
    (drop_a_config_field, r"config.json lacks the field hidden_size"),
    (lambda folder: (folder / "tokenizer.json").write_text('{"x'), r"tokenizer file \S+ is corrupt"),
], ids=["no folder", "no weights", "truncated", "wrong shape", "config not JSON", "config field", "tokenizer"])
def test_cli_bad_checkpoint_is_a_one_line_error(small_checkpoint, damage, message, capsys):
    damage(small_checkpoint)
    with pytest.raises(SystemExit) as raised:
        river_main(["--prompt", "x", "--model", str(small_checkpoint), "--mode", "backbone"])
    assert raised.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err


def test_cli_errors_in_a_real_process_end_without_a_traceback(small_checkpoint):
    truncate_weights(small_checkpoint)
    for argv, status in ((["river.py", "--prompt", "x", "--tau", "nan"], 2),
                         (["river.py", "--prompt", "x", "--model", str(small_checkpoint), "--mode", "backbone"], 1),
                         (["bench.py", "--threads", "0"], 2)):
        run = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=Path(__file__).parent)
        assert run.returncode == status and run.stdout == "", (argv, run.stderr)
        assert "Traceback" not in run.stderr and run.stderr.splitlines()[-1].startswith(
            (f"{argv[0]}: error: argument ", "error: weights file ")), run.stderr


# --------------------------------------------------------------------------------------------- kv_strategies.py

def test_strategies_command_line_runs_a_strategy(capsys):
    kv_strategies.main(["--prompt", "Hi", "--max-new-tokens", "2", "--json", "--mode", "mask"])
    out = strict_json(capsys.readouterr().out)
    assert out["mode"] == "mask" and len(out["tokens"]) == 2 and out["path"] == "torch, eager, mask"


@pytest.mark.parametrize("rounding", ["gptq", "nearest", None])
def test_cli_rounds_the_river_with_gptq_on_the_calibration_split_by_default(deep_checkpoint, monkeypatch, rounding):
    """river.py's default river is GPTQ-rounded on the rounding split's sequences (context and target as one, HumanEval
    problems 12..23: never the scored problems, nor the ones choices are made on); --rounding nearest rounds without
    data."""
    seen = []
    real = river_cli.load_river
    monkeypatch.setattr(river_cli, "load_river", lambda *a: seen.append(a[-1]) or real(*a))
    river_main(["--prompt", "def f(x):", "--model", str(deep_checkpoint), "--max-new-tokens", "2", "--json"]
               + ([] if rounding is None else ["--rounding", rounding]))
    if rounding == "nearest":
        assert seen == [None]
        return
    _, tokenizer = load_weights.load_config_and_tokenizer(deep_checkpoint)
    problems = calibrate.humaneval_problems()
    split = [(tokenizer.encode(p).ids, tokenizer.encode(s).ids[:calibrate.MAX_TARGET]) for p, s in problems[12:24]]
    assert seen == [tuple(tuple(c + t) for c, t in split)]
    others = [calibrate.problems(tokenizer, part) for part in (calibrate.SCORED, calibrate.CHOOSING)]
    assert not {tuple(c + t) for part in others for c, t in part} & set(seen[0])
