"""Interventions, the graders and the end-to-end pipeline (README §3, §5-§9), on a tiny random GPT-2.

The intervention and grader tests are invariances with known answers: a patch with the clean
value changes nothing, an exact reconstruction is fully sufficient and necessary, the mean
explains nothing (necessity 0), editing with the counterfactual itself is always right.
The last tests run every pipeline step on a tiny model and check metrics.json, and grade an
SAE from elsewhere.
"""
import copy
import functools
import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import dictionaries
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
        patched = ioi.run_with_patches(model, batch, clean)
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
        early_only = ioi.run_with_patches(model, batch, {early: zeros})
        both = ioi.run_with_patches(model, batch, {early: zeros, late: clean[late]})
    assert not torch.allclose(early_only, both, atol=1e-4)  # the late node was held at its clean value

    # Two heads of one layer do not interact: together == one hook per node, applied in turn.
    a, b = Node("z", 1, 0, "end"), Node("z", 1, 1, "end")
    values = {a: torch.randn(len(prompts), 16), b: torch.randn(len(prompts), 16)}
    end = batch.positions["end"][:, None]
    with torch.inference_mode():
        together = ioi.run_with_patches(model, batch, values)
        in_turn = model.run_with_hooks(batch.tokens, [(a.hook_name, gpt2.patch_heads(end, [0], values[a][:, None])),
                                                      (b.hook_name, gpt2.patch_heads(end, [1], values[b][:, None]))],
                                       logits_at=batch.positions["end"])
    torch.testing.assert_close(together, in_turn)


def test_approximation_known_answers(model, prompts):
    model = copy.deepcopy(model).double()  # exact identities, not float32 round-off
    clean = ioi.collect_activations(model, prompts, NODES)
    clean_run = ioi.patched_run(model, prompts)
    mean = {node: acts.mean(0).expand_as(acts) for node, acts in clean.items()}
    ablated = ioi.patched_run(model, prompts, mean)
    task = metrics.Task(model, prompts)
    exact = metrics.approximation(task, clean, clean, clean_run, ablated)
    assert exact["sufficiency"] == pytest.approx(1.0, abs=1e-9)
    assert exact["necessity"] == pytest.approx(1.0, abs=1e-9)
    nothing = metrics.approximation(task, clean, mean, clean_run, ablated)
    assert nothing["necessity"] == pytest.approx(0.0, abs=1e-9)
    expected = ablated.logit_diff.mean() / clean_run.logit_diff.mean()
    assert nothing["sufficiency"] == pytest.approx(float(expected), abs=1e-9)


def test_edit_with_the_counterfactual_itself_is_always_right(model, prompts):
    counterfactual = ioi.counterfactuals(prompts, "io", seed=0)
    cf = ioi.collect_activations(model, counterfactual, NODES)
    truth = ioi.patched_run(model, prompts, cf)
    again = ioi.patched_run(model, prompts, {node: v.clone() for node, v in cf.items()})
    assert metrics.edit_accuracy(again.top_token, truth.top_token) == 1.0


def test_patched_run_matches_end_logits(model, prompts):
    run = ioi.patched_run(model, prompts, batch_size=5)  # several batches
    batch = ioi.batch_prompts(prompts)
    with torch.inference_mode():
        logits = model(batch.tokens, logits_at=batch.positions["end"])
    rows = torch.arange(len(prompts))
    torch.testing.assert_close(run.logit_diff, logits[rows, batch.io_token] - logits[rows, batch.s_token])
    assert torch.equal(run.top_token, logits.argmax(-1))


