"""The Exit River (a low-bit copy of every block, writing the backbone's KV cache slots) and the generation engine.
`python river.py` runs the command line (river_cli.py)."""
import copy
import time

import torch
import torch.nn as nn

import river_native
from compiled import compiled_function, streamed_head, streamed_step
from exit_policy import ExitRule
from generation import Generation, check_generation, sample, sync
from gptq import CalibrationInputs, load_stored_river, rounded, save_whole, stored_river_path
from kv_cache import Writer
from model import check_held
from quantize import QuantizedLinear, check_quant_args, quantize_weight
from river_native import NativeDecoder

# The paper's operating point, chosen on the choosing split (calibrate.CHOOSING, bundled model): the highest tau of
# calibrate.CALIBRATION_TAUS at which a token still runs the paper's 3 to 4 backbone blocks on average (tau 0.96 runs
# more than 4). The earlier rule, the lowest tau within half the whole-model W4A16 NLL increase, no longer tells taus
# apart with GPTQ copies (every tau meets it there); RESULTS.md has both.
DEFAULT_TAU = 0.95
DEFAULT_GROUP_SIZE = 64
# The last block turns the residual state the most (its transition similarity is the lowest on the bundled model):
# its 4-bit copy cost the most NLL of any single block, and on the choosing split 8 bits still lower River's loss at
# DEFAULT_TAU, for 1.8 MB of weights (RESULTS.md).
DEFAULT_EIGHT_BIT_LAYERS = (-1,)
# The river's LM head, where an exited token ends (a token that ran every backbone block ends at the model's own): at
# 8 bits it costs River almost no NLL on the choosing split at DEFAULT_TAU and a bf16 head's bytes are a large share
# of a River step; 4 bits cost clearly more NLL (RESULTS.md).
DEFAULT_HEAD_BITS = 8


# ---------------------------------------------------------------------------------------------- the river

def default_activations(device):
    """int16 activations on CPU, where integer dot products make low-bit weights fast (the native kernels); bf16 on CUDA
    (PyTorch's 4-bit kernel: the paper's W4A16)."""
    return "int16" if torch.device(device).type == "cpu" else "bf16"


def default_eight_bit_layers(bits, activations, held=None, n_layers=None):
    """River's 8-bit blocks unless asked otherwise, where 8-bit weights can go (int16 activations) and the rest are
    4-bit: the last one; and with only the backbone's first `held` blocks held (a capped River), every block from
    there on. Those copies have no backbone twin left: every token that reaches the cap and every prompt the cap stops
    (a prefill leaves at the minimum over its tokens, so usually at the cap) runs them, and a prompt's K/V there is
    what every later token reads; at 4 bits they cost several times the NLL (RESULTS.md). None otherwise."""
    if bits != 4 or activations != "int16":
        return ()
    if held is None or held >= n_layers:
        return DEFAULT_EIGHT_BIT_LAYERS
    return tuple(range(held, n_layers))  # the last block among them


def river_block(block, bits=4, group_size=64, activations="int16", refine_steps=10, hessians=None, packed=None):
    """A low-bit twin of `block`: same interface, same norms, and -- the point -- the same `layer`,
    so it reads and writes the very cache slots its backbone twin would have written. refine_steps: the quantizer's
    least-squares rounds (quantize_weight). hessians: {matrix name: X^T X of its inputs} to round with GPTQ.
    packed: {matrix name: its packed int16-activation weight} of a stored river, taken as it is."""
    twin = copy.deepcopy(block)
    twin.cache_writer = Writer.RIVER
    device = block.attn_norm.weight.device
    for parent in (twin.attn, twin.mlp):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if packed is not None:
                layer = QuantizedLinear.from_packed(packed[name].to(device), *child.weight.shape, bits, group_size)
            else:
                qw = (quantize_weight(child.weight, bits, group_size, refine_steps) if hessians is None
                      else rounded(child.weight, hessians[name], bits, group_size, refine_steps))
                layer = QuantizedLinear(qw, device, activations)
            setattr(parent, name, layer)
    return twin


def check_group_size_fits(cfg, group_size):
    """Groups must tile the input width of every block weight: d_model (wqkv, w_gate_up), the attention
    heads' width (wo) and ffn_dim (w_down). Checked from the config, before any weight is read or quantized."""
    widths = {"d_model": cfg.d_model, "n_heads * head_dim": cfg.q_dim, "ffn_dim": cfg.ffn_dim}
    misfits = [f"{name} {width}" for name, width in widths.items() if width % group_size]
    if misfits:
        raise ValueError(f"group_size {group_size} does not divide the model's {', '.join(misfits)}")


