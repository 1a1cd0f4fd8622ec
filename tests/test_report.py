"""Specification of the report: metrics.json in, report.md + figures + terminal summary out."""
import json
import os
import re

import pytest
from click.testing import CliRunner

import main

SITES = ["(B)NM out", "(B)NM qk", "(B)NM q", "S-I out", "S-I v", "Ind+DT out"]
SAES = {"vanilla": [0.5, 1.0], "gated": [1.0], "topk": [3, 6], "random_decoder": [1.0]}
NODE = "q@L2H1@end"
SHIFT = {"vanilla": -0.2, "gated": 0.1, "topk": 0.05, "random_decoder": -0.3, "gated_fulldist": -0.1}


def fake_results():
    """One or more records of every test kind in the metrics.json contract."""
    r = []

    def add(test, site, method, value, **params):
        r.append({"test": test, "site": site, "method": method, "value": value, **params})

    add("logit_diff", "model", "clean", 3.21)
    add("accuracy", "model", "clean", 0.97)
    add("top1_accuracy", "model", "clean", 0.9)
    for i in range(10):
        add("logit_diff_histogram", "model", "clean", 5 + i * (9 - i), low=i - 2.0, high=i - 1.0)
    for site in SITES:
        for test in ("sufficiency", "necessity"):
            for method in ("mean_ablation", "supervised", "supervised_lstsq", "vanilla_fulldist"):
                add(test, site, method, 0.777 if (test, site, method) == ("sufficiency", "S-I v", "supervised") else 0.6)
            for method, settings in SAES.items():
                for s in settings:
                    add(test, site, method, 0.7 + SHIFT[method] + 0.1 * s / max(settings), setting=s)
        for attr in ("io", "s", "pos"):
            add("edit_accuracy_no_intervention", site, "none", 0.1, attribute=attr)
            for method in ("supervised", "supervised_lstsq"):
                add("edit_accuracy", site, method, 0.9, attribute=attr)
                add("weight_removed", site, method, 0.5, attribute=attr)
            for method, settings in {**SAES, "gated_fulldist": [None]}.items():
                for s in settings:
                    for k in (2, 4, 8, 16):
                        for edit in ("greedy", "f1"):
                            extra = {} if s is None else {"setting": s}
                            gain = 0.1 * k ** 0.5 * (0.7 if edit == "f1" else 1.0)
                            add("edit_accuracy", site, method, min(1.0, 0.5 + SHIFT[method] + gain),
                                attribute=attr, k=k, edit=edit, **extra)
                            add("weight_removed", site, method, 0.4 - SHIFT[method] + 0.02 * k,
                                attribute=attr, k=k, edit=edit, **extra)
            for method in ("supervised", "vanilla", "topk"):
                add("f1_coverage", site, method, 0.7 + SHIFT.get(method, 0.25), attribute=attr, node=NODE,
                    **({} if method == "supervised" else {"setting": SAES[method][0]}))
        for method, settings in SAES.items():
            for s in settings:
                add("edit_distance_k2", site, method, 0.4 * s, setting=s, chosen=s == settings[-1])
                for t in (0.2, 0.4, 0.6, 0.8):
                    add("causal_keep_sufficiency", site, method, 1 - t * t + SHIFT[method], threshold=t, setting=s)
                    add("causal_remove_necessity", site, method, t + SHIFT[method], threshold=t, setting=s)
    for method, settings in SAES.items():
        for s in settings:
            for test, v in (("l0", 7.0), ("mse", 0.1), ("fve", 0.9), ("dead_fraction", 0.2), ("ld_recovered", 0.8)):
                add(test, NODE, method, v, setting=s)
            add("pos_latents", NODE, method, 12, setting=s, phenomenon="oversplitting")
    for s in SAES["vanilla"]:
        add("occlusion_io_names", NODE, "vanilla", 40, setting=s)
        add("occlusion_s_names", NODE, "vanilla", 3, setting=s)
        for alpha in (0.0, 0.5, 1.0):
            add("alpha_sweep_io_names", NODE, "vanilla", 40 * (1 - alpha), alpha=alpha, setting=s)
            add("alpha_sweep_s_names", NODE, "vanilla", 40 * alpha, alpha=alpha, setting=s)
        for attr, norm, share in (("io", 1.3, 0.95), ("s", 1.0, 0.1)):
            add("occlusion_toy_recovered", "toy", "vanilla", share, attribute=attr, norm=norm, setting=s)
    add("phenomenon_testable", NODE, "supervised", 1.0, phenomenon="occlusion")
    add("phenomenon_testable", "None", "supervised", 0.0, phenomenon="oversplitting")
    for node, (norm, changed) in ((NODE, (0.5, 0.4)), ("q@L2H2@end", (0.05, 0.0))):
        for attr in ("io", "s", "pos"):
            add("evidence_norm", node, "supervised", norm, attribute=attr)
            add("evidence_answers_changed", node, "supervised", changed, attribute=attr)
            add("evidence_ld_moved", node, "supervised", changed / 2, attribute=attr)
    add("supervised_feature_norm", NODE, "supervised", 1.3, attribute="io")
    add("supervised_feature_norm", NODE, "supervised", 1.0, attribute="s")
    for grid in ("paper", "ours"):
        for lam in (0.0, 5.0, 10.0, 20.0):
            add("oversplit_toy_loss", "toy", "ideal_2_latent", 100 + lam, l1=lam, grid=grid, firing=1 - lam / 10)
            add("oversplit_toy_loss", "toy", "random_1000_latent", 100 + lam / 2, l1=lam, grid=grid)
        for count, value in (("counted", 2), ("random_wins", 2), ("ideal_wins", 0), ("ties", 0), ("not_counted", 2),
                             ("share_random_wins", 1.0)):
            add(f"oversplit_toy_{count}", "toy", "random_1000_latent", value, grid=grid)
    return r