def test_a_task_resumes_each_patched_run_at_its_first_patched_layer(model, prompts, monkeypatch):
    """Task.patched skips the blocks before the first patched layer, starting from the unpatched
    residual stream and keys and values there (one cache, rebuilt only for a lower layer): the numbers
    are those of the full pass."""
    task, cf = metrics.Task(model, prompts, batch_size=5), ioi.collect_activations(model, prompts, NODES)
    late = NODES[1]  # q@L1: layer 0 is skipped
    streams, residual_streams = [], ioi.residual_streams
    monkeypatch.setattr(ioi, "residual_streams", lambda *args: streams.append(args[2]) or residual_streams(*args))
    for patches in ({}, {late: cf[late]}, {node: cf[node] for node in NODES}, {late: cf[late] * 2}):
        resumed, full = task.patched(patches), ioi.patched_run(model, prompts, patches, batch_size=5)
        torch.testing.assert_close(resumed.logit_diff, full.logit_diff, rtol=0, atol=1e-5)
        assert torch.equal(resumed.top_token, full.top_token)
    assert streams == [1, 0]  # at layer 1, then at layer 0, which serves the last patch too


# --- the graders (README §5-§7), on one cross-section of the tiny model ---------------------

SECTION = CrossSection("test", (Node("z", 1, 0, "end"), Node("q", 1, 1, "end")), ("io", "pos"))


class ExactSAE:
    """A stand-in with the SAE interface of dictionaries.py that reconstructs exactly: latents
    ReLU(x) and ReLU(-x), decoded by [I; -I] (no bias, input scale 1)."""
    input_scale = 1.0

    def __init__(self, d):
        eye = torch.eye(d, dtype=torch.float64)
        self.W_dec = self.raw_directions = torch.cat([eye, -eye])  # [2d, d]

    def encode(self, x):
        return torch.relu(torch.cat([x, -x], -1))

    def active(self, x):
        return self.encode(x) > 0

    def __call__(self, x):
        f = self.encode(x)
        return f @ self.W_dec, f


class SilentSAE(ExactSAE):
    """An SAE none of whose latents ever fires: it reconstructs 0 and no edit changes anything."""

    def encode(self, x):
        return torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)


class Replace:
    """A dictionary stand-in whose edit puts the counterfactual activations in (or, with
    `to_counterfactual` False, leaves the clean ones), removing no weight."""

    def __init__(self, to_counterfactual):
        self.to_counterfactual = to_counterfactual

    def reconstruct(self, acts, values):
        return acts

    def edit(self, acts, change, how=None):
        edited = change.counterfactual if self.to_counterfactual else acts
        return metrics.Edit(edited, torch.zeros(len(acts)))


@pytest.fixture(scope="module")
def section(model, prompts):
    """(task, inputs): the tiny model in float64 on `prompts`, and SECTION's inputs."""
    model = copy.deepcopy(model).double()  # exact identities, not float32 round-off
    splits = {"eval": prompts, **{f"cf_{attribute}": ioi.counterfactuals(prompts, attribute, seed=i)
                                  for i, attribute in enumerate(SECTION.attributes)}}
    acts = {split: ioi.collect_activations(model, split_prompts, SECTION.nodes)
            for split, split_prompts in splits.items()}
    values = {split: ioi.attribute_ids(split_prompts) for split, split_prompts in splits.items()}
    task = metrics.Task(model, prompts)
    return task, metrics.section_inputs(task, SECTION, acts, values, task.patched())


def at_nodes(sae_class, inputs):
    """{node: SAEAtNode} of one stand-in SAE at every node of the section."""
    return {node: metrics.SAEAtNode(sae_class(acts.shape[1]), acts, inputs.values)
            for node, acts in inputs.clean.items()}


def values_of(records):
    return {(r.test, r.attribute): r.value for r in records}


def test_section_inputs_hold_the_reference_runs(section):
    task, inputs = section
    assert torch.equal(inputs.clean_run.top_token, task.patched().top_token)
    mean = {node: acts.mean(0).expand_as(acts) for node, acts in inputs.clean.items()}
    torch.testing.assert_close(inputs.mean_ablated_run.logit_diff, task.patched(mean).logit_diff)
    for attribute in SECTION.attributes:
        truth = task.patched(inputs.counterfactual[attribute])
        assert torch.equal(inputs.truth[attribute].top_token, truth.top_token)
    assert not torch.equal(inputs.values["io"], inputs.new_values["io"])  # a new IO name in p′