def check_layers(layers, n_layers):
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"eight_bit_layers must be block indices in [{-n_layers}, {n_layers}), got {layer!r}")


class ExitRiver(nn.Module):
    """One low-bit copy of every backbone block, river block j writing layer j's K/V.

    Blocks in `eight_bit_layers` (negative indices count from the end) get 8-bit weights, the others `bits`:
    where a block's quantization error costs the most, it can be paid for there alone (README, "The last block at
    8 bits").
    refine_steps=0 skips the quantizer's least squares: minutes saved at 1B, for speed runs on random weights.
    blocks: the backbone blocks to copy, in layer order (default model.blocks). An iterator that reads each from the
    checkpoint when asked (load_weights.load_blocks) builds the river of a depth-capped model, whose deep blocks are
    never loaded: each is copied and dropped.
    head_bits: 4 or 8 for a low-bit copy of the LM head, which every pass that left the backbone ends at (a
    departure from the paper, which keeps the original head); None keeps the model's bf16 head. A pass that ran every
    backbone block always ends at the model's own head (Engine.head).
    calibration: token sequences (lists of ids) to round every matrix on with GPTQ (gptq.py), each on the inputs the
    backbone gives it on them; None rounds each weight to its own nearest grid (quantize_weight).
    """

    def __init__(self, model, bits=4, group_size=64, activations=None, eight_bit_layers=(), refine_steps=10,
                 blocks=None, head_bits=None, calibration=None, stored=None):
        super().__init__()
        n_layers = model.cfg.n_layers
        activations = activations or default_activations(model.device)
        check_quant_args(bits, group_size, activations)
        check_group_size_fits(model.cfg, group_size)
        check_layers(eight_bit_layers, n_layers)
        eight = {layer % n_layers for layer in eight_bit_layers}
        if eight:
            check_quant_args(8, group_size, activations)
        self.group_size, self.activations = group_size, activations
        self.bits = [8 if layer in eight else bits for layer in range(n_layers)]  # per block
        if stored is not None and (calibration is not None or activations != "int16"):
            raise ValueError("a stored river is taken as it is (int16 activations): no calibration, no other layout")
        blocks = model.blocks if blocks is None else blocks
        inputs = None if calibration is None else CalibrationInputs(model, calibration)
        pairs = ((b, None) for b in blocks) if inputs is None else inputs.through(blocks)
        self.blocks = nn.ModuleList(river_block(b, self.bits[b.layer], group_size, activations, refine_steps, h,
                                                None if stored is None else stored["blocks"][b.layer])
                                    for b, h in pairs)
        if [b.layer for b in self.blocks] != list(range(n_layers)):
            raise ValueError(f"a river copies every one of the model's {n_layers} blocks in order; got blocks "
                             f"{[b.layer for b in self.blocks]} (a model holding only its first blocks needs blocks=)")
        self.head = None
        if head_bits is not None:
            check_head_bits(head_bits, group_size)
            if stored is not None:
                self.head = QuantizedLinear.from_packed(stored["head"].to(model.device), *model.lm_head.weight.shape,
                                                        head_bits, group_size)
            else:
                qw = (quantize_weight(model.lm_head.weight, head_bits, group_size, refine_steps) if inputs is None
                      else rounded(model.lm_head.weight, inputs.head_hessian(), head_bits, group_size, refine_steps))
                self.head = QuantizedLinear(qw, model.device, "int16")

    def stored(self):
        """What ExitRiver(stored=...) rebuilds this river from (int16 activations): each block's packed weights by
        matrix name, and the head's."""
        return {"blocks": [{name.split(".")[-1]: m.packed for name, m in b.named_modules()
                            if isinstance(m, QuantizedLinear)} for b in self.blocks],
                "head": None if self.head is None else self.head.packed}


