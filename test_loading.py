"""Loading: a depth-capped model reads and holds only its first blocks (the streaming loader), the bundled model end to
end, and every way a checkpoint can be bad."""
import collections
import gc
import inspect
import json
import os
import socket
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import storage
import load_weights
from conftest import DEEP
from exit_policy import NEVER, after, similarity
from load_weights import load_model
from model import LlamaConfig
from river import Engine, ExitRiver, default_eight_bit_layers, load_river


# ----------------------------------------------------------------------------------------- the streaming loader

def block_tensors(layer):
    """The HF tensor names of one block."""
    return [name for name in load_weights.hf_tensor_shapes(DEEP) if name.startswith(f"model.layers.{layer}.")]


@pytest.fixture
def streams(monkeypatch):
    """Every block stream a load opens (load_weights.stream_blocks), in order: per stream, a weak reference to each
    block it handed out, and how many of the blocks it handed out before were still held anywhere at that moment."""
    opened = []
    stream_blocks = load_weights.stream_blocks

    def tracked(checkpoint, cfg, layers, device, dtype):
        stream = types.SimpleNamespace(blocks=[], held_before=[])
        opened.append(stream)
        for block in stream_blocks(checkpoint, cfg, layers, device, dtype):
            gc.collect()
            stream.held_before.append(sum(ref() is not None for ref in stream.blocks))
            stream.blocks.append(weakref.ref(block))
            yield block
    monkeypatch.setattr(load_weights, "stream_blocks", tracked)
    return opened


def parameter_count(cfg, depth):
    """Parameters of the embedding (the head tied to it), final norm and the first `depth` blocks, by hand."""
    d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    block = 2 * d + d * (q + 2 * kv) + q * d + d * 2 * f + f * d
    return cfg.vocab_size * d + d + depth * block


def assert_holds_first_blocks(model, depth):
    """The model holds blocks 0..depth-1 and nothing of a deeper one: no parameter or state of it, and exactly the
    bytes of its first blocks in bf16."""
    assert [block.layer for block in model.blocks] == list(range(depth))
    names = set(dict(model.named_parameters())) | set(model.state_dict())
    assert {int(name.split(".")[1]) for name in names if name.startswith("blocks.")} == set(range(depth))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == 2 * parameter_count(model.cfg, depth)
    assert list(model.buffers()) == []


@pytest.mark.parametrize("depth", [0, 1, 3, 4])
def test_blocks_past_the_depth_are_never_resident(deep_checkpoint, depth, reads, streams):
    """load_model and load_river with held=D hold blocks 0..D-1 only. load_model never reads a deeper block;
    load_river reads each deeper block once, for its river copy, and drops it at once: when a block is handed out, at
    most the one before it (the copy being made of it) is still held, and none is once the load returns."""
    model, _ = load_model(deep_checkpoint, dtype=torch.bfloat16, held=depth)
    assert_holds_first_blocks(model, depth)
    assert reads == collections.Counter(["model.embed_tokens.weight", "model.norm.weight"]
                                        + [n for layer in range(depth) for n in block_tensors(layer)])
    assert [[ref() for ref in stream.blocks] for stream in streams] == [list(model.blocks)]
    reads.clear(), streams.clear()
    del model
    model, river, _ = load_river(deep_checkpoint, held=depth)
    assert_holds_first_blocks(model, depth)
    assert reads == collections.Counter(["model.embed_tokens.weight", "model.norm.weight"]
                                        + [n for layer in range(DEEP.n_layers) for n in block_tensors(layer)]
                                        + [n for layer in range(depth) for n in block_tensors(layer)])
    *_, copied, kept = streams  # the blocks read for the river, then those kept
    assert max(copied.held_before) <= 1, "blocks read for their river copies were held past the next one"
    gc.collect()
    assert [ref() for ref in copied.blocks] == [None] * DEEP.n_layers, "a block read for its river copy is still held"
    assert [ref() for ref in kept.blocks] == list(model.blocks)
    assert [block.layer for block in river.blocks] == list(range(DEEP.n_layers))
    assert not any(isinstance(m, nn.Linear) for m in river.modules()), "a full-precision matrix in the river"