def test_an_exact_dictionary_is_sufficient_necessary_and_edits_exactly(section):
    """README §5-§6: patching an exact reconstruction changes nothing (sufficiency 1), removing
    what it explains is mean ablation (necessity 1), and an edit free to change every latent
    lands on the counterfactual activation (edit accuracy 1)."""
    task, inputs = section
    d = next(iter(inputs.clean.values())).shape[1]
    records = metrics.grade_dictionary(task, inputs, "exact", at_nodes(ExactSAE, inputs), ["io"],
                                       [metrics.SAEEdit("greedy", 2 * d)], setting=1.0)
    scores = values_of(records)
    assert scores[("sufficiency", None)] == pytest.approx(1.0, abs=1e-9)
    assert scores[("necessity", None)] == pytest.approx(1.0, abs=1e-9)
    assert scores[("edit_accuracy", "io")] == 1.0
    assert 0 < scores[("latents_changed", "io")] <= 2 * d
    assert {(r.k, r.edit, r.setting) for r in records if r.attribute} == {(2 * d, "greedy", 1.0)}


@pytest.mark.parametrize("to_counterfactual", [True, False])
def test_edit_accuracy_of_an_edit_to_the_counterfactual_and_of_none(section, to_counterfactual):
    """The counterfactual activations themselves edit right every time; leaving the clean ones is
    the no-intervention baseline (README §6). A supervised-style edit has no latents to count."""
    task, inputs = section
    dictionary = {node: Replace(to_counterfactual) for node in SECTION.nodes}
    records = metrics.grade_dictionary(task, inputs, "stand-in", dictionary, SECTION.attributes)
    for attribute in SECTION.attributes:
        unchanged = metrics.edit_accuracy(inputs.clean_run.top_token, inputs.truth[attribute].top_token)
        assert values_of(records)[("edit_accuracy", attribute)] == (1.0 if to_counterfactual else unchanged)
        assert values_of(records)[("weight_removed", attribute)] == 0.0
    assert "latents_changed" not in {r.test for r in records}


def test_settings_are_chosen_by_where_their_edits_land(section):
    """README §8: per attribute, the setting whose k = 2 greedy edits land closest to a(p′)."""
    _, inputs = section
    settings = {1.0: at_nodes(SilentSAE, inputs), 2.0: at_nodes(ExactSAE, inputs)}
    chosen, records = metrics.choose_settings(inputs, "topk", settings)
    assert chosen == {"io": 2.0, "pos": 2.0}
    assert {(r.attribute, r.setting): r.chosen for r in records} == {
        ("io", 1.0): False, ("io", 2.0): True, ("pos", 1.0): False, ("pos", 2.0): True}
    assert metrics.chosen_settings(records) == {("test", "topk"): [2.0, 2.0]}


def test_ld_recovered_is_one_for_an_exact_sae_and_skips_nodes_that_do_nothing_alone(section):
    task, inputs = section
    saes = {"exact": {None: at_nodes(ExactSAE, inputs)}}
    acts = inputs.clean
    graded = metrics.ld_recovered_records(task, inputs.clean_run, acts, [SECTION], saes, {},
                                          min_node_effect=0)
    assert [r.site for r in graded] == [str(node) for node in SECTION.nodes]
    assert all(r.value == pytest.approx(1.0, abs=1e-9) and r.setting is None for r in graded)
    inert = metrics.ld_recovered_records(task, inputs.clean_run, acts, [SECTION], saes, {},
                                         min_node_effect=float("inf"))
    assert inert == []


