"""GPTQ (gptq.py) against plain nearest rounding and a dequantized matmul: what it promises is a smaller output error
on the inputs it was given, in the kernels' format; its cache gives back exactly what it made."""
import pytest
import torch
from hypothesis import given, strategies as st

import gptq
from conftest import PROPERTY, tiny_configs, tiny_model
from model import LlamaConfig
from quantize import pack_lowbit, quantize_weight
from river import ExitRiver, load_river


def output_error(w, qw, x):
    """Mean squared error of the rounded weight's outputs on inputs x (T, K): the dequantized matmul, by hand."""
    return ((x @ w.float().t() - x @ qw.dequantize().t()) ** 2).mean().item()


def correlated_inputs(K, T, seed):
    """(T, K) inputs like a model's: a few strong directions, unequal energy per feature, some features dead."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K // 4, K, generator=g) * torch.rand(K, generator=g) * 3
    x = torch.randn(T, K // 4, generator=g) @ mix + 0.1 * torch.randn(T, K, generator=g)
    x[:, :3] = 0  # inputs that never fire: GPTQ must not divide by their zero energy
    return x


@PROPERTY
@given(st.sampled_from([4, 8]), st.sampled_from([32, 64]), st.integers(1, 3), st.integers(0, 2 ** 16))
def test_gptq_lowers_the_output_error_on_its_inputs(bits, group_size, groups, seed):
    """On the inputs its hessian came from, GPTQ's weight gives outputs closer to the original's than every weight
    rounded to its nearest grid point (with the same least squares per group); codes stay in range, shapes stay."""
    K, N = group_size * groups * 2, 48
    x = correlated_inputs(K, 4 * K, seed)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    qw = gptq.gptq(w, x.t() @ x, bits, group_size)
    assert qw.q.shape == (N, K) and qw.scale.shape == qw.low.shape == (N, K // group_size)
    assert int(qw.q.max()) <= 2 ** bits - 1
    assert torch.equal(qw.scale, qw.scale.half().float()) and torch.equal(qw.low, qw.low.half().float())
    assert output_error(w, qw, x) < output_error(w, quantize_weight(w, bits, group_size), x)


def test_gptq_refuses_what_it_cannot_round():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match="hessian of shape"):
        gptq.gptq(w, torch.eye(32), 4, 32)
    with pytest.raises(ValueError, match="group_size 64 divides"):
        gptq.gptq(torch.randn(16, 96), torch.eye(96), 4, 64)
    with pytest.raises(ValueError, match="damp must be positive"):
        gptq.gptq(w, torch.eye(64), 4, 32, damp=0.0)


def test_the_cache_gives_back_what_gptq_made(tmp_path, monkeypatch):
    """rounded() equals gptq() the first time and, read from the cache, the second; a different hessian is another
    entry; a corrupt entry is made again, not trusted."""
    monkeypatch.setattr(gptq, "cache_dir", lambda: tmp_path)
    x = correlated_inputs(64, 256, 0)
    w = torch.randn(32, 64).to(torch.bfloat16)
    made = gptq.gptq(w, x.t() @ x, 4, 32)
    calls = []
    real = gptq.gptq
    monkeypatch.setattr(gptq, "gptq", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):
        got = gptq.rounded(w, x.t() @ x, 4, 32)
        assert torch.equal(got.q, made.q) and torch.equal(got.scale, made.scale) and torch.equal(got.low, made.low)
    assert len(calls) == 1
    gptq.rounded(w, 2 * x.t() @ x, 4, 32)
    assert len(calls) == 2 and len(list(tmp_path.glob("gptq/*.pt"))) == 2
    for entry in tmp_path.glob("gptq/*.pt"):
        entry.write_bytes(entry.read_bytes()[:100])
    got = gptq.rounded(w, x.t() @ x, 4, 32)
    assert len(calls) == 3 and torch.equal(got.q, made.q)
    assert not list(tmp_path.glob("gptq/.*"))  # no temporary file left behind


@PROPERTY
@given(cfg=tiny_configs(quantizable=True), seed=st.integers(0, 2 ** 16))
def test_a_calibrated_river_rounds_each_block_on_the_backbones_own_inputs(cfg, seed, tmp_path_factory):
    """ExitRiver(calibration=...) rounds each copy on what its backbone twin reads from those sequences: checked by
    running the backbone by hand, collecting each matrix's inputs, and comparing with GPTQ on them."""
    cfg = LlamaConfig(**{**cfg.__dict__, "vocab_size": 64})
    model = tiny_model(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 14)]
    cache = tmp_path_factory.mktemp("gptq")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gptq, "cache_dir", lambda: cache)
        river = ExitRiver(model, 4, 32, calibration=sequences)
    states = [model.embed_tokens(torch.tensor([s])).float() for s in sequences]
    for block, copy in zip(model.blocks, river.blocks):
        inputs = {}
        hooks = [m.register_forward_hook(lambda mod, a, out, name=name: inputs.setdefault(name, []).append(
            a[0].reshape(-1, a[0].shape[-1]).float())) for name, m in block.named_modules() if name.count(".") == 1]
        states = [block(x, model.positions(0, x.shape[1], None, torch.float32), None) for x in states]
        for hook in hooks:
            hook.remove()
        assert sorted(inputs) == ["attn.wo", "attn.wqkv", "mlp.w_down", "mlp.w_gate_up"]
        for name, xs in inputs.items():
            hessian = sum(x.t() @ x for x in xs)  # summed over the sequences in order, as the river sums them
            parent, child = name.split(".")
            expected = gptq.gptq(getattr(getattr(block, parent), child).weight, hessian, 4, 32)
            got = getattr(getattr(copy, parent), child).packed
            assert torch.equal(got, pack_lowbit(expected.q, expected.scale, expected.low, 4)), name


def test_a_stored_river_loads_as_it_was_made_without_calibrating_again(deep_checkpoint, tmp_path, monkeypatch):
    """load_river with calibration keeps the rounded river; the next load takes it as it is (every packed byte equal,
    the calibration pass never run), other settings are another entry, and a damaged entry is made again."""
    monkeypatch.setattr(gptq, "cache_dir", lambda: tmp_path)
    sequences = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    _, made, _ = load_river(deep_checkpoint, bits=4, group_size=32, head_bits=8, calibration=sequences)
    entries = list(tmp_path.glob("rivers/*.pt"))
    assert len(entries) == 1
    real = gptq.CalibrationInputs
    import river as river_module
    monkeypatch.setattr(river_module, "CalibrationInputs", None)  # a second calibration pass would fail
    _, loaded, _ = load_river(deep_checkpoint, bits=4, group_size=32, head_bits=8, calibration=sequences)
    for a, b in zip(made.state_dict().items(), loaded.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    monkeypatch.setattr(river_module, "CalibrationInputs", real)
    load_river(deep_checkpoint, bits=4, group_size=32, head_bits=4, calibration=sequences)
    assert len(list(tmp_path.glob("rivers/*.pt"))) == 2
    entries[0].write_bytes(b"not a river")
    _, remade, _ = load_river(deep_checkpoint, bits=4, group_size=32, head_bits=8, calibration=sequences)
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), remade.state_dict().values()))
    assert not list(tmp_path.glob("rivers/.*"))
