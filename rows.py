"""The rows of the bench's comparison as values: what a row runs (an engine and an exit rule), what a fresh process
loads to run it alone (its deployment), how the table and plot show it; and the rows of the default comparison
(bench.py), built with River's engines and a tau chosen on the choosing split."""
from dataclasses import dataclass, field

import torch

from calibrate import Calibration, calibrate_tau, cap_depth, mean_nll, teacher_forced
from cli import fail
from exit_policy import NEVER, RIVER_ONLY, ExitRule, similarity
from kv_strategies import STRATEGIES, BaselineEngine
from measure import log, step_bytes
from river import DEFAULT_HEAD_BITS, Engine, ExitRiver, default_activations, default_eight_bit_layers
from speculative import generate_speculative


# ------------------------------------------------------------------------------------------------ a row

@dataclass(frozen=True)
class RiverKind:
    """The low-bit copies a row's river is made of: bits, activations and the blocks kept at 8 bits."""
    name: str
    bits: int
    activations: str
    eight_bit_layers: tuple = ()
    head_bits: int | None = None  # the river's own LM head (None: the model's bf16 head)
    calibration: tuple | None = None  # token sequences GPTQ rounds the copies on (gptq.py); None: nearest rounding

    def build(self, model, group_size, refine_steps=10):
        return ExitRiver(model, self.bits, group_size, self.activations, self.eight_bit_layers, refine_steps,
                         head_bits=self.head_bits, calibration=self.calibration)

    def loader_args(self):
        """What river.load_river takes to build this river as it streams the checkpoint."""
        return {"bits": self.bits, "activations": self.activations, "eight_bit_layers": list(self.eight_bit_layers),
                "head_bits": self.head_bits,
                "calibration": None if self.calibration is None else [list(s) for s in self.calibration]}


def own_river(device, held=None, n_layers=None, name="main", calibration=None):
    """River's own copies: on CPU 4-bit with int16 activations and the last block 8-bit (README, "The last block at
    8 bits"), on CUDA 4-bit W4A16; for a backbone holding only its first `held` blocks (a capped River), every copy
    from there on 8-bit (river.default_eight_bit_layers); the river's 8-bit LM head (river.DEFAULT_HEAD_BITS), except
    for a capped River, whose point is memory (the model's head stays resident as the embedding: a second head
    would add its bytes). calibration: the token sequences GPTQ rounds them on (None: nearest rounding)."""
    activations = default_activations(device)
    return RiverKind(name, 4, activations, default_eight_bit_layers(4, activations, held, n_layers),
                     DEFAULT_HEAD_BITS if held is None else None, calibration)


W4A16 = RiverKind("w4a16", 4, "bf16")  # every block 4-bit through PyTorch's kernel, the model's head: the paper's
                                       # W4A16, the control


def eight_bit_river(device, calibration=None):
    """Every block 8-bit, int16 activations: CPU only (None elsewhere)."""
    activations = default_activations(device)
    return RiverKind("8bit", 8, activations, head_bits=DEFAULT_HEAD_BITS, calibration=calibration) \
        if activations == "int16" else None


@dataclass(frozen=True)
class Deployment:
    """What a process running one row alone loads: the river's kind (None: no river), the backbone blocks it holds
    (None: all; 0: none, the whole-model low-bit mode), and a KV strategy's class (None: River's engine). Rows that
    differ only in their rule's tau load the same weights and run the same code: they share one memory probe."""
    river: RiverKind | None = None
    held: int | None = None
    strategy: type | None = None

    @property
    def name(self):
        if self.strategy is not None:
            return self.strategy.__name__.lower()
        if self.river is None:
            return "backbone"
        runs = "quantized" if self.held == 0 else "river"
        return f"{runs}, river {self.river.name}" + ("" if self.held is None else f", {self.held} backbone blocks")

    def spec(self, rule):
        """The --memory-probe spec of this deployment running `rule`, as strict JSON."""
        return {"river": None if self.river is None else self.river.loader_args(), "held": self.held,
                "strategy": None if self.strategy is None else self.strategy.__name__, "rule": rule.as_json()}


@dataclass(frozen=True)
class Mark:
    """How the plot draws a row on its own: marker and legend label; strategies_panel: beside the KV strategies
    without a river (their losses are orders of magnitude larger) rather than beside River's sweep."""
    marker: str
    label: str
    strategies_panel: bool = False