def test_grade_section_scores_every_method(section):
    task, inputs = section
    supervised = {"stand-in": {node: Replace(True) for node in SECTION.nodes}}
    task_saes = {"topk": {3: at_nodes(ExactSAE, inputs)}}
    corpus_saes = {"topk_fulldist": at_nodes(ExactSAE, inputs)}
    records = metrics.grade_section(task, inputs, supervised, task_saes, corpus_saes, edit_ks=(2,),
                                    thresholds=(0.0,))
    methods = {r.method for r in records if r.test == "sufficiency"}
    assert methods == {"mean_ablation", "stand-in", "topk", "topk_fulldist"}
    assert {r.attribute for r in records if r.test == "edit_accuracy_no_intervention"} == {"io", "pos"}
    sae_edits = {(r.method, r.setting, r.attribute, r.edit) for r in records
                 if r.test == "edit_accuracy" and r.method != "stand-in"}
    assert sae_edits == {(method, setting, attribute, edit)
                         for method, setting in (("topk", 3), ("topk_fulldist", None))
                         for attribute in ("io", "pos") for edit in ("greedy", "f1")}
    keep = [r for r in records if r.test == "causal_keep_sufficiency"]
    # at F1 >= 0 every latent is kept: the exact reconstruction
    assert len(keep) == 2 and all(r.value == pytest.approx(1.0, abs=1e-9) for r in keep)


# --- the whole pipeline on a tiny model with a fixed circuit --------------------------------

SECTIONS = [CrossSection("(B)NM out", (Node("z", 1, 0, "end"),), ("io", "pos")),
            CrossSection("(B)NM q", (Node("q", 1, 0, "end"), Node("q", 1, 1, "end")), ("pos", "s"))]
DISCOVERY = {"heads": [{"head": "L1H0", "position": "end", "ld_drop": 0.5, "fraction": 0.5,
                        "direct_effect": 0.7, "query_effect": None, "role": "name mover"}],
             "sections": [{"section": "(B)NM out", "ld_drop": 0.6, "fraction": 0.6, "kept": True}]}
SMALL_TOY = {"n_samples": 256, "n_latents": 100}
SMALL_TOYS = {"paper": {**metrics.OVERSPLITTING_GRIDS["paper"], **SMALL_TOY}}


def open_tiny_run(tmp_path, model, circuit, **settings):
    """A run of the demo preset on the tiny model, few prompts and the given circuit."""
    weights = tmp_path / "model"
    if not weights.exists():
        model.save_pretrained(weights)
    return main.open_run(str(tmp_path / "run"), str(weights), preset="demo", circuit=circuit, n_train=120,
                         n_eval=40, epochs=2, **settings)


def files_in(folder):
    """{path: (inode, modification time)} of every file under `folder`: a rewritten file changes."""
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in folder.rglob("*") if path.is_file()}