def check_head_bits(head_bits, group_size):
    """The river's LM head: 4 or 8 bits, int16 activations whatever the blocks' (its product is the kernels' or
    their twin's)."""
    if isinstance(head_bits, bool) or not isinstance(head_bits, int) or head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8 (None: the model's bf16 head), got {head_bits!r}")
    check_quant_args(head_bits, group_size, "int16")


def load_river(path=None, device="cpu", held=None, bits=4, group_size=DEFAULT_GROUP_SIZE, activations=None,
               eight_bit_layers=None, dtype=torch.bfloat16, head_bits=None, calibration=None):
    """(model holding its first `held` backbone blocks (default all), ExitRiver of every block, tokenizer), read in the
    order that keeps memory lowest: the embedding, final norm and head; each block read, its river copy made and the
    block dropped; then the backbone blocks kept. held 0: a river alone (the whole-model low-bit mode).
    eight_bit_layers: default those of a River holding `held` blocks (default_eight_bit_layers). calibration: token
    sequences to round the copies on with GPTQ (ExitRiver); such a river is kept in the cache folder once made
    (gptq.stored_river_path) and later loads read it, never running the calibration pass again."""
    from load_weights import load_blocks, load_model, model_dir
    model, tokenizer = load_model(path, device, dtype, held=0)
    held = model.cfg.n_layers if held is None else check_held(held, model.cfg.n_layers)
    activations = activations or default_activations(model.device)
    if eight_bit_layers is None:
        eight_bit_layers = default_eight_bit_layers(bits, activations, held, model.cfg.n_layers)
    store = stored = None
    if calibration is not None and activations == "int16":
        settings = {"bits": bits, "group_size": group_size, "eight_bit_layers": sorted(
            layer % model.cfg.n_layers for layer in eight_bit_layers), "head_bits": head_bits}
        store = stored_river_path(model_dir(path), settings, calibration)
        stored = load_stored_river(store)
    river = ExitRiver(model, bits, group_size, activations, eight_bit_layers,
                      blocks=load_blocks(path, None, model.device, dtype), head_bits=head_bits,
                      calibration=None if stored is not None else calibration, stored=stored)
    if store is not None and stored is None:
        save_whole(river.stored(), store)
    model.blocks.extend(load_blocks(path, range(held), model.device, dtype))
    return model, river, tokenizer


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    """Generation on one model and its river: each step runs the backbone until the exit rule says leave, the river
    copies of the remaining blocks, then the original final norm and LM head; every block writes its layer's slots
    of one KV cache. The rule is the whole difference between the modes: NEVER is the backbone, RIVER_ONLY the
    whole model on its low-bit copies, similarity(tau) River."""

    def __init__(self, model, river=None, native=None, compile=False):
        """native: None runs passes through the native kernels (river_native.py) where this CPU and these weights allow
        (bf16 backbone, river with int16 activations), False never, True insists (an error where it cannot); an
        instruction set's name ("avx512", "avx2") picks that one where None would pick the best.
        compile: the torch path's one-token block steps and head through torch.compile (where the native kernels do
        not run: CUDA, bf16 river activations, the KV strategies); the model stays as it is."""
        if river is not None and len(river.blocks) != model.cfg.n_layers:
            raise ValueError(f"river has {len(river.blocks)} blocks, the model {model.cfg.n_layers}")
        self.model, self.river = model, river
        # On CPU the residual stream and activations stay fp32 whatever the weights' precision, as in the
        # native pass; on CUDA they take the weights' dtype (bf16 tensor cores).
        self.act_dtype = torch.float32 if model.device.type == "cpu" else model.dtype
        self.native = None
        if native is not False:
            why = NativeDecoder.unsupported(model, river)
            lib = None if why else river_native.native(native if isinstance(native, str) else None)
            if native is True and (why or lib is None):
                raise ValueError(f"native decode was asked for but cannot run: {why or 'no kernels for this CPU'}")
            if lib is not None:
                self.native = NativeDecoder(lib, model, river)
        self.compiled = compile
        self.rules_checked = set()  # the exit rules check_rule has passed on this engine

    @property
    def path(self):
        """Which code runs the one-token decode steps: "native <instruction set>" or the torch path."""
        if self.native is not None:
            return f"native {self.native.isa}"
        return "torch, compiled" if self.compiled else "torch, eager"

    def check_rule(self, rule):
        """A rule this engine can run: one that may leave the backbone needs a river, and a model holding only its
        first blocks needs a rule that leaves by then."""
        if not isinstance(rule, ExitRule):
            raise TypeError(f"an exit rule must be an exit_policy.ExitRule, got {type(rule).__name__}")
        n_layers, held = self.model.cfg.n_layers, len(self.model.blocks)
        leaves_early = rule.max_depth is not None and rule.max_depth < n_layers  # RIVER_ONLY's max_depth 0 included
        if self.river is None and (rule.checks_similarity or leaves_early):
            raise ValueError(f"{rule} may leave the backbone, and this engine has no ExitRiver to go on with")
        if held < n_layers and (rule.max_depth is None or rule.max_depth > held):
            raise ValueError(f"this model holds only its first {held} of {n_layers} backbone blocks: its rule must "
                             f"leave by then (ExitRule.capped({held})), got {rule}")

    def forward(self, tokens, start, cache, rule, all_logits=False):
        """tokens (B, T) at positions start..start+T-1 -> (logits, backbone blocks run). Logits are (B, 1, vocab) for
        the last token, or (B, T, vocab) with all_logits: a prefill only needs the last. A prefill (T > 1) leaves at
        one depth for all its tokens: the rule sees the minimum over them."""
        if not isinstance(rule, ExitRule) or rule not in self.rules_checked:  # a decode loop brings one rule each step
            self.check_rule(rule)
            self.rules_checked.add(rule)
        if self.native is not None and tokens.shape[0] == 1 and cache is not None:
            return self.native.forward(tokens, start, cache, rule, all_logits)  # no autograd there to switch off
        return self.torch_forward(tokens, start, cache, rule, all_logits)

    @torch.inference_mode()
    def torch_forward(self, tokens, start, cache, rule, all_logits=False):
        """Engine.forward through PyTorch's modules, block by block."""
        model, n_layers = self.model, self.model.cfg.n_layers
        x = model.embed_tokens(tokens).to(self.act_dtype)                     # h_0: (B, T, d_model)
        pos = model.positions(start, tokens.shape[1], cache, self.act_dtype)
        depth = 0
        for block in model.blocks[:rule.max_depth]:
            h = self.run_block(block, x, pos, cache)                          # h_{l+1}
            leaves = depth < n_layers - 1 and rule.leaves(depth, x, h)
            x, depth = h, depth + 1
            if leaves:
                break
        for block in self.river.blocks[depth:] if depth < n_layers else ():
            x = self.run_block(block, x, pos, cache)  # river block j writes layer j: the cache stays whole
        return self.head(x if all_logits else x[:, -1:], depth), depth

    def head(self, x, depth):
        """The final norm and LM head after `depth` backbone blocks: the model's own after all of them, so a pass that
        never left is the backbone's bit for bit; the river's low-bit head, where it holds one, after an exit (this
        project's departure from the paper: README); the model's through torch.compile for one position when this
        engine compiles."""
        if depth < self.model.cfg.n_layers and self.river is not None and self.river.head is not None:
            return self.river.head(self.model.norm(x))
        if self.compiled and x.shape[1] == 1:
            return compiled_function(streamed_head)(self.model, x)
        return self.model.head(x)

    def run_block(self, block, x, pos, cache):
        """block(x), its one-token steps through torch.compile when this engine compiles (prefill stays eager)."""
        if not (self.compiled and x.shape[1] == 1 and cache is not None):
            return block(x, pos, cache)
        k_cache, v_cache = cache.claim(block.layer, pos.start, 1, block.cache_writer)
        return compiled_function(streamed_step)(block, x, pos.cos, pos.sin, pos.attn_mask, k_cache, v_cache,
                                                pos.start)

    def generate(self, prompt, max_new_tokens, rule, temperature=0.0, top_p=1.0, seed=None, stop_ids=(),
                 on_token=None):
        """Generate from a list of prompt ids under an exit rule; greedy unless temperature > 0. on_token(id): called
        with each token as it is chosen, outside the timed steps (river.py streams the text through it)."""
        self.check_rule(rule)
        model = self.model
        check_generation(prompt, max_new_tokens, model.cfg.max_seq_len, temperature, top_p, seed)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=model.device)
            generator.manual_seed(0 if seed is None else seed)
        cache = model.new_cache(len(prompt) + max_new_tokens)
        tokens = torch.tensor([prompt], device=model.device)
        sync(model.device)
        t0 = time.perf_counter()
        logits, depth = self.forward(tokens, 0, cache, rule)
        out, depths = [sample(logits[0, -1], temperature, top_p, generator)], [depth]
        prefill_s, steps = time.perf_counter() - t0, []
        on_token = on_token or (lambda token: None)
        on_token(out[-1])
        while len(out) < max_new_tokens and out[-1] not in stop_ids:
            t0 = time.perf_counter()
            tokens = torch.tensor([[out[-1]]], device=model.device)
            logits, depth = self.forward(tokens, len(prompt) + len(out) - 1, cache, rule)
            out.append(sample(logits[0, -1], temperature, top_p, generator))  # reads the logits: syncs
            depths.append(depth)
            steps.append(time.perf_counter() - t0)
            on_token(out[-1])
        return Generation(out, depths, prefill_s, steps)


if __name__ == "__main__":  # the command line lives in river_cli.py, which imports this file as the module `river`
    import runpy
    runpy.run_module("river_cli", run_name="__main__")
