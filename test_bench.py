"""bench.py: its command line, its helpers and its --shape path."""
import ast
import collections
import ctypes
import dataclasses
import gc
import graphlib
import inspect
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import calibrate
import kernels
import kv_strategies
import load_weights
from exit_policy import FixedExit, NeverExit, ReplayedExit, SimilarityExit, transition_similarity
from kv_cache import KVCache, Writer
from load_weights import load_model
from model import Block, Linear, LlamaConfig, Transformer, attend
from kv_strategies import STRATEGIES, BaselineEngine
from quantize import QuantizedLinear, QuantizedWeight, check_quant_args, quantize_weight
import river as river_module
from river import (DEFAULT_EIGHT_BIT_LAYERS, DEFAULT_TAU, MODES, Engine, ExitRiver, default_eight_bit_layers,
                   load_river, main as river_main)

from test_river import ISAS_HERE, assert_usage_error, tiny_model, weights_never_load  # noqa: F401


# ------------------------------------------------------------------------------------------------ bench.py

@pytest.mark.parametrize("argv, message", [
    (["--tau", "nan"], "argument --tau: tau must be a finite real number"),
    (["--tau=-inf"], "argument --tau: tau must be a finite real number"),
    (["--group-size", "48"], "argument --group-size: group_size must be a positive multiple of 32"),
    (["--group-size", "128"], "argument --group-size: group_size 128 does not divide the model's d_model 576"),
    (["--threads", "0"], "argument --threads: threads must be >= 1, got 0"),
    (["--device", "tpu"], "argument --device: device 'tpu' is not supported"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--shape", "gpt-9"], "argument --shape: invalid choice: 'gpt-9'"),
    (["--context", "0"], "argument --context: context must be >= 1 token, got 0"),
    (["--context", "8150"], "argument --context: context 8150 plus 64 decoded tokens exceeds the model's context "
                            "of 8192"),
    (["--context", "90000"], r"argument --context: context 90000 is longer than the text's \d+ tokens"),
    (["--plot-scaling", "scaling.png"], "argument --plot-scaling: draws the --shape and --context runs"),
])
def test_bench_bad_argument_is_a_usage_error_before_any_weight_loads(argv, message, capsys, weights_never_load):
    import bench
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)
    assert_usage_error(raised, capsys, message)


@pytest.mark.parametrize("argv, message", [
    (["--text", "missing.txt"], r"--text file \S+missing.txt does not exist"),
    (["--text", "short.txt"], r"\S+short.txt has \d+ tokens; it needs at least 34"),
    (["--text", "latin1.txt"], r"\S+latin1.txt is not UTF-8 text"),
    (["--json", "no/such/folder/out.json"], r"--json \S+out.json: folder \S+folder does not exist"),
    (["--plot", "no/such/folder/out.png"], r"--plot \S+out.png: folder \S+folder does not exist"),
    (["--model", "nowhere"], r"model folder \S+nowhere does not exist"),
])
def test_bench_bad_file_is_a_one_line_error_before_any_weight_loads(argv, message, tmp_path, capsys,
                                                                     weights_never_load):
    import bench
    (tmp_path / "short.txt").write_text("three words here", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 40)
    with pytest.raises(SystemExit) as raised:
        bench.main([argv[0], str(tmp_path / argv[1])])
    assert raised.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err


def test_exit_histogram_counts_every_token_even_past_the_last_layer():
    import bench
    recompute_depths = [1, 3, 3, 7]  # blocks run, those for waiting tokens included: more than 4 layers
    assert bench.exit_histogram(recompute_depths, 4) == [0, 1, 0, 2, 0, 0, 0, 1]
    assert bench.exit_histogram([4, 2], 4) == [0, 0, 1, 0, 1] and bench.exit_histogram([], 2) == [0, 0, 0]


def test_quality_text_windows_and_humaneval(bundled, tmp_path):
    _, tokenizer = bundled
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    windows = calibrate.quality_sequences(tokenizer, 3, 16, text)
    assert len(windows) == 3 and all(len(c) == 32 and 1 < len(t) <= 16 for c, t in windows)
    problems = calibrate.humaneval_problems()
    scored, held_out = calibrate.quality_sequences(tokenizer, 2, 16), calibrate.calibration_sequences(tokenizer, 2, 16)
    assert len(problems) == 164 and len(scored) == len(held_out) == 2
    assert [c for c, _ in scored + held_out] == [tokenizer.encode(p).ids for p, _ in problems[:4]]
    assert [t for _, t in scored + held_out] == [tokenizer.encode(s).ids[:16] for _, s in problems[:4]]


