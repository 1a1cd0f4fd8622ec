"""Patched passes that compute only what a patch changes (README §3): the incremental pass, resumed at
the first patched layer and position from the unpatched run's residual stream, keys and values, and
the LD-only pass, which unembeds two columns. Both must give the numbers of the plain full pass.

The reference is the full pass with the same patches (`ioi.patched_run` without a cache), on random
GPT-2-shaped weights large enough that every patch moves the logits."""
import pytest
import torch

import gpt2
import ioi
import metrics
from ioi import Node


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = gpt2.GPT2(gpt2.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=40))
    for p in model.parameters():  # non-trivial biases and LayerNorms, and logits of a few units
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    return ioi.eval_prompts(30, seed=3)  # lengths 16, 17 and 19: batches of mixed lengths


# Every kind of site the paper patches: outputs and queries at `end`, values and outputs at `s2`,
# keys at the names' first positions (the recomputed range then starts at `io` or `s1`), layer 0.
SITES = {"z at end": [Node("z", 2, 1, "end")], "q at end": [Node("q", 1, 0, "end")],
         "v and z at s2": [Node("v", 1, 2, "s2"), Node("z", 2, 0, "s2")],
         "k at io and s1": [Node("k", 1, 3, "io"), Node("k", 2, 0, "s1")],
         "z at s2, layer 0": [Node("z", 0, 1, "s2")], "every head's z at end": [Node("z", 1, None, "end")]}


def random_patches(nodes, n, d_head=16):
    generator = torch.Generator().manual_seed(1)
    return {node: torch.randn(n, d_head * (4 if node.head is None else 1), generator=generator)
            for node in nodes}


@pytest.mark.parametrize("site", SITES)
def test_incremental_and_ld_only_passes_equal_the_full_pass(model, prompts, site):
    task = metrics.Task(model, prompts, batch_size=8)  # four batches, the last one short
    patches = random_patches(SITES[site], len(prompts))
    full = ioi.patched_run(model, prompts, patches, batch_size=8)
    clean = ioi.patched_run(model, prompts, batch_size=8)
    assert (full.logit_diff - clean.logit_diff).abs().max() > 1e-2  # the patch matters
    incremental, ld_only = task.patched(patches), task.patched(patches, ld_only=True)
    torch.testing.assert_close(incremental.logit_diff, full.logit_diff, rtol=0, atol=1e-5)
    assert torch.equal(incremental.top_token, full.top_token)
    torch.testing.assert_close(ld_only.logit_diff, full.logit_diff, rtol=0, atol=1e-5)
    assert ld_only.top_token is None


def test_ld_only_equals_the_full_logits_difference(model, prompts):
    batch = ioi.batch_prompts(prompts)
    with torch.inference_mode():
        logits = model(batch.tokens, logits_at=batch.positions["end"])              # [batch, vocab]
        io_and_s = ioi.run_with_patches(model, batch, {}, ld_only=True)            # [batch, 2]
    rows = torch.arange(len(prompts))
    torch.testing.assert_close(io_and_s[:, 0] - io_and_s[:, 1],
                               logits[rows, batch.io_token] - logits[rows, batch.s_token], rtol=0, atol=1e-5)


@pytest.mark.parametrize("nodes,first", [([Node("z", 2, 1, "end")], 15), ([Node("v", 1, 2, "s2")], 11),
                                         ([Node("q", 2, 0, "end"), Node("k", 2, 0, "s1")], 5),
                                         ([Node("k", 1, 3, "io")], 3)])