def test_load_blocks_reads_each_block_only_when_asked(deep_checkpoint, reads):
    """load_blocks is a generator: opening it reads no weight, and each block is read when it is asked for, the
    blocks after it not yet; its blocks are the whole model's."""
    whole, _ = load_model(deep_checkpoint, dtype=torch.bfloat16)
    reads.clear()
    stream = load_weights.load_blocks(deep_checkpoint, None, "cpu", torch.bfloat16)
    assert inspect.isgenerator(stream) and not reads
    for layer in range(DEEP.n_layers):
        block = next(stream)
        assert block.layer == layer
        assert reads == collections.Counter(n for l in range(layer + 1) for n in block_tensors(l))
        assert block.state_dict().keys() == whole.blocks[layer].state_dict().keys()
        assert all(torch.equal(v, whole.blocks[layer].state_dict()[k]) for k, v in block.state_dict().items())
    with pytest.raises(StopIteration):
        next(stream)
    reads.clear()
    assert [block.layer for block in load_weights.load_blocks(deep_checkpoint, [2], "cpu", torch.bfloat16)] == [2]
    assert reads == collections.Counter(block_tensors(2))


def run_steps(engine, tokens, n_prompt, rule):
    """Prefill, then one decode step per later token: (each step's logits and depth, the cache)."""
    cache = engine.model.new_cache(len(tokens))
    steps = [engine.forward(torch.tensor([tokens[:n_prompt]]), 0, cache, rule, all_logits=True)]
    steps += [engine.forward(torch.tensor([[tokens[t]]]), t, cache, rule)
              for t in range(n_prompt, len(tokens))]
    return steps, cache


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_a_river_loaded_with_d_blocks_is_bit_equal_to_the_whole_model_capped_at_d(deep_checkpoint, depth):
    """load_river(held=D) against the whole model loaded with load_model and its ExitRiver, each under the rule capped
    at D (ExitRule.capped): the same river weights, and on the torch path and the native one alike the same logits,
    depths, K/V and record, bit for bit, and the same generated tokens. At D = the layer count, also the whole model
    under the rule uncapped, today's River."""
    model, river, _ = load_river(deep_checkpoint, held=depth)
    whole, _ = load_model(deep_checkpoint, dtype=torch.bfloat16)
    whole_river = ExitRiver(whole, 4, 64, eight_bit_layers=default_eight_bit_layers(4, "int16", depth, DEEP.n_layers))
    a, b = river.state_dict(), whole_river.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(depth)).tolist()
    assert len(model.blocks) == depth
    for native in (False, None):
        engines = [(Engine(model, river, native=native), True), (Engine(whole, whole_river, native=native), True)]
        if depth == DEEP.n_layers:
            engines.append((Engine(whole, whole_river, native=native), False))
        assert len({e.path for e, _ in engines}) == 1
        for rule in (similarity(2.0), after(2), similarity(0.3)):
            rules = [rule.capped(depth) if capped else rule for _, capped in engines]
            (steps, cache), *others = [run_steps(e, tokens, 5, r) for (e, _), r in zip(engines, rules)]
            assert max(d for _, d in steps) <= depth
            for other_steps, other_cache in others:
                assert [d for _, d in other_steps] == [d for _, d in steps]
                assert all(torch.equal(x, y) for (x, _), (y, _) in zip(other_steps, steps))
                assert torch.equal(other_cache.k, cache.k) and torch.equal(other_cache.v, cache.v)
                assert (other_cache.writer == cache.writer).all()
            runs = [e.generate(tokens[:5], 4, r) for (e, _), r in zip(engines, rules)]
            assert all(r.tokens == runs[0].tokens and r.depths == runs[0].depths for r in runs)


# -------------------------------------------------------------------------------------------- the bundled model

def greedy(model, tokenizer, text, n):
    return tokenizer.decode(Engine(model).generate(tokenizer.encode(text).ids, n, NEVER,
                                                   stop_ids=[2]).tokens)


def test_bundled_model_knows_the_capital_of_france(bundled):
    model, tokenizer = bundled
    ids = tokenizer.encode("The capital of France is").ids
    with torch.no_grad():
        next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Paris"
    reply = greedy(model, tokenizer, load_weights.chat_prompt("What is the capital of France?"), 20)
    assert "Paris" in reply


