"""Interventions and the end-to-end pipeline (README §3, §5, §6), on a tiny random GPT-2.

The intervention tests are invariances with known answers: a patch with the clean value
changes nothing, an exact reconstruction is fully sufficient and necessary, the mean
explains nothing (necessity 0), editing with the counterfactual itself is always right.
The last test runs every pipeline step on a tiny model and checks metrics.json.
"""
import copy
import functools
import json

import pytest
import torch
from click.testing import CliRunner

import gpt2
import ioi
import main
import metrics
from ioi import CrossSection, Node


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = gpt2.GPT2(gpt2.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=40))
    for name, p in model.named_parameters():
        if "wte" not in name:  # non-trivial biases and LayerNorms, so patches matter
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    return ioi.eval_prompts(24, seed=3)


NODES = (Node("z", 0, 1, "s2"), Node("q", 1, 0, "end"), Node("k", 1, 0, "io"), Node("z", 1, 1, "end"))


def test_patch_with_clean_values_changes_nothing(model, prompts):
    clean = ioi.collect_activations(model, prompts, NODES)
    batch = ioi.batch_prompts(prompts)
    with torch.inference_mode():
        reference = model(batch.tokens, logits_at=batch.positions["end"])
        patched = metrics.run_with_patches(model, batch, clean)
    torch.testing.assert_close(patched, reference, rtol=0, atol=1e-5)


def test_all_nodes_patched_from_precomputed_values(model, prompts):
    """README §3: every node takes the value given to it, even a late node downstream of an
    early patch (it is not recomputed from the patched early node); nodes that do not
    interact give the same result patched together or one hook at a time."""
    clean = ioi.collect_activations(model, prompts, NODES)
    batch = ioi.batch_prompts(prompts)
    early, late = NODES[0], NODES[3]                        # z@L0H1@s2 feeds z@L1H1@end
    zeros = torch.zeros_like(clean[early])
    with torch.inference_mode():
        early_only = metrics.run_with_patches(model, batch, {early: zeros})
        both = metrics.run_with_patches(model, batch, {early: zeros, late: clean[late]})
    assert not torch.allclose(early_only, both, atol=1e-4)  # the late node was held at its clean value

    # Two heads of one layer do not interact: together == one hook per node, applied in turn.
    a, b = Node("z", 1, 0, "end"), Node("z", 1, 1, "end")
    values = {a: torch.randn(len(prompts), 16), b: torch.randn(len(prompts), 16)}
    end = batch.positions["end"][:, None]
    with torch.inference_mode():
        together = metrics.run_with_patches(model, batch, values)
        in_turn = model.run_with_hooks(batch.tokens, [(a.hook_name, gpt2.patch_heads(end, [0], values[a][:, None])),
                                                      (b.hook_name, gpt2.patch_heads(end, [1], values[b][:, None]))],
                                       logits_at=batch.positions["end"])
    torch.testing.assert_close(together, in_turn)


def test_approximation_known_answers(model, prompts):
    model = copy.deepcopy(model).double()  # exact identities, not float32 round-off
    clean = ioi.collect_activations(model, prompts, NODES)
    clean_run = metrics.patched_run(model, prompts)
    mean = {node: acts.mean(0).expand_as(acts) for node, acts in clean.items()}
    ablated = metrics.patched_run(model, prompts, mean)
    exact = metrics.approximation(model, prompts, clean, clean, clean_run, ablated)
    assert exact["sufficiency"] == pytest.approx(1.0, abs=1e-9)
    assert exact["necessity"] == pytest.approx(1.0, abs=1e-9)
    nothing = metrics.approximation(model, prompts, clean, mean, clean_run, ablated)
    assert nothing["necessity"] == pytest.approx(0.0, abs=1e-9)
    expected = ablated.logit_diff.mean() / clean_run.logit_diff.mean()
    assert nothing["sufficiency"] == pytest.approx(float(expected), abs=1e-9)


def test_edit_with_the_counterfactual_itself_is_always_right(model, prompts):
    counterfactual = ioi.counterfactuals(prompts, "io", seed=0)
    cf = ioi.collect_activations(model, counterfactual, NODES)
    truth = metrics.patched_run(model, prompts, cf)
    again = metrics.patched_run(model, prompts, {node: v.clone() for node, v in cf.items()})
    assert metrics.edit_accuracy(again.top_token, truth.top_token) == 1.0


def test_patched_run_matches_end_logits(model, prompts):
    run = metrics.patched_run(model, prompts, batch_size=5)  # several batches
    batch = ioi.batch_prompts(prompts)
    with torch.inference_mode():
        logits = model(batch.tokens, logits_at=batch.positions["end"])
    torch.testing.assert_close(run.logit_diff, metrics.logit_diff(logits, batch.io_token, batch.s_token))
    assert torch.equal(run.top_token, logits.argmax(-1))