def write_metrics(run_dir, results):
    config = {"weights": None, "n_train": 2000, "n_eval": 500, "seed": 0, "d_sae": 256, "epochs": 100,
              "vanilla_l1": [0.5, 1.0], "gated_l1": 1.0, "topk_k": [3, 6], "edit_k": [2, 4, 8, 16]}
    circuit = {"sections": [{"name": s, "nodes": [f"z@L{i}H1@end", f"z@L{i}H2@end"], "attributes": ["io", "pos"]}
                            for i, s in enumerate(SITES)],
               "discovery": {"heads": [{"head": "L3H1", "position": "end", "ld_drop": 1.5, "fraction": 0.4,
                                        "direct_effect": 1.1, "query_effect": None,
                                        "role": "name mover"},
                                       {"head": "L1H0", "position": "s2", "ld_drop": 0.2, "fraction": 0.05,
                                        "direct_effect": None, "query_effect": None,
                                        "role": ""}],
                             "sections": [{"section": "(B)NM q", "ld_drop": 0.01, "fraction": 0.003, "kept": False}]}}
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"config": config, "circuit": circuit, "results": results}, f)


def referenced_figures(run_dir):
    text = open(os.path.join(run_dir, "report.md")).read()
    return re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text)


def test_full_report(tmp_path):
    write_metrics(tmp_path, fake_results())
    summary = main.write_report(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    for heading in ("# Supervised dictionaries", "## 1. The model", "## 2. The circuit", "## 3. Test 1",
                    "## 4. Test 2", "## 5. Test 3", "## 6. Two SAE failure modes", "## 7. Core SAE metrics",
                    "## 8. Comparison with the paper"):
        assert heading in text
    assert "scaled down" in text
    assert re.search(r"\| S-I v \| [^\n]*0\.78 / ", text)  # the supervised sufficiency put in above
    assert "| L3H1 | end | 1.10 | – | 1.50 | 40.0% | name mover |" in text and "L1H0" not in text  # only heads with a role
    assert "| (B)NM q | 0.01 | 0.00 | dropped: not causal here |" in text
    assert "within the paper's range" in text
    assert "| paper | 2 | 2 | 0 | 0 | 2 | 1.00 |" in text
    assert "reproduced (criterion ≥ 0.95)" in text
    assert f"it runs at `{NODE}`" in text and f"| {NODE} | 0.50 / 40% / 20% | 0.50 / 40% / 20% |" in text
    assert "**Not testable here.**" in text  # over-splitting, in this fake run
    figures = referenced_figures(tmp_path)
    assert len(figures) == 9
    for fig in figures:
        path = tmp_path / fig
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert "pos@S-I v" in summary and "3.21" in summary


def test_report_with_most_tests_missing(tmp_path):
    write_metrics(tmp_path, [r for r in fake_results() if r["test"] in ("logit_diff", "sufficiency")])
    summary = main.write_report(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "## 8. Comparison with the paper" in text and "section skipped" in text
    for fig in referenced_figures(tmp_path):
        assert (tmp_path / fig).stat().st_size > 0
    assert "3.21" in summary


def test_cli_report_prints_summary(tmp_path):
    write_metrics(tmp_path, [r for r in fake_results() if r["test"] in ("logit_diff", "edit_accuracy")])
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "edit accuracy" in result.output and "report.md" in result.output


@pytest.mark.parametrize("content, problem", [("{not json", "not valid JSON"),
                                              ('{"config": {}}', "malformed"),
                                              ('{"results": [{"value": 1}]}', "malformed"),
                                              ('{"results": [{"test": "l0"}]}', "malformed record")])
def test_cli_malformed_metrics(tmp_path, content, problem):
    (tmp_path / "metrics.json").write_text(content)
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "metrics.json" in message and problem in message


def test_cli_missing_metrics(tmp_path):
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "metrics.json: not found" in result.output