@dataclass(frozen=True)
class Row:
    """One row of the comparison: its name, the engine it runs and the exit rule it runs it under, what a fresh
    process loads to run it alone, and how the plot shows it (in_sweep: a point of River's tau sweep line)."""
    name: str
    engine: Engine
    rule: ExitRule
    deployment: Deployment
    in_sweep: bool = False
    mark: Mark | None = None
    file = None  # what a peer's weight file holds (llamacpp.gguf_weights); this project's rows have none

    def generate(self, prompt, new_tokens):
        return self.engine.generate(prompt, new_tokens, self.rule)

    def score(self, context, target):
        """(logits predicting each target token, decode depths, cache): calibrate.teacher_forced under the rule."""
        return teacher_forced(self.engine, self.rule, context, target)

    @property
    def tau(self):
        return self.rule.tau if self.rule.checks_similarity else None

    @property
    def path(self):
        return self.engine.path

    @property
    def river(self):
        """The ExitRiver this row runs: None for the backbone and the KV strategies."""
        return self.engine.river if self.deployment.river is not None else None

    def bytes_per_step(self, depths, positions):
        """Mean bytes a decode step of this row reads at these depths and positions (measure.step_bytes)."""
        return step_bytes(self.engine.model, self.river, depths, positions)

    def description(self):
        """The table's and JSON's words for its weights: (weights, bits per block or None, activations)."""
        river = self.river
        if river is None:
            return "bf16" if self.engine.model.dtype == torch.bfloat16 else "fp32", None, "fp32"
        bits = "/".join(str(b) for b in sorted(set(river.bits)))
        return f"{bits}b/{'i16' if river.activations == 'int16' else 'bf16'}", river.bits, river.activations


class SpeculativeRow(Row):
    """Lossless River (speculative.py): the row's river drafts under its rule, the whole backbone checks. Its output is
    the backbone's (greedy: token for token; tests and bench's identical count hold it), so its quality is the
    backbone's own teacher-forced scores."""

    def generate(self, prompt, new_tokens):
        return generate_speculative(self.engine, prompt, new_tokens, self.rule)

    def score(self, context, target):
        return teacher_forced(self.engine, NEVER, context, target)

    def bytes_per_step(self, depths, positions):
        return None  # a round is drafts and a check: no step of its own

    @property
    def tau(self):
        return None

    def description(self):
        weights, bits, activations = super().description()
        return f"{weights}+bf16", bits, activations  # drafts, then checks


# ---------------------------------------------------------------------------------------- the default comparison

@dataclass(frozen=True)
class Built:
    """An engine on the backbone and a river of one kind."""
    kind: RiverKind
    engine: Engine

    def deployment(self, held=None):
        return Deployment(self.kind, held)


def build(model, kind, args):
    """Built: `kind`'s river of the model, and an engine running it."""
    river = kind.build(model, args.group_size)
    return Built(kind, Engine(model, river, native=args.isa, compile=not args.no_compile))


@dataclass
class Comparison:
    """The rows, in the table's order, and the ones the summary names: the backbone (the reference every row's
    quality is measured against), River at --tau, the two whole-model low-bit controls, the capped River and the
    calibrated one (None when no tau met the budget)."""
    rows: list
    backbone: Row
    river: Row
    quantized: Row
    quantized_main: Row
    capped: Row
    calibrated: Row | None
    speculative: Row | None
    peers: list = field(default_factory=list)  # llama.cpp's rows (bench.py adds them where llama_cpp imports)


def strategy_rows(model, args):
    """With --strategies, the KV strategies without a river, each under River's rule at --tau."""
    return [Row(s.__name__.lower(), BaselineEngine(model, s, not args.no_compile), similarity(args.tau),
                Deployment(strategy=s), mark=Mark("x", f"{s.__name__.lower()} (tau {args.tau:g})", True))
            for s in (STRATEGIES if args.strategies else ())]