def test_pipeline_end_to_end(tmp_path, model, monkeypatch):
    """Every step on a tiny model with a fixed circuit: metrics.json has every test, every
    architecture is scored at every site, and report.md is written."""
    weights = tmp_path / "model"
    model.save_pretrained(weights)
    sections = [CrossSection("(B)NM out", (Node("z", 1, 0, "end"),), ("io", "pos")),
                CrossSection("(B)NM q", (Node("q", 1, 0, "end"), Node("q", 1, 1, "end")), ("pos", "s"))]
    discovery = {"heads": [{"head": "L1H0", "position": "end", "ld_drop": 0.5, "fraction": 0.5, "direct_effect": 0.7,
                            "query_effect": None, "role": "name mover"}],
                 "sections": [{"section": "(B)NM out", "ld_drop": 0.6, "fraction": 0.6, "kept": True}]}
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda *args, **kwargs: (sections, discovery))
    out = tmp_path / "run"
    settings = ["--out", str(out), "--weights", str(weights), "--preset", "demo", "--n-train", "120",
                "--n-eval", "40", "--epochs", "2"]
    small_toy = functools.partial(metrics.oversplitting_toy, n_samples=256, n_latents=100)
    monkeypatch.setattr(metrics, "oversplitting_toy", lambda seed, **grid: small_toy(seed=seed))
    monkeypatch.setattr(main, "DEMO", main.replace(main.DEMO, d_sae=16, corpus_tokens=300, corpus_d_sae=16,
                                                   corpus_epochs=1, edit_k=(2, 4)))
    result = CliRunner().invoke(main.cli, ["evaluate", *settings], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["n_train"] == 120
    rows = saved["results"]
    tests = {row["test"] for row in rows}
    for test in ("sufficiency", "necessity", "edit_accuracy", "edit_accuracy_no_intervention", "weight_removed",
                 "latents_changed", "f1_coverage", "pos_latents", "l0", "phenomenon_testable",
                 "evidence_norm", "occlusion_toy_recovered", "oversplit_toy_loss", "causal_keep_sufficiency"):
        assert test in tests, test
    # (ld_recovered is recorded only where one node alone moves the LD by >= 0.5%; this random
    # model's nodes move its near-zero LD by less, so it may rightly have none.)
    occlusion = [row for row in rows if row["test"] == "phenomenon_testable" and row["phenomenon"] == "occlusion"]
    assert ("occlusion_io_names" in tests and "alpha_sweep_io_names" in tests) == bool(occlusion[0]["value"])
    for site in ("(B)NM out", "(B)NM q"):
        scored = {row["method"] for row in rows if row["test"] == "sufficiency" and row["site"] == site}
        assert {"supervised", "supervised_lstsq", "vanilla", "gated", "topk", "random_decoder", "mean_ablation",
                "vanilla_fulldist", "gated_fulldist", "topk_fulldist"} <= scored
    assert all(isinstance(row["value"], float) for row in rows)
    assert (out / "report.md").exists()

    # A second run over the same folder resumes: every SAE is loaded; only the occlusion toy
    # model (synthetic data, never cached) trains again.
    trained, train = [], main.dictionaries.train_sae_stack
    monkeypatch.setattr(main.dictionaries, "train_sae_stack", lambda *a, **k: trained.append(a[0].shape) or train(*a, **k))
    result = CliRunner().invoke(main.cli, ["evaluate", *settings], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(trained) == 1 and trained[0][1] == 20_000  # the toy: one dataset of 20,000 samples


# --- grade-sae: an SAE from elsewhere, in SAELens's layout -----------------------------------

def write_identity_sae(directory, d_in, hook_name, head):
    """A SAELens 6 folder of a standard SAE that reconstructs exactly: latents ReLU(x) and
    ReLU(-x), decoded by [I; -I]. Patched at the right slots it leaves the model unchanged."""
    from safetensors.torch import save_file
    eye = torch.eye(d_in)
    weights = {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye]),
               "b_enc": torch.zeros(2 * d_in), "b_dec": torch.zeros(d_in)}
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": 2 * d_in, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook_name, "hook_head_index": head}}
    directory.mkdir()
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture
def small_run(tmp_path, model, monkeypatch):
    """CLI settings of a tiny run with the fixed circuit of test_pipeline_end_to_end."""
    weights = tmp_path / "model"
    model.save_pretrained(weights)
    sections = [CrossSection("(B)NM out", (Node("z", 1, 0, "end"),), ("io", "pos")),
                CrossSection("(B)NM q", (Node("q", 1, 0, "end"), Node("q", 1, 1, "end")), ("pos", "s"))]
    no_discovery = {"heads": [], "sections": []}
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda *args, **kwargs: (sections, no_discovery))
    tiny = main.replace(main.DEMO, d_sae=16, edit_k=(2,), f1_thresholds=(0.0, 0.6))
    monkeypatch.setattr(main, "DEMO", tiny)
    monkeypatch.setattr(main.Grader, "MIN_SECTION_EFFECT", 0.0)  # random weights: any effect will do
    return ["--out", str(tmp_path / "run"), "--weights", str(weights), "--preset", "demo",
            "--n-train", "120", "--n-eval", "40", "--epochs", "2"]