def test_pipeline_end_to_end(tmp_path, model, monkeypatch, capsys):
    """Every step on a tiny model with a fixed circuit: metrics.json has every test, every
    architecture is scored at every site, and report.md is written."""
    settings = dict(d_sae=16, corpus_tokens=300, corpus_d_sae=16, corpus_epochs=1, edit_k=(2, 4))
    run = open_tiny_run(tmp_path, model, (SECTIONS, DISCOVERY), eta=True, **settings)
    estimate = capsys.readouterr().out
    assert "Estimated time for the whole run: " in estimate and "to train the task SAEs" in estimate
    planned = main.plan(run)
    assert all(f"  {phase}: " in estimate for phase in planned)
    # Evaluation prompts shortest first (a patched pass recomputes few positions), the same set as
    # drawn, each beside its own counterfactuals: same template, place and object, one attribute changed.
    evaluation, c = run.splits["eval"], run.config
    assert [len(p.tokens) for p in evaluation] == sorted(len(p.tokens) for p in evaluation)
    drawn = ioi.eval_prompts(c.n_eval, c.seed + 1)
    assert sorted(p.text for p in evaluation) == sorted(p.text for p in drawn)
    for attribute in ioi.ATTRIBUTES:
        for prompt, changed in zip(evaluation, run.splits[f"cf_{attribute}"]):
            kept = ("template", "place", "object")
            assert [getattr(changed, a) for a in kept] == [getattr(prompt, a) for a in kept]
            assert [getattr(changed, a) != getattr(prompt, a) for a in ioi.ATTRIBUTES] == [
                a == attribute for a in ioi.ATTRIBUTES]
    forward_passes, patched_run = [], ioi.patched_run
    monkeypatch.setattr(ioi, "patched_run", lambda *args, **kwargs: forward_passes.append(1)
                        or patched_run(*args, **kwargs))
    main.evaluate_and_report(run, oversplitting_grids=SMALL_TOYS)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # The ETA's count of forward passes (one setting per architecture: exact but for LD recovered,
    # which patches every node at its mean, then reconstructions only where that moves the LD).
    ld_recovered = sum(row["test"] == "ld_recovered" for row in saved["results"]) + len(run.nodes)
    passes = {phase: sum(planned[phase].values()) for phase in (main.SECTIONS, main.CORE, main.PHENOMENA)}
    assert len(forward_passes) == passes[main.SECTIONS] + ld_recovered + passes[main.PHENOMENA]
    assert ld_recovered <= passes[main.CORE]
    assert saved["config"]["n_train"] == 120
    rows = saved["results"]
    tests = {row["test"] for row in rows}
    for test in ("sufficiency", "necessity", "edit_accuracy", "edit_accuracy_no_intervention",
                 "weight_removed", "latents_changed", "f1_coverage", "pos_latents", "l0",
                 "phenomenon_testable", "evidence_norm", "occlusion_toy_recovered", "oversplit_toy_loss",
                 "causal_keep_sufficiency"):
        assert test in tests, test
    assert {row["grid"] for row in rows if row["test"] == "oversplit_toy_loss"} == {"paper"}
    # (ld_recovered is recorded only where one node alone moves the LD by >= 0.5%; this random
    # model's nodes move its near-zero LD by less, so it may rightly have none.)
    occlusion = [row for row in rows
                 if row["test"] == "phenomenon_testable" and row["phenomenon"] == "occlusion"]
    assert ("occlusion_io_names" in tests and "alpha_sweep_io_names" in tests) == bool(occlusion[0]["value"])
    for site in ("(B)NM out", "(B)NM q"):
        scored = {row["method"] for row in rows if row["test"] == "sufficiency" and row["site"] == site}
        assert {"supervised", "supervised_lstsq", "vanilla", "gated", "topk", "random_decoder",
                "mean_ablation", "vanilla_fulldist", "gated_fulldist", "topk_fulldist"} <= scored
    assert all(isinstance(row["value"], float) and None not in row.values() for row in rows)
    assert (tmp_path / "run" / "report.md").exists()

    # A second run over the same folder resumes: every SAE stack is loaded, none is trained and saved again.
    saes = files_in(tmp_path / "run" / "saes")
    again = main.evaluate_run(open_tiny_run(tmp_path, model, (SECTIONS, DISCOVERY), **settings),
                              oversplitting_grids=SMALL_TOYS)
    assert files_in(tmp_path / "run" / "saes") == saes
    # ... and grades them to the same records: a fresh run grades the SAEs as saved, like a resumed one
    assert json.loads(json.dumps([record.to_json() for record in again])) == rows


def test_grading_resumes_at_the_method_a_killed_run_had_not_finished(tmp_path, model, monkeypatch):
    run = open_tiny_run(tmp_path, model, (SECTIONS, DISCOVERY), d_sae=16, edit_k=(2,))
    supervised, (task_saes, _), corpus_saes = run.fit_supervised(), run.train_task_saes(), {}
    dictionaries_at_nodes = run.at_nodes(supervised, task_saes, corpus_saes)
    task = run.task()
    graded, section_tests, kill_at = [], metrics.section_tests, 0

    def logged(*args):  # each method's grading notes (site, method) as it starts; the kill_at-th is killed
        def grade(method, test, inputs):
            graded.append((inputs.site, method))
            if len(graded) == kill_at:
                raise KeyboardInterrupt
            return test(inputs)
        return {method: functools.partial(grade, method, test) for method, test in section_tests(*args).items()}
    monkeypatch.setattr(metrics, "section_tests", logged)

    def grade():
        return main.grade_sections(run, task, task.patched(), *dictionaries_at_nodes)
    uninterrupted, every_step = grade(), list(graded)
    assert every_step[:3] == [("(B)NM out", "none"), ("(B)NM out", "supervised"), ("(B)NM out", "supervised_lstsq")]
    shutil.rmtree(tmp_path / "run" / "grades")
    graded.clear()
    kill_at = 3
    with pytest.raises(KeyboardInterrupt):
        grade()
    graded.clear()
    kill_at = 0
    # the same records; the two methods graded before the kill are loaded, not graded again
    assert grade() == uninterrupted and graded == every_step[2:]