def comparison(model, args, sizes, main, w4a16, eight_bit, capped, nearest, calibrated_tau, depth_cap):
    """The rows of the default comparison, in the table's order: the backbone, the whole-model low-bit controls,
    River at --tau and its variants (other copies, the capped backbone, the calibrated tau), the rest of the tau
    sweep, the KV strategies. main, w4a16, eight_bit (None off CPU), capped, nearest (River's own copies rounded
    without GPTQ): River's engines by their copies."""
    rule = similarity(args.tau)
    backbone = Row("backbone", main.engine, NEVER, Deployment())
    quantized = Row("quantized", w4a16.engine, RIVER_ONLY, w4a16.deployment(held=0),
                    mark=Mark("s", "whole model 4-bit W4A16 (control)"))
    quantized_main = Row("quantized_main", main.engine, RIVER_ONLY, main.deployment(held=0),
                         mark=Mark("D", "whole model, River's copies"))
    river = Row("river", main.engine, rule, main.deployment(), in_sweep=True)
    variants = [Row("river_w4a16", w4a16.engine, rule, w4a16.deployment(), mark=Mark("v", "River, W4A16 copies")),
                Row("river_nearest", nearest.engine, rule, nearest.deployment(),
                    mark=Mark("<", "River, copies rounded to nearest (no GPTQ)"))]
    if eight_bit is not None:
        variants.append(Row("river_8bit", eight_bit.engine, rule, eight_bit.deployment(),
                            mark=Mark("^", "River, 8-bit copies")))
    capped_row = Row("river_capped", capped.engine, rule.capped(depth_cap), capped.deployment(held=depth_cap),
                     mark=Mark("P", "River, backbone capped (memory)"))
    variants.append(capped_row)
    calibrated = None
    if calibrated_tau is not None:
        calibrated = Row("river_calibrated", main.engine, similarity(calibrated_tau), main.deployment(),
                         mark=Mark("X", "River, tau from the quality budget"))
        variants.append(calibrated)
    sweep = [Row(f"river_tau{t:g}", main.engine, similarity(t), main.deployment(), in_sweep=True)
             for t in sizes.taus if t != args.tau]
    speculative = None
    if main.engine.native is not None:  # needs the bit-equal native check pass
        speculative = SpeculativeRow("river_speculative", main.engine, RIVER_ONLY, main.deployment(),
                                     mark=Mark("*", "lossless River: River's copies draft, the backbone checks"))
        variants.append(speculative)
    rows = [backbone, quantized, quantized_main, river, *variants, *sweep, *strategy_rows(model, args)]
    return Comparison(rows, backbone, river, quantized, quantized_main, capped_row, calibrated, speculative)


@dataclass
class Calibrated:
    """calibrate.calibrate_tau's result on the choosing split, where its budget came from, and the whole-model
    4-bit NLL increase there (the default budget's source)."""
    result: Calibration
    budget_source: str
    whole_model_increase: float


def tau_from_budget(main, w4a16, sequences, taus, budget=None):
    """tau from a quality budget on the choosing split (calibrate.calibrate_tau) with River's own copies. Default
    budget: half of the whole-model 4-bit NLL increase (the W4A16 control) on the same split."""
    backbone_nll, _ = mean_nll(main.engine, NEVER, sequences)
    whole_model, _ = mean_nll(w4a16.engine, RIVER_ONLY, sequences)
    increase = whole_model - backbone_nll
    if budget is None and increase <= 0:
        fail(f"the whole-model 4-bit NLL increase on the choosing split is {increase:+.4f}: no default budget; "
             "give --quality-budget")
    source = "--quality-budget" if budget is not None else \
        "half the whole-model 4-bit (W4A16 control) NLL increase on the choosing split"
    budget = increase / 2 if budget is None else budget
    return Calibrated(calibrate_tau(main.engine, sequences, taus, budget, backbone_nll, log), source, increase)


def build_comparison(model, args, sizes, inputs):
    """(Comparison, Calibrated, the capped River's depth): River's engines, tau chosen on the choosing split with
    them, the cap from that choice (or --max-backbone-depth), then the rows."""
    log(f"backbone in {args.dtype}; building the rivers (groups of {args.group_size}; GPTQ on the rounding split, "
        "about 25 s each the first time) ...")
    gptq_on = inputs.rounding
    main, w4a16 = build(model, own_river(model.device, calibration=gptq_on), args), build(model, W4A16, args)
    nearest = build(model, own_river(model.device, name="nearest"), args)
    eight_bit = eight_bit_river(model.device, gptq_on)
    eight_bit = None if eight_bit is None else build(model, eight_bit, args)
    log(f"choosing split: {len(inputs.choosing)} sequences, teacher-forced")
    calibrated = tau_from_budget(main, w4a16, inputs.choosing, sorted(set(sizes.taus) | {args.tau}),
                                 args.quality_budget)
    depth_cap = args.max_backbone_depth
    if depth_cap is None:
        depth_cap = cap_depth(calibrated.result.depths[args.tau])
    capped = build(model, own_river(model.device, depth_cap, model.cfg.n_layers, "capped", gptq_on), args)
    rows = comparison(model, args, sizes, main, w4a16, eight_bit, capped, nearest, calibrated.result.tau, depth_cap)
    return rows, calibrated, depth_cap


