"""Specification of the report: metrics.json in, report.md + figures + terminal summary out."""
import json
import os
import re
from pathlib import Path

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
                planted = (test, site, method) == ("sufficiency", "S-I v", "supervised")
                add(test, site, method, 0.777 if planted else 0.6)
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
                            add("latents_changed", site, method, k / 2, attribute=attr, k=k, edit=edit, **extra)
            for method in ("supervised", "vanilla", "topk"):
                add("f1_coverage", site, method, 0.7 + SHIFT.get(method, 0.25), attribute=attr, node=NODE,
                    **({} if method == "supervised" else {"setting": SAES[method][0]}))
        for method, settings in SAES.items():
            for s in settings:
                for attr in ("io", "s", "pos"):
                    add("edit_distance_k2", site, method, 0.4 * s, attribute=attr, setting=s,
                        chosen=s == settings[-1])
                for t in (0.2, 0.4, 0.6, 0.8):
                    add("causal_keep_sufficiency", site, method, 1 - t * t + SHIFT[method], threshold=t,
                        setting=s)
                    add("causal_remove_necessity", site, method, t + SHIFT[method], threshold=t, setting=s)
    for method, settings in SAES.items():
        for s in settings:
            for test, v in (("l0", 7.0), ("mse", 0.1), ("fve", 0.9), ("dead_fraction", 0.2),
                            ("ld_recovered", 0.8)):
                add(test, NODE, method, v, setting=s)
            add("pos_latents", NODE, method, 12, setting=s, phenomenon="oversplitting")
    for s in SAES["vanilla"]:
        add("occlusion_io_names", NODE, "vanilla", 40, setting=s)
        add("occlusion_s_names", NODE, "vanilla", 3, setting=s)
        for alpha in (0.0, 0.5, 1.0):
            add("alpha_sweep_io_names", NODE, "vanilla", 40 * (1 - alpha), alpha=alpha, setting=s)
            add("alpha_sweep_s_names", NODE, "vanilla", 40 * alpha, alpha=alpha, setting=s)
        for attr, norm, share in (("io", 1.0, 0.95), ("s", 1 / 1.3, 0.1)):
            add("occlusion_toy_recovered", "toy", "vanilla", share, attribute=attr, norm=norm, ratio=1.3,
                setting=s)
    for gate, attribute in (("present", "io"), ("causal", "s")):
        add(f"gate_{gate}", NODE, "supervised", True, attribute=attribute, phenomenon="occlusion")
    add("occlusion_reproduced", NODE, "vanilla", True, setting=SAES["vanilla"][0])
    for test, value in (("lstsq_fve", 0.9), ("effective_rank", 7.5), ("io_s_overlap", 0.2)):
        add(f"geometry_{test}", NODE, "supervised", value)
    for attribute in ("io", "s", "pos"):
        add("ground_truth_cosine", NODE, "vanilla", 0.7, attribute=attribute, setting=SAES["vanilla"][0])
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
            add("oversplit_toy_loss", "toy", "ideal_2_latent", 100 + lam, l1=lam, grid=grid,
                firing=1 - lam / 10)
            add("oversplit_toy_loss", "toy", "random_1000_latent", 100 + lam / 2, l1=lam, grid=grid)
        for count, value in (("counted", 2), ("random_wins", 2), ("ideal_wins", 0), ("ties", 0),
                             ("not_counted", 2), ("share_random_wins", 1.0)):
            add(f"oversplit_toy_{count}", "toy", "random_1000_latent", value, grid=grid)
    return r


def write_metrics(run_dir, results):
    config = {"weights": None, "n_train": 2000, "n_eval": 500, "seed": 0, "d_sae": 256, "epochs": 100,
              "vanilla_l1": [0.5, 1.0], "gated_l1": 1.0, "topk_k": [3, 6], "edit_k": [2, 4, 8, 16]}
    circuit = {"sections": [{"name": s, "nodes": [f"z@L{i}H1@end", f"z@L{i}H2@end"],
                             "attributes": ["io", "pos"]} for i, s in enumerate(SITES)],
               "discovery": {"heads": [{"head": "L3H1", "position": "end", "ld_drop": 1.5, "fraction": 0.4,
                                        "direct_effect": 1.1, "query_effect": None,
                                        "role": "name mover"},
                                       {"head": "L1H0", "position": "s2", "ld_drop": 0.2, "fraction": 0.05,
                                        "direct_effect": None, "query_effect": None,
                                        "role": ""}],
                             "sections": [{"section": "(B)NM q", "ld_drop": 0.01, "fraction": 0.003,
                                           "kept": False}]}}
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"config": config, "circuit": circuit, "results": results}, f)