# Published parameter counts of the checkpoints whose shapes --shape runs (tied embeddings counted once).
SHAPE_PARAMETERS = {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", list(SHAPE_PARAMETERS))
def test_known_shapes_build_in_bf16_and_decode_a_replayed_step(name):
    """Each --shape config has its checkpoint's parameter count (counted on the meta device: nothing allocated), and
    at its full width, cut to two blocks and a small vocabulary (the 1B model itself is never built here), builds in
    bf16 with River's copies and decodes a replayed step: groups of 64 tile every input width."""
    import bench
    with torch.device("meta"):
        assert bench.parameter_count(Transformer(bench.SHAPES[name])) == SHAPE_PARAMETERS[name]
    cfg = dataclasses.replace(bench.SHAPES[name], n_layers=2, vocab_size=512)
    model = bench.random_model(cfg)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.embed.weight
    engine = Engine(model, bench.main_river(model, 64, refine_steps=0))
    assert (engine.native is not None) == bool(ISAS_HERE)
    cache = model.new_cache(4)
    engine.forward(torch.tensor([[1, 2, 3]]), 0, cache, "backbone")
    logits, depth = engine.forward(torch.tensor([[4]]), 3, cache, "river", ReplayedExit(0))
    assert depth == 1 and logits.isfinite().all() and cache.holes(4) == []
    assert engine.native_steps == bool(ISAS_HERE)


def test_replayed_depths_follow_the_measured_distribution():
    """Seeded draws: with as many blocks as the source, each depth as often as measured; scaled to 16 blocks, the
    mean share of backbone blocks kept and each depth on one of its scaled value's two neighbours."""
    import bench
    measured = [2] * 50 + [3] * 30 + [5] * 15 + [30] * 5  # depths of a 30-block model
    same = bench.replayed_depths(measured, 30, 30, 20000, seed=1)
    assert same == bench.replayed_depths(measured, 30, 30, 20000, seed=1)
    assert set(same) == set(measured)
    for d in set(measured):
        assert abs(same.count(d) / len(same) - measured.count(d) / len(measured)) < 0.015, d
    scaled = bench.replayed_depths(measured, 16, 30, 20000, seed=2)
    assert set(scaled) == {1, 2, 3, 16}  # 2 and 3 of 30 -> 1.07 and 1.6; 5 -> 2.67; 30 -> 16
    assert abs(sum(scaled) / len(scaled) / 16 - sum(measured) / len(measured) / 30) < 0.005


def test_a_shape_speed_row_runs_end_to_end_and_is_strict_json(monkeypatch):
    """bench.py --shape's whole path for one small shape: random bf16 weights, River's exits replayed from a given
    depth list, both modes decoded, the bandwidth model beside them, a row that writes as strict JSON."""
    import bench
    tiny = LlamaConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16)
    monkeypatch.setitem(bench.SHAPES, "tiny", tiny)
    row = bench.shape_speed("tiny", depths=[3, 4, 5, 3, 30], source_layers=30, prompt=[1, 2, 3], new_tokens=4,
                            repeats=2, group_size=32, read_gb_per_s=40.0)
    assert row["weights"] == "random" and row["config"]["n_layers"] == 4
    assert 1 <= row["river_mean_backbone_blocks"] <= 4 and sum(row["river_exit_histogram"]) == 8
    assert row["speedup"] > 0 and row["modelled"] > 1
    json.dumps(row, allow_nan=False)


def test_a_capped_rivers_copies_from_the_cap_on_are_eight_bit():
    """Blocks from the cap on have no backbone twin left: by default their copies are 8-bit (int16 activations), the
    others 4-bit with the last block 8-bit; no cap (or D = the layer count) is River's usual default."""
    assert default_eight_bit_layers(4, "int16", 3, 8) == (3, 4, 5, 6, 7)
    assert default_eight_bit_layers(4, "int16", None, 8) == default_eight_bit_layers(4, "int16", 8, 8) \
        == DEFAULT_EIGHT_BIT_LAYERS
    assert default_eight_bit_layers(4, "bf16", 3, 8) == () and default_eight_bit_layers(8, "int16", 3, 8) == ()
    cfg = LlamaConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    river = ExitRiver(tiny_model(cfg, 0), 4, 32, "int16", default_eight_bit_layers(4, "int16", 1, cfg.n_layers))
    assert river.bits == [4, 8, 8, 8]