def test_stop_tokens_come_from_the_checkpoint(bundled):
    _, tokenizer = bundled
    assert load_weights.stop_token_ids(tokenizer) == [0, 2]  # <|endoftext|>, <|im_end|> (also its eos_token)


def test_bundled_tokenizer_keeps_chat_markers_whole(bundled):
    _, tokenizer = bundled
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[-1] == 2
    assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x + 12").ids) == "def f(x):\n    return x + 12"


def test_export_then_load_gives_the_same_logits(bundled, tmp_path):
    model, tokenizer = bundled
    subprocess.run([sys.executable, "load_weights.py", "--export", str(tmp_path / "hf")], check=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    exported, exported_tokenizer = load_model(tmp_path / "hf")
    ids = tokenizer.encode("def add(a, b):").ids
    assert exported_tokenizer.encode("def add(a, b):").ids == ids
    with torch.no_grad():
        assert torch.equal(exported(torch.tensor([ids])), model(torch.tensor([ids])))


def test_first_runs_at_once_both_get_the_model_and_abandoned_conversions_are_removed(tmp_path):
    """Two first runs race to convert the bundled model into an empty cache: both load it (the loser of the
    rename takes the winner's folder). The staging folders of conversions that died (their process gone, or
    older than any conversion takes) are removed by the next conversion; a live one is left alone."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    dead = tmp_path / f"{load_weights.STAGING_PREFIX}{host}-{ended.pid}-a1b2c3d4"
    old = tmp_path / f"{load_weights.STAGING_PREFIX}elsewhere-1-a1b2c3d4"
    live = tmp_path / f"{load_weights.STAGING_PREFIX}{host}-{os.getpid()}-a1b2c3d4"
    for staging in (dead, old, live):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"half a model")
    hours_ago = time.time() - 2 * load_weights.ABANDONED_AFTER_S
    os.utime(old, (hours_ago, hours_ago))
    env = {**os.environ, storage.CACHE_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"}  # one core each
    runs = [subprocess.Popen([sys.executable, "-c", "import load_weights; load_weights.load_model()"], env=env,
                             cwd=Path(__file__).parent, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate()[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([load_weights.BUNDLED_NAME, live.name])


def test_bundled_river_with_tau_above_one_equals_backbone_and_exits_early_below(bundled):
    model, tokenizer = bundled
    engine = Engine(model, ExitRiver(model, 4, 64))
    prompt = tokenizer.encode("def fibonacci(n):").ids
    backbone = engine.generate(prompt, 8, NEVER)
    assert engine.generate(prompt, 8, similarity(1.1)).tokens == backbone.tokens
    early = engine.generate(prompt, 8, similarity(0.9))
    assert max(early.depths) < model.cfg.n_layers


# ---------------------------------------------------------------------------------------------- bad checkpoints

def test_small_checkpoint_loads(small_checkpoint):
    model, _ = load_model(small_checkpoint)
    assert model.cfg.n_layers == 1


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder_and_files(small_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (small_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        load_model(small_checkpoint)


def test_missing_weights_file(small_checkpoint):
    (small_checkpoint / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(small_checkpoint)


def test_missing_config(small_checkpoint):
    (small_checkpoint / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(small_checkpoint)


def test_truncated_weights(small_checkpoint):
    path = small_checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(small_checkpoint)


def test_missing_tensor_and_wrong_shape_are_named(small_checkpoint):
    path = small_checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(9, 16)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(9, 16\), "
                                         r"config.json implies \(8, 16\)"):
        load_model(small_checkpoint)
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.k_proj.weight is missing"):
        load_model(small_checkpoint)


def test_other_architectures_are_refused(small_checkpoint):
    edit_config(small_checkpoint, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="only Llama-style decoders"):
        load_model(small_checkpoint)


def test_tokenizer_larger_than_vocabulary_is_refused(small_checkpoint):
    edit_config(small_checkpoint, vocab_size=1000)
    with pytest.raises(ValueError, match="the tokenizer does not belong to this model"):
        load_model(small_checkpoint)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=3, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="LlamaConfig.n_layers must be a positive int"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=0, n_heads=2, n_kv_heads=2, ffn_dim=8)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                    rope_scaling={"rope_type": "yarn"})


def test_a_cuda_device_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="device 'cuda:1' does not exist: torch sees 1 CUDA GPU"):
        load_weights.resolve_device("cuda:1")