def referenced_figures(run_dir):
    text = (run_dir / "report.md").read_text()
    return re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\)", text)


def section(text, heading):
    """The report's text from `heading` to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = text.index(heading)
    ends = [text.find("\n" + h + " ", start + 1) for h in ("#", "##", "###")[:len(level)]]
    return text[start:min([end for end in ends if end != -1], default=len(text))]


def tables(text):
    """Every markdown table in `text`, each as a list of {column header: cell} rows."""
    found = []
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("|"):
            def cells(line):
                return [cell.strip() for cell in line.strip().strip("|").split("|")]
            found.append([dict(zip(cells(lines[0]), cells(line))) for line in lines[2:]])
    return found


def row(table, **match):
    """The one row of `table` whose cells equal `match` (in column names, "-" and " " are written "_")."""
    def named(r):
        return {re.sub(r"[- ]", "_", column): cell for column, cell in r.items()}
    rows = [r for r in table if all(named(r).get(column) == cell for column, cell in match.items())]
    assert len(rows) == 1, (match, table)
    return rows[0]


@pytest.fixture
def full_report(tmp_path):
    write_metrics(tmp_path, fake_results())
    summary = main.write_report(str(tmp_path))
    return tmp_path, (tmp_path / "report.md").read_text(), summary


HEADINGS = ["# Supervised dictionaries", "## At a glance", "## 1. The model", "## 2. The circuit",
            "## 3. Test 1", "## 4. Test 2", "## 5. Test 3", "## 6. Two SAE failure modes",
            "### Feature occlusion", "### Feature over-splitting", "## 7. Core SAE metrics",
            "## 8. Comparison with the paper", "## 9. Geometry and ground truth"]


def test_every_section_in_order_and_every_figure_a_png(full_report):
    run_dir, text, _ = full_report
    positions = [text.index(heading) for heading in HEADINGS]
    assert positions == sorted(positions)
    assert "## 10." not in text  # no SAE from elsewhere was graded in this run
    assert "| 0.90 |" in section(text, "## 9.")  # the least-squares fit in the geometry table
    figures = referenced_figures(run_dir)
    assert sorted(figures) == sorted(["ld_histogram.png", "approximation.png", "control_headline.png",
                                      "f1_coverage.png", "causal_f1.png", "occlusion.png", "alpha_sweep.png",
                                      "oversplit_toy.png"])
    for name in figures:
        png = (run_dir / "figures" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == sorted(figures)  # nothing else written


def test_known_records_appear_in_their_tables(full_report):
    _, text, summary = full_report
    assert "scaled down" in text.lower() and "n_train = 2000 instead of 20000" in text
    assert tables(section(text, "## 1."))[0][0]["logit_diff"] == "3.21"
    heads, verdicts = tables(section(text, "## 2."))[1:]
    assert row(heads, head="L3H1")["direct effect"] == "1.10" and "L1H0" not in text  # only heads with a role
    assert row(verdicts, cross_section="(B)NM q")["verdict"] == "dropped: not causal here"
    # the supervised sufficiency put in above for S-I v; the task SAEs at their chosen setting
    approximation = tables(section(text, "## 3."))[0]
    assert row(approximation, cross_section="S-I v")["supervised"] == "0.78 / 0.60"
    assert row(approximation, cross_section="S-I v")["topk"] == "0.85 / 0.85"  # k = 6 (chosen), not k = 3
    k2, f1_edits, f1_paper_size, chosen = tables(section(text, "## 4."))  # f1_paper_size: 2 out + 2 in
    edit = row(k2, cross_section="S-I v", attribute="pos")
    assert (edit["none"], edit["supervised"], edit["topk"]) == ("0.10", "0.90 / 0.50", "0.69 / 0.39 (1.0 of L0 –)")
    assert row(f1_edits, cross_section="S-I v", attribute="pos")["topk"] == "0.65 / 0.39 (1.0 of L0 –)"
    assert row(chosen, cross_section="S-I v", attribute="pos")["topk"] == "k=6 (2.40)"
    coverage = tables(section(text, "## 5."))[0]
    assert row(coverage, cross_section="(B)NM out", attribute="io")["vanilla"] == "0.50"
    occlusion = tables(section(text, "### Feature occlusion"))[1]
    assert row(occlusion, setting="λ=0.5")["IO names"] == "40"
    assert row(occlusion, setting="λ=1")["S names"] == "3"
    assert row(tables(section(text, "## 7."))[0], method="topk", setting="k=6")["l0"] == "7.00"
    assert "| pos | S-I v | 0.90 / 0.78 | 0.44 / 0.60 |" in summary and "3.21" in summary  # terminal summary
    assert summary in text  # also "At a glance"


def test_verdicts_state_their_criterion_and_number(full_report):
    _, text, _ = full_report
    occlusion = section(text, "### Feature occlusion")
    assert "the stronger of io, s is present (mean-code norm over its shuffled-label floor ≥ 0.1)" in occlusion
    assert "changes ≥ 10% of the answers" in occlusion
    assert row(tables(occlusion)[0], node=NODE)["s"] == "0.50 / 40% / 20%"  # norm / answers changed / LD moved
    oversplitting = section(text, "### Feature over-splitting")
    assert "the stronger of pos is present (mean-code norm over its shuffled-label floor" in oversplitting
    assert "**Not testable here.**" in oversplitting
    closest = tables(oversplitting)[0]  # the nodes closest to testable, the strongest first
    assert [r["node"] for r in closest] == [NODE, "q@L2H2@end"]
    assert closest[1]["pos"] == "0.05 / 0% / 0%"
    assert row(tables(oversplitting)[2], grid="paper")["share random wins"] == "1.00"
    paper = tables(section(text, "## 8."))[0]
    assert row(paper, quantity="supervised: edit accuracy at k = 2")["verdict"] == "within the paper's range"
    assert row(paper, quantity="gated: edit accuracy at k = 2")["verdict"] == "lower"
    testable = [row(paper, quantity=f"{p}: testable in the model (1: yes)")
                for p in ("occlusion", "oversplitting")]
    assert [(r["paper"], r["this run"], r["verdict"]) for r in testable] == [
        ("1", "1", "within the paper's range"), ("1", "0", "lower")]
    pos = row(paper, quantity="over-splitting: latents interpreted as a Pos value")
    assert (pos["paper"], pos["this run"], pos["verdict"]) == ("≥ 10", "12", "within the paper's range")
    toy = row(paper, quantity="toy: share of the 2 λ counted that the random SAE wins")
    assert (toy["paper"], toy["this run"], toy["verdict"]) == ("0.95–1.00", "1.00", "within the paper's range")
    occlusion_row = row(paper, quantity="occlusion: IO minus S names with a latent (F1 ≥ 0.5)")
    assert (occlusion_row["paper"], occlusion_row["this run"]) == ("≥ 1", "37")  # 40 IO, 3 S names
    gained = [row(paper, quantity=f"α sweep: {a} names with a latent gained") for a in ("S", "IO")]
    assert [(r["paper"], r["this run"], r["verdict"]) for r in gained] == [
        ("≥ 1", "40", "within the paper's range"), ("≤ -1", "-40", "within the paper's range")]


def test_a_verdict_turns_when_the_numbers_do(tmp_path):
    """Occlusion with more S than IO names, and a toy the random SAE mostly loses, are not reproduced."""
    records = fake_results()
    for r in records:
        if r["test"] == "occlusion_s_names":
            r["value"] = 50
        if r["test"] == "oversplit_toy_share_random_wins":
            r["value"] = 0.5
    write_metrics(tmp_path, records)
    main.write_report(str(tmp_path))
    paper = tables(section((tmp_path / "report.md").read_text(), "## 8."))[0]
    occlusion = row(paper, quantity="occlusion: IO minus S names with a latent (F1 ≥ 0.5)")
    assert (occlusion["this run"], occlusion["verdict"]) == ("-10", "lower")
    toy = row(paper, quantity="toy: share of the 2 λ counted that the random SAE wins")
    assert (toy["this run"], toy["verdict"]) == ("0.50", "lower")


def test_the_oversplitting_verdict_counts_trained_saes_not_the_random_floor(tmp_path):
    records = fake_results()
    for r in records:
        if r["test"] == "pos_latents" and r.get("phenomenon") == "oversplitting":
            r["value"] = 53 if r["method"] == "random_decoder" else 2
    write_metrics(tmp_path, records)
    main.write_report(str(tmp_path))
    paper = tables(section((tmp_path / "report.md").read_text(), "## 8."))[0]
    verdict = row(paper, quantity="over-splitting: latents interpreted as a Pos value")
    assert (verdict["this run"], verdict["verdict"]) == ("2", "lower")


def test_task_saes_are_shown_at_the_setting_chosen_for_each_attribute(tmp_path):
    """Test 2 chooses an SAE setting per site and attribute (README §8): here k=3 for IO, k=6 for Pos;
    each row of the edit table takes its own attribute's setting, and the approximation table (no
    attribute) the one chosen most often."""
    topk = {"site": "S-I v", "method": "topk"}
    records = []
    for k in (3, 6):
        for attribute, chosen_k in (("io", 3), ("pos", 6), ("s", 6)):
            records += [{"test": "edit_distance_k2", **topk, "value": 0.1, "setting": k,
                         "attribute": attribute, "chosen": k == chosen_k},
                        {"test": "edit_accuracy", **topk, "value": k / 10, "setting": k,
                         "attribute": attribute, "k": 2, "edit": "greedy"}]
        records.append({"test": "sufficiency", **topk, "value": k / 100, "setting": k})
    write_metrics(tmp_path, records)
    main.write_report(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    edits = tables(section(text, "## 4."))[0]
    assert [row(edits, attribute=a)["topk"] for a in ("io", "pos")] == ["0.30 / –", "0.60 / –"]
    assert row(tables(section(text, "## 3."))[0], cross_section="S-I v")["topk"] == "0.06 / –"


def test_sections_without_records_say_so_and_draw_nothing(tmp_path):
    write_metrics(tmp_path, [r for r in fake_results() if r["test"] in ("logit_diff", "sufficiency")])
    main.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    for heading in ("## 4.", "## 5.", "## 7.", "## 8."):
        assert "section skipped" in section(text, heading)
    assert "section skipped" not in section(text, "## 3.")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["approximation.png"]


def test_a_failed_render_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    write_metrics(tmp_path, fake_results())
    main.write_report(str(tmp_path))
    before = (tmp_path / "report.md").read_text()

    def half_written(figure, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG")  # a partial file, then the disk fills up
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", half_written)
    with pytest.raises(OSError):
        main.write_report(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    for name in referenced_figures(tmp_path):
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_writes_the_report_and_prints_the_summary(tmp_path):
    write_metrics(tmp_path, [r for r in fake_results() if r["test"] in ("logit_diff", "edit_accuracy")])
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 0 and "mean LD 3.21" in result.output
    assert (tmp_path / "report.md").exists() and str(tmp_path / "report.md") in result.output


@pytest.mark.parametrize("content, problem", [("{not json", "malformed metrics.json (JSONDecodeError"),
                                              ('{"config": {}}', "malformed"),
                                              ('{"results": [{"value": 1}]}', "malformed"),
                                              ('{"config": {}, "circuit": {}, "results": [{"test": "l0"}]}', "malformed record"),
                                              ('{"results": []}', "malformed metrics.json (KeyError: 'config')")])
def test_cli_malformed_metrics(tmp_path, content, problem):
    (tmp_path / "metrics.json").write_text(content)
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "metrics.json" in message and problem in message


def test_cli_missing_metrics(tmp_path):
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "metrics.json: not found" in result.output


def drop(test, key):
    """A change to metrics.json: `key` removed from every record of `test`."""
    return lambda data: [r.pop(key, None) for r in data["results"] if r["test"] == test]


def put(test, key, value):
    """A change to metrics.json: `key` set to `value` in every record of `test`."""
    return lambda data: [r.update({key: value}) for r in data["results"] if r["test"] == test]


# Hand-edited metrics.json files a run never writes: each once ended the report in a traceback.
BROKEN = {"edit accuracy without its attribute": (drop("edit_accuracy", "attribute"), "'attribute'"),
          "alpha sweep without alpha": (drop("alpha_sweep_io_names", "alpha"), "'alpha'"),
          "histogram bin without its lower edge": (drop("logit_diff_histogram", "low"), "'low'"),
          "causal curve without its threshold": (drop("causal_keep_sufficiency", "threshold"), "'threshold'"),
          "toy loss without the ideal SAE's firing": (drop("oversplit_toy_loss", "firing"), "'firing'"),
          "a value as text": (put("l0", "value", "high"), "'value'"),
          "a value as null": (put("supervised_feature_norm", "value", None), "'value'"),
          "a setting as text": (put("occlusion_io_names", "setting", "λ=1"), "'setting'"),
          "config as a list": (lambda data: data.update(config=[1, 2]), "malformed metrics.json"),
          "results as a number": (lambda data: data.update(results=5), "malformed metrics.json"),
          "a cross-section without nodes": (lambda data: data["circuit"]["sections"][0].pop("nodes"),
                                            "'nodes'"),
          "a head's LD drop as text": (lambda data: data["circuit"]["discovery"]["heads"][0].update(
              ld_drop="big"), "malformed metrics.json (TypeError"),
          "a test named by a number": (put("l0", "test", 5), "'test'"),
          "a chosen flag as text": (put("edit_distance_k2", "chosen", "yes"), "'chosen'"),
          "a choice without its setting": (drop("edit_distance_k2", "setting"), "'setting'"),
          "an unknown field": (put("l0", "colour", "red"), "'colour'"),
          "a count that is NaN": (put("pos_latents", "value", float("nan")), "the value nan is not finite")}


@pytest.mark.parametrize("change, key", BROKEN.values(), ids=BROKEN)
def test_cli_names_the_key_a_hand_edited_metrics_file_lacks(tmp_path, change, key):
    write_metrics(tmp_path, fake_results())
    data = json.loads((tmp_path / "metrics.json").read_text())
    change(data)
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    message = result.output.strip()
    assert result.exit_code == 1 and "Traceback" not in message and len(message.splitlines()) == 1
    assert message.startswith("Error:") and "metrics.json" in message and key in message


def test_a_malformed_record_leaves_the_previous_report_and_figures_untouched(tmp_path):
    """The record is read only by a late section (its key is not among metrics.Record's required ones),
    yet nothing is written: the whole report is rendered before the first file is."""
    write_metrics(tmp_path, fake_results())
    main.write_report(str(tmp_path))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "metrics.json"}
    data = json.loads((tmp_path / "metrics.json").read_text())
    drop("alpha_sweep_s_names", "alpha")(data)
    (tmp_path / "metrics.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "malformed metrics.json (KeyError: 'alpha')" in result.output
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "metrics.json"}
    assert after == before


# Valid records whose companions are missing or undefined: each section still renders.
PARTIAL = {"S names of the α sweep but no IO names": lambda records: [
               r for r in records if r["test"] != "alpha_sweep_io_names"],
           "evidence norms without answers changed": lambda records: [
               r for r in records if r["test"] != "evidence_answers_changed"]}


@pytest.mark.parametrize("change", PARTIAL.values(), ids=PARTIAL)
def test_cli_renders_valid_records_whatever_is_missing_beside_them(tmp_path, change):
    write_metrics(tmp_path, change(fake_results()))
    result = CliRunner().invoke(main.cli, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 0 and (tmp_path / "report.md").exists(), result.output


def test_an_sae_from_elsewhere_is_listed_with_its_core_metrics(tmp_path):
    """Section 10 appears only when `grade-sae` graded an SAE: one row per site it was graded at; its core
    metrics, averaged over its nodes (here l0 7 and 9 at two nodes: 8), are a row of section 7's table."""
    theirs = {"method": "saelens:blocks.2", "setting": None}
    records = fake_results() + [
        {"test": "graded_sae", "site": "S-I out", "value": 2, "reads": "blocks.2.hook_z", "head": 1, **theirs},
        {"test": "l0", "site": "z@L2H0@end", "value": 7.0, **theirs},
        {"test": "l0", "site": "z@L2H1@end", "value": 9.0, **theirs}]
    write_metrics(tmp_path, [{k: v for k, v in r.items() if v is not None} for r in records])
    main.write_report(str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert row(tables(section(text, "## 7."))[0], method="saelens:blocks.2")["l0"] == "8.00"
    graded = row(tables(section(text, "## 10."))[0], method="saelens:blocks.2")
    assert (graded["reads"], graded["head"], graded["cross-section"], graded["nodes graded"]) == (
        "blocks.2.hook_z", "1", "S-I out", "2")
