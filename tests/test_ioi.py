"""IOI prompts, positions, counterfactuals, activations and the small IOI model (ioi.py)."""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gpt2
import ioi
from main import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return gpt2.GPT2(gpt2.GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


# ----------------------------------------------------------------------------- words and prompts

def test_word_lists_are_single_tokens_with_leading_space():
    tokenizer = ioi.tokenizer()
    for words in (ioi.NAMES, ioi.OBJECTS, ioi.PLACES):
        ioi.check_single_tokens(words, tokenizer)
        assert len(set(words)) == len(words)
    assert len(ioi.NAMES) >= 100 and len(ioi.OBJECTS) >= 40 and len(ioi.PLACES) >= 30
    assert min(len(ioi.EVAL_NAMES), len(ioi.COUNTERFACTUAL_NAMES)) >= 70
    assert not set(ioi.NAMES) & (set(ioi.OBJECTS) | set(ioi.PLACES))
    with pytest.raises(ValueError, match="Bartholomew"):
        ioi.check_single_tokens(["Mary", "Bartholomew"], tokenizer)


def test_held_out_templates_are_new_sentences_of_known_words():
    # The small model only knows words it was trained on; held-out objects and places test
    # unknown words, held-out templates test new sentence structures.
    def tokens(template):
        return set(ioi.make_prompt(template, "Mary", "John", "ABB", "park", "ball").tokens)
    known = set().union(*map(tokens, ioi.TRAIN_TEMPLATES))
    for template in ioi.HELD_OUT_TEMPLATES:
        assert tokens(template) <= known and ioi.TEMPLATES[template] not in [ioi.TEMPLATES[t] for t in ioi.TRAIN_TEMPLATES]


def test_templates_and_held_out_parts():
    assert len(ioi.TEMPLATES) >= 10 and len(ioi.HELD_OUT_TEMPLATES) >= 2
    assert set(ioi.TRAIN_TEMPLATES) | set(ioi.HELD_OUT_TEMPLATES) == set(range(len(ioi.TEMPLATES)))
    assert not set(ioi.TRAIN_OBJECTS) & set(ioi.HELD_OUT_OBJECTS) and ioi.HELD_OUT_OBJECTS
    assert not set(ioi.TRAIN_PLACES) & set(ioi.HELD_OUT_PLACES) and ioi.HELD_OUT_PLACES


@pytest.mark.parametrize("template", range(len(ioi.TEMPLATES)))
def test_positions_land_on_the_right_tokens(template):
    decode = ioi.tokenizer().decode
    for pos in ioi.PATTERNS:
        for io, s, place, obj in (("Mary", "John", "store", "drink"), ("Liam", "Ann", "bridge", "rope")):
            p = ioi.make_prompt(template, io, s, pos, place, obj)
            at = {key: decode([p.tokens[i]]) for key, i in p.positions.items()}
            assert p.tokens[0] == gpt2.BOS_TOKEN_ID and decode(p.tokens[1:]) == p.text
            assert (at["io"], at["s1"], at["s2"], at["end"]) == (" " + io, " " + s, " " + s, " to")
            assert p.positions["s1+1"] == p.positions["s1"] + 1 and p.positions["end"] == len(p.tokens) - 1
            assert (p.positions["io"] < p.positions["s1"]) == (pos == "ABB")
            assert p.positions["s2"] > max(p.positions["io"], p.positions["s1"])


def test_abc_prompts_have_three_distinct_names():
    for p in ioi.sample_prompts(50, seed=3, abc=True):
        assert len({p.io, p.s, p.c}) == 3
        decode = ioi.tokenizer().decode
        assert [decode([p.tokens[p.positions[k]]]) for k in ("io", "s1", "s2")] == [" " + p.io, " " + p.s, " " + p.c]


def test_counterfactuals_change_exactly_one_attribute():
    rng = np.random.default_rng(0)
    decode = ioi.tokenizer().decode
    for p in ioi.eval_prompts(60, seed=5):
        for attribute in ioi.ATTRIBUTES:
            q = ioi.counterfactual(p, attribute, rng)
            changed = [a for a in ioi.ATTRIBUTES if getattr(p, a) != getattr(q, a)]
            assert changed == [attribute]
            assert (q.template, q.place, q.object) == (p.template, p.place, p.object)
            assert decode([q.tokens[q.positions["io"]]]) == " " + q.io
            assert decode([q.tokens[q.positions["s2"]]]) == " " + q.s == " " + q.c
            if attribute != "pos":
                assert getattr(q, attribute) in ioi.COUNTERFACTUAL_NAMES
                assert getattr(q, attribute) not in (p.io, p.s)
    with pytest.raises(ValueError, match="attribute"):
        ioi.counterfactual(p, "place", rng)


_FINGERPRINT = """
import ioi
prompts = ioi.sample_prompts(300, seed=7, abc=False)
cfs = ioi.counterfactuals(prompts, "io", seed=8)
print(ioi.prompts_fingerprint(prompts + cfs))
"""


def test_same_seed_same_dataset_across_processes():
    runs = [subprocess.Popen([sys.executable, "-c", _FINGERPRINT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    outputs = [run.communicate()[0] for run in runs]
    assert all(run.returncode == 0 for run in runs) and len(outputs[0]) == 65 and outputs[0] == outputs[1]
    assert ioi.prompts_fingerprint(ioi.sample_prompts(300, 7)) != ioi.prompts_fingerprint(ioi.sample_prompts(300, 8))


def test_attributes_are_balanced_and_independent():
    n = 6000
    ids = ioi.attribute_ids(ioi.sample_prompts(n, seed=11))
    n_names = len(ioi.NAMES)
    assert (ids["pos"] == 1).sum() == n // 2                       # exactly balanced
    assert (ids["io"] != ids["s"]).all()

    def chi2(counts, expected):
        return float(((counts - expected) ** 2 / expected).sum())
    # Uniform marginals: chi-square with n_names - 1 degrees of freedom, bound ~ mean + 5 sd.
    bound = (n_names - 1) + 5 * (2 * (n_names - 1)) ** 0.5
    for name in ("io", "s"):
        assert chi2(torch.bincount(ids[name], minlength=n_names).double(), n / n_names) < bound
    # Pos independent of IO: the IO counts within each Pos class are uniform too.
    for pos in (0, 1):
        counts = torch.bincount(ids["io"][ids["pos"] == pos], minlength=n_names).double()
        assert chi2(counts, n / 2 / n_names) < bound


def test_batch_prompts_pads_right_and_keeps_positions():
    prompts = [ioi.make_prompt(t, "Mary", "John", "BAB", "park", "ball") for t in (0, 3, 11)]
    batch = ioi.batch_prompts(prompts)
    lengths = [len(p.tokens) for p in prompts]
    assert len(set(lengths)) > 1 and batch.tokens.shape == (3, max(lengths))
    for row, p in enumerate(prompts):
        assert batch.tokens[row, :len(p.tokens)].tolist() == p.tokens
        assert {k: v[row].item() for k, v in batch.positions.items()} == p.positions
    assert batch.io_token.tolist() == [ioi.name_token("Mary")] * 3 and batch.s_token.tolist() == [ioi.name_token("John")] * 3
    ids = ioi.attribute_ids(prompts)
    assert ids["io"].tolist() == [ioi.NAMES.index("Mary")] * 3 and ids["pos"].tolist() == [1, 1, 1]


# ----------------------------------------------------------------------------- nodes

def test_node_string_parse_and_hook_name():
    node = ioi.Node.parse("z@L9H9@end")
    assert node == ioi.Node("z", 9, 9, "end") and str(node) == "z@L9H9@end"
    assert node.hook_name == "blocks.9.attn.hook_z" and str(ioi.Node.parse("k@L0H3@s1+1")) == "k@L0H3@s1+1"
    for bad in ("z@L9H9", "x@L1H1@end", "q@L1H1@middle"):
        with pytest.raises(ValueError):
            ioi.Node.parse(bad)


def test_nodes_over_all_heads_and_the_residual_stream():
    """What SAEs from elsewhere read: every head of a layer concatenated, or the residual stream."""
    heads, resid = ioi.Node.parse("z@L1@end"), ioi.Node.parse("resid_pre@L2@s2")
    assert heads == ioi.Node("z", 1, None, "end") and str(heads) == "z@L1@end"
    assert heads.hook_name == "blocks.1.attn.hook_z" and resid.hook_name == "blocks.2.hook_resid_pre"
    act = torch.randn(2, 5, 3, 4)                                         # [batch, pos, head, d_head]
    positions = torch.tensor([4, 1])
    assert torch.equal(heads.read(act, positions), torch.stack([act[0, 4].flatten(), act[1, 1].flatten()]))
    one_head = ioi.Node("z", 1, 2, "end").read(act, positions)
    assert torch.equal(one_head, torch.stack([act[0, 4, 2], act[1, 1, 2]]))
    stream = torch.randn(2, 5, 12)                                        # [batch, pos, d_model]
    assert torch.equal(resid.read(stream, positions), stream[[0, 1], [4, 1]])
    with pytest.raises(ValueError, match="no heads"):
        ioi.Node("resid_pre", 1, 0, "end")


def test_gpt2_small_cross_sections_follow_the_paper():
    sections, table = ioi.circuit_cross_sections(SimpleNamespace(config=gpt2.GPT2Config()), prompts=[])
    by_name = {s.name: s for s in sections}
    assert list(by_name) == ["(B)NM out", "(B)NM q", "(B)NM qk", "S-I out", "S-I v", "Ind+DT out"] and table == {"heads": [], "sections": []}
    assert ioi.Node.parse("z@L9H9@end") in by_name["(B)NM out"].nodes and "io" in by_name["(B)NM out"].attributes
    assert ioi.Node.parse("k@L10H0@s1") in by_name["(B)NM qk"].nodes
    assert ioi.Node.parse("v@L8H6@s2") in by_name["S-I v"].nodes and ioi.Node.parse("z@L0H1@s2") in by_name["Ind+DT out"].nodes
    assert all(set(s.attributes) <= set(ioi.ATTRIBUTES) and "pos" in s.attributes for s in sections)


# ----------------------------------------------------------------------------- activations

NODES = [ioi.Node.parse(text) for text in ("z@L1H2@end", "q@L1H0@end", "k@L0H3@io", "k@L1H1@s1", "v@L0H0@s2", "z@L0H1@s1+1")]


def test_collect_activations_matches_run_with_cache():
    model = tiny_model()
    prompts = ioi.sample_prompts(7, seed=1, templates=range(len(ioi.TEMPLATES)))
    acts = ioi.collect_activations(model, prompts, NODES, batch_size=3)
    for i, p in enumerate(prompts):  # each prompt alone, unpadded
        _, cache = model.run_with_cache(torch.tensor([p.tokens]), [node.hook_name for node in NODES])
        for node in NODES:
            expected = cache[node.hook_name][0, p.positions[node.position], node.head]
            torch.testing.assert_close(acts[node][i], expected, atol=1e-5, rtol=1e-4)
    assert all(acts[node].shape == (7, model.config.d_head) and not acts[node].is_inference() for node in NODES)


def test_activation_cache_is_reused_only_for_the_same_setting(tmp_path, monkeypatch):
    model, prompts = tiny_model(), ioi.sample_prompts(6, seed=2)
    first = ioi.collect_activations(model, prompts, NODES, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob("*.tmp"))

    def no_forward(*args, **kwargs):
        raise AssertionError("recomputed although cached")
    with monkeypatch.context() as patch:
        patch.setattr(model, "run_with_cache", no_forward)
        again = ioi.collect_activations(model, prompts, NODES, cache_dir=tmp_path)
    assert all(torch.equal(first[node], again[node]) for node in NODES)

    other_prompts = ioi.collect_activations(model, ioi.sample_prompts(6, seed=3), NODES, cache_dir=tmp_path)
    other_model = ioi.collect_activations(tiny_model(seed=1), prompts, NODES, cache_dir=tmp_path)
    fewer_nodes = ioi.collect_activations(model, prompts, NODES[:2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not torch.equal(other_prompts[NODES[0]], first[NODES[0]])
    assert not torch.equal(other_model[NODES[0]], first[NODES[0]])
    assert torch.equal(fewer_nodes[NODES[1]], first[NODES[1]])


# ----------------------------------------------------------------------------- evaluation and the small model

def test_evaluate_reports_every_metric_per_template():
    prompts = ioi.sample_prompts(40, seed=4, templates=(0, 5))
    result = ioi.evaluate(tiny_model(), prompts, batch_size=16)
    assert result["n"] == 40 and set(result["per_template"]) == {0, 5}
    assert sum(r["n"] for r in result["per_template"].values()) == 40
    for key in ("mean_logit_diff", "accuracy", "top1_accuracy", "io_prob"):
        assert np.isfinite(result[key])


TINY_TOY = ioi.ToyConfig(n_layer=2, n_embd=64, n_head=8, steps=400, batch_size=32, lr=1e-2, warmup=30, n_eval=200)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("toy")
    model, metrics = ioi.train_and_save(TINY_TOY, str(directory), progress=False)
    return directory, model, metrics


def test_short_training_learns_ioi(trained):
    directory, model, metrics = trained
    # 400 steps at a high learning rate already tell IO from S (chance: accuracy 0.5, LD 0),
    # though not yet copying it to the top of the vocabulary: that takes the default's 2000.
    assert metrics["eval"]["accuracy"] > 0.7 and metrics["eval"]["mean_logit_diff"] > 1
    assert json.loads((directory / "toy_config.json").read_text()) == asdict(TINY_TOY)
    reloaded = gpt2.GPT2.from_pretrained(str(directory))
    torch.testing.assert_close(reloaded.wte.weight, model.wte.weight)


def test_training_is_deterministic_for_a_seed():
    config = ioi.ToyConfig(n_layer=1, n_embd=32, n_head=2, steps=3, batch_size=8)
    first, second = (ioi.train_toy_model(config, progress=False) for _ in range(2))
    assert gpt2.weights_hash(first) == gpt2.weights_hash(second)


def test_discover_finds_heads_with_their_reasons(trained):
    _, model, _ = trained
    sections, table = ioi.discover(model, ioi.eval_prompts(100, seed=9), batch_size=50)
    heads = table["heads"]
    assert len(heads) == 2 * model.config.n_layer * model.config.n_head
    assert {"head", "position", "ld_drop", "fraction", "direct_effect", "role"} <= set(heads[0])
    assert sections and sections[0].name == "(B)NM out"
    assert [row["section"] for row in table["sections"] if row["kept"]] == [s.name for s in sections]
    assert all((abs(row["fraction"]) >= 0.05) == row["kept"] for row in table["sections"])
    assert any(row["role"] == "name mover" for row in heads)
    top_drop = max(row["ld_drop"] for row in heads)
    top_direct = max(row["direct_effect"] for row in heads if row["direct_effect"] is not None)
    for row in heads:  # each role by its own measure, against a third of the strongest head's
        if row["role"] == "name mover":
            assert row["direct_effect"] >= top_direct / 3
        elif row["role"]:
            assert row["ld_drop"] >= top_drop / 3
        else:
            assert row["ld_drop"] < top_drop / 3 and (row["direct_effect"] or 0) < top_direct / 3


def test_direct_effects_add_up_to_the_attention_output():
    """Summed over heads, the direct effects are the attention layers' share of the LD."""
    model, prompts = tiny_model(), ioi.sample_prompts(12, seed=6)
    effects = ioi.direct_effects(model, prompts, batch_size=5)                   # [layer, head]
    batch, last = ioi.batch_prompts(prompts), f"blocks.{model.config.n_layer - 1}.hook_resid_post"
    names = [f"blocks.{layer}.hook_attn_out" for layer in range(model.config.n_layer)] + [last]
    _, cache = model.run_with_cache(batch.tokens, names)
    rows, end = torch.arange(len(prompts)), batch.positions["end"]
    scale = (cache[last][rows, end].var(-1, unbiased=False) + 1e-5).sqrt()
    direction = (model.wte.weight[batch.io_token] - model.wte.weight[batch.s_token]) * model.ln_f.weight
    for layer, block in enumerate(model.h):
        out = cache[f"blocks.{layer}.hook_attn_out"][rows, end] - block.attn.c_proj.bias
        out = out - out.mean(-1, keepdim=True)
        expected = ((out * direction).sum(-1) / scale).mean()
        torch.testing.assert_close(effects[layer].sum(), expected.detach(), atol=1e-5, rtol=1e-4)


def test_ioi_eval_json_and_nodes_cli(trained):
    directory = str(trained[0])
    result = CliRunner().invoke(cli, ["ioi-eval", "--weights", directory, "--n", "30", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"mean_logit_diff", "accuracy", "top1_accuracy", "io_prob", "n"} <= set(report) and report["n"] == 30
    table = CliRunner().invoke(cli, ["ioi-eval", "--weights", directory, "--n", "30", "--held-out"])
    assert table.exit_code == 0 and "held out" in table.output
    nodes = CliRunner().invoke(cli, ["nodes", "--weights", directory, "--n", "60"])
    assert nodes.exit_code == 0 and "(B)NM out" in nodes.output


def test_bad_weights_path_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["ioi-eval", "--weights", str(tmp_path / "missing"), "--json"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "missing" in result.output