def test_skipped_sections_are_neither_trained_on_nor_graded_and_are_reported(tmp_path, model):
    run = open_tiny_run(tmp_path, model, (SECTIONS, DISCOVERY), skip_sections=("(B)NM q",))
    assert [s.name for s in run.sections] == ["(B)NM out"] and run.skipped == ["(B)NM q"]
    assert run.nodes == [Node("z", 1, 0, "end")]  # the q nodes are not collected, so no SAE trains there
    assert main.read_config(run.path("config.json")).skip_sections == ("(B)NM q",)
    with pytest.raises(ValueError, match="every cross-section found is in skip_sections"):
        open_tiny_run(tmp_path, model, (SECTIONS, DISCOVERY), skip_sections=("(B)NM q", "(B)NM out"),
                      force=True)


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


# (hook_name, hook_head_index, d_in, the site graded): one head (like ours), every head's z
# concatenated (public attention-output SAEs), the residual stream (public residual SAEs).
LAYOUTS = [("blocks.1.attn.hook_z", 0, 16, "(B)NM out [z@L1H0]"),
           ("blocks.1.attn.hook_z", None, 32, "(B)NM out [z@L1]"),
           ("blocks.1.hook_resid_pre", None, 32, "(B)NM out + (B)NM q [resid_pre@L1]")]
NO_DISCOVERY = {"heads": [], "sections": []}


@pytest.mark.parametrize("hook_name,head,d_in,site", LAYOUTS)
def test_grade_sae_grades_each_layout_beside_the_supervised_dictionaries(tmp_path, model, hook_name,
                                                                         head, d_in, site):
    folder = write_identity_sae(tmp_path / "public-sae", d_in, hook_name, head)
    run = open_tiny_run(tmp_path, model, (SECTIONS, NO_DISCOVERY), d_sae=16, edit_k=(2,),
                        f1_thresholds=(0.0, 0.6))
    # random weights: any effect of a site on the LD will do
    main.grade_sae_in_run(run, dictionaries.load_sae(folder), "sae:public-sae", min_section_effect=0.0)
    main.write_report(run.out)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    at_site = {(r["test"], r["method"]) for r in rows if r["site"] == site}
    for test in ("sufficiency", "necessity", "edit_accuracy", "weight_removed", "f1_coverage",
                 "causal_keep_sufficiency"):
        assert (test, "sae:public-sae") in at_site, test
    assert ("sufficiency", "supervised") in at_site and ("edit_accuracy", "supervised") in at_site
    assert (("sufficiency", "topk") in at_site) == (head is not None)  # ours, where it reads single heads
    approximation = {r["test"]: r["value"] for r in rows if r["site"] == site
                     and r["method"] == "sae:public-sae" and r["test"] in ("sufficiency", "necessity")}
    # it reconstructs exactly: patched at the right slots, the model's LD is untouched (up to float
    # rounding, which necessity divides by the small effect of mean-ablating a random model's site)
    assert approximation == pytest.approx({"sufficiency": 1.0, "necessity": 1.0}, abs=1e-3)
    assert {r["test"] for r in rows if r["method"] == "sae:public-sae"} >= {"l0", "fve", "graded_sae"}
    assert all(r["graded_sae"] == "sae:public-sae" for r in rows)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## 10. SAEs from elsewhere" in report and site in report
    # grading it again replaces its records instead of adding to them
    main.grade_sae_in_run(run, dictionaries.load_sae(folder), "sae:public-sae", min_section_effect=0.0)
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())["results"]
    assert len(again) == len(rows)