def test_a_resumed_pass_computes_from_the_batchs_first_patched_position(model, prompts, nodes, first):
    """Three prompts of 16, 17 and 19 tokens (`end` at 15, 16, 18; `s2` at 11, 12, 12; `s1` at 5, `io` at 3):
    the blocks from the patched layer on see positions `first` to 18 only, and the logits match."""
    three = [next(p for p in prompts if len(p.tokens) == n) for n in (16, 17, 19)]
    assert [p.positions["end"] for p in three] == [15, 16, 18]
    assert [p.positions["s2"] for p in three] == [11, 12, 12]
    assert [(p.positions["io"], p.positions["s1"]) for p in three] == [(3, 5)] * 3
    batch, layer = ioi.batch_prompts(three), min(node.layer for node in nodes)
    patches = random_patches(nodes, 3)
    [resume] = ioi.residual_streams(model, three, layer)
    seen = []
    with torch.inference_mode():
        full = ioi.run_with_patches(model, batch, patches)
        resumed = ioi.run_with_patches(model, batch, patches, [(f"blocks.{layer}.attn.hook_z", seen.append)],
                                       resume=(layer, *resume))
    assert [tuple(z.shape) for z in seen] == [(3, 19 - first, 4, 16)]
    assert tuple(resume[1][0][0].shape) == (3, 15, 4, 16)  # keys cached before the first `end` only
    torch.testing.assert_close(resumed, full, rtol=0, atol=1e-5)


def test_past_keys_and_values_give_the_full_pass_at_every_hook(model, prompts):
    """gpt2 alone: positions p.. resumed with the keys and values of 0..p-1 see, at every hook, the full
    pass's activations at those positions (the pattern's rows too); `logits_at` counts from p."""
    tokens, p = ioi.batch_prompts(prompts[:4]).tokens, 7
    names = ["blocks.1.hook_resid_pre", *(f"blocks.{i}.attn.hook_{kv}" for i in (1, 2) for kv in "kv")]
    logits, cache = model.run_with_cache(tokens)
    past_kv = [(cache[f"blocks.{i}.attn.hook_k"][:, :p], cache[f"blocks.{i}.attn.hook_v"][:, :p])
               for i in (1, 2)]
    seen = {}
    resumed = model.run_with_hooks(tokens[:, p:], {lambda name: name.startswith("blocks.2"):
                                                   lambda act, hook: seen.update({hook.name: act})},
                                   resume_from=(1, cache[names[0]][:, p:]), past_kv=past_kv)
    torch.testing.assert_close(resumed, logits[:, p:], rtol=0, atol=1e-5)
    for name, act in seen.items():
        expected = cache[name][:, :, p:] if name.endswith(("scores", "pattern")) else cache[name][:, p:]
        torch.testing.assert_close(act, expected, rtol=0, atol=1e-5, msg=name)
    assert tuple(seen["blocks.2.attn.hook_pattern"].shape) == (4, 4, tokens.shape[1] - p, tokens.shape[1])
    with pytest.raises(ValueError, match="past_kv needs resume_from"):
        model.run_with_hooks(tokens[:, p:], past_kv=past_kv)
    with pytest.raises(ValueError, match="one \\(k, v\\) per block"):
        model.run_with_hooks(tokens[:, p:], resume_from=(1, cache[names[0]][:, p:]), past_kv=past_kv[:1])


def test_a_cache_per_layer_within_the_budget_else_the_highest_below(model, prompts, monkeypatch):
    """The task builds a cache once per layer it patches from; over its memory budget it keeps the
    newest only, and a later patch resumes from the highest cache below it (the same numbers)."""
    task, built = metrics.Task(model, prompts, batch_size=8), []
    streams = ioi.residual_streams
    monkeypatch.setattr(ioi, "residual_streams", lambda *args: built.append(args[2]) or streams(*args))
    for site in ("z at end", "q at end", "z at s2, layer 0", "z at end"):
        patches = random_patches(SITES[site], len(prompts))
        torch.testing.assert_close(task.patched(patches).logit_diff,
                                   ioi.patched_run(model, prompts, patches, batch_size=8).logit_diff,
                                   rtol=0, atol=1e-5)
    assert built == [2, 1, 0] and list(task.cache) == [2, 1, 0]
    monkeypatch.setattr(metrics, "CACHE_BYTES", 1)  # every cache is over the budget
    task, built = metrics.Task(model, prompts, batch_size=8), []
    for site in ("z at s2, layer 0", "z at end"):
        patches = random_patches(SITES[site], len(prompts))
        torch.testing.assert_close(task.patched(patches).logit_diff,
                                   ioi.patched_run(model, prompts, patches, batch_size=8).logit_diff,
                                   rtol=0, atol=1e-5)
    assert built == [0] and list(task.cache) == [0]