# (hook_name, hook_head_index, d_in, the site graded): one head (like ours), every head's z
# concatenated (public attention-output SAEs), the residual stream (public residual SAEs).
LAYOUTS = [("blocks.1.attn.hook_z", 0, 16, "(B)NM out [z@L1H0]"),
           ("blocks.1.attn.hook_z", None, 32, "(B)NM out [z@L1]"),
           ("blocks.1.hook_resid_pre", None, 32, "(B)NM out + (B)NM q [resid_pre@L1]")]


@pytest.mark.parametrize("hook_name,head,d_in,site", LAYOUTS)
def test_grade_sae_grades_each_layout_beside_the_supervised_dictionaries(tmp_path, small_run, hook_name,
                                                                         head, d_in, site):
    folder = write_identity_sae(tmp_path / "public-sae", d_in, hook_name, head)
    grade = ["grade-sae", "--sae", str(folder), *small_run]
    result = CliRunner().invoke(main.cli, grade, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    at_site = {(r["test"], r["method"]) for r in rows if r["site"] == site}
    for test in ("sufficiency", "necessity", "edit_accuracy", "weight_removed", "f1_coverage",
                 "causal_keep_sufficiency"):
        assert (test, "sae:public-sae") in at_site, test
    assert ("sufficiency", "supervised") in at_site and ("edit_accuracy", "supervised") in at_site
    assert (("sufficiency", "topk") in at_site) == (head is not None)  # ours, where it reads single heads
    approximation = {r["test"]: r["value"] for r in rows if r["site"] == site
                     and r["method"] == "sae:public-sae" and r["test"] in ("sufficiency", "necessity")}
    # it reconstructs exactly: patched at the right slots, the model's LD is untouched
    assert approximation == pytest.approx({"sufficiency": 1.0, "necessity": 1.0}, abs=1e-4)
    assert {r["test"] for r in rows if r["method"] == "sae:public-sae"} >= {"l0", "fve", "graded_sae"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## 9. SAEs from elsewhere" in report and site in report
    # grading it again replaces its records instead of adding to them
    CliRunner().invoke(main.cli, grade, catch_exceptions=False)
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    assert len(again) == len(rows)


def test_saes_of_transformer_lens_processed_models_read_plain_activations(model):
    """SAELens SAEs read TransformerLens's processed GPT-2 unless cfg.json says otherwise: hook_z
    without the value bias b_V; the residual stream centred. Ours say they read the plain model."""
    g = torch.Generator().manual_seed(0)
    params = {"W_enc": torch.randn(32, 8, generator=g), "W_dec": torch.randn(8, 32, generator=g),
              "b_enc": torch.randn(8, generator=g), "b_dec": torch.randn(32, generator=g)}
    z = torch.randn(5, 32, generator=g)                                   # layer 1's two heads, concatenated
    # with fold_ln (the default) ln1's bias is folded into the value bias before it is removed
    attn = model.h[1].attn
    b_V = (attn.c_attn.bias[64:] + model.h[1].ln_1.bias @ attn.c_attn.weight[:, 64:]).detach()  # [32]
    tl_sae = main.dictionaries.SAE("vanilla", **params, meta={"hook_name": "blocks.1.attn.hook_z"})
    plain = main.as_plain_model_sae(tl_sae, model, "z", 1, None)
    torch.testing.assert_close(plain.encode(z), tl_sae.encode(z - b_V))
    torch.testing.assert_close(plain(z)[0], tl_sae(z - b_V)[0] + b_V)
    resid = main.as_plain_model_sae(tl_sae, model, "resid_pre", 1, None)
    torch.testing.assert_close(resid.encode(z), tl_sae.encode(z - z.mean(-1, keepdim=True)))
    plain_model = {"model_from_pretrained_kwargs": main.dictionaries.PLAIN_MODEL}
    ours = main.dictionaries.SAE("vanilla", **params, meta=plain_model)
    assert torch.equal(main.as_plain_model_sae(ours, model, "z", 1, None).encode(z), ours.encode(z))


@pytest.mark.parametrize("hook_name,head,d_in,message", [
    ("blocks.5.attn.hook_z", None, 32, "hook_name='blocks.5.attn.hook_z': the model has 2 layers"),
    ("blocks.1.attn.hook_z", 0, 32, "d_in=32: blocks.1.attn.hook_z head 0 of this model has 16 values"),
    ("blocks.1.hook_resid_pre", 1, 32, "hook_head_index=1 with blocks.1.hook_resid_pre"),
    ("blocks.0.hook_mlp_out", None, 32, "hook_name='blocks.0.hook_mlp_out': grade-sae reads"),
])
def test_grade_sae_mismatch_is_a_one_line_error(tmp_path, small_run, hook_name, head, d_in, message):
    folder = write_identity_sae(tmp_path / "sae", d_in, hook_name, head)
    result = CliRunner().invoke(main.cli, ["grade-sae", "--sae", str(folder), *small_run])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()[-1]) > 20 and "Traceback" not in result.output