def test_grade_sae_skips_sites_that_barely_move_the_task(tmp_path, model):
    folder = write_identity_sae(tmp_path / "public-sae", 16, "blocks.1.attn.hook_z", 0)
    run = open_tiny_run(tmp_path, model, (SECTIONS, NO_DISCOVERY), d_sae=16, edit_k=(2,))
    with pytest.raises(ValueError, match="none of the sites it reads is causal"):
        main.grade_sae_in_run(run, dictionaries.load_sae(folder), "sae:x", min_section_effect=float("inf"))


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
    plain = main.dictionaries.as_plain_model_sae(tl_sae, model, "z", 1, None)[0]
    torch.testing.assert_close(plain.encode(z), tl_sae.encode(z - b_V))
    torch.testing.assert_close(plain(z)[0], tl_sae(z - b_V)[0] + b_V)
    resid = main.dictionaries.as_plain_model_sae(tl_sae, model, "resid_pre", 1, None)[0]
    torch.testing.assert_close(resid.encode(z), tl_sae.encode(z - z.mean(-1, keepdim=True)))
    plain_model = {"model_from_pretrained_kwargs": main.dictionaries.PLAIN_MODEL}
    ours = main.dictionaries.SAE("vanilla", **params, meta=plain_model)
    plain_ours, folded = main.dictionaries.as_plain_model_sae(ours, model, "z", 1, None)
    assert torch.equal(plain_ours.encode(z), ours.encode(z)) and folded == []


@pytest.fixture
def cli_run(tmp_path, model, monkeypatch):
    """CLI settings of a tiny run. The CLI finds its circuit itself: here it is given SECTIONS."""
    weights = tmp_path / "model"
    model.save_pretrained(weights)
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda *args, **kwargs: (SECTIONS, NO_DISCOVERY))
    return ["--out", str(tmp_path / "run"), "--weights", str(weights), "--preset", "demo",
            "--n-train", "120", "--n-eval", "40", "--epochs", "2"]


@pytest.mark.parametrize("hook_name,head,d_in,message", [
    ("blocks.5.attn.hook_z", None, 32, "hook_name='blocks.5.attn.hook_z': the model has 2 layers"),
    ("blocks.1.attn.hook_z", 0, 32, "d_in=32: blocks.1.attn.hook_z head 0 of this model has 16 values"),
    ("blocks.1.hook_resid_pre", 1, 32, "hook_head_index=1 with blocks.1.hook_resid_pre"),
    ("blocks.0.hook_mlp_out", None, 32, "hook_name='blocks.0.hook_mlp_out': grade-sae reads"),
])
def test_grade_sae_mismatch_is_a_one_line_error(tmp_path, cli_run, hook_name, head, d_in, message):
    folder = write_identity_sae(tmp_path / "sae", d_in, hook_name, head)
    result = CliRunner().invoke(main.cli, ["grade-sae", "--sae", str(folder), *cli_run])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()[-1]) > 20 and "Traceback" not in result.output


def test_the_laptop_preset_is_what_the_readme_says():
    """README, "Commands": GPT-2 Small's six cross-sections, one setting per architecture (λ = 1,
    k = 3), 2,000 training and 200 evaluation prompts, SAE edits of k = 2 and 4."""
    laptop = main.LAPTOP
    assert (laptop.n_train, laptop.n_eval, laptop.skip_sections, laptop.edit_k) == (2000, 200, (), (2, 4))
    assert (laptop.vanilla_l1, laptop.gated_l1, laptop.topk_k, laptop.epochs) == ((1.0,), (1.0,), (3,), 150)
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "(λ = 1, k = 3), 2,000 training and 200 evaluation prompts, SAE edits of k = 2 and 4" in readme
