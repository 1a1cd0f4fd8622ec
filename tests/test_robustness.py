"""Nothing silently wrong, nothing lost: bad input, killed saves and run folders.

Every command refuses bad input the same way: a non-zero exit, one line `Error: ...`, no
traceback, and not a byte written or lost. A save killed midway leaves the previous
artefact whole, and the next run gives what an uninterrupted one gives. A run folder keeps
the settings it was made with, and the circuit does not depend on --n-eval. Models are tiny
and random: what is checked here is the plumbing, not what a model has learnt.
"""
import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import benchmarks
import dictionaries
import gpt2
import ioi
import main
import metrics
from ioi import CrossSection, Node

TINY = gpt2.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2)  # GPT-2's vocabulary


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine waiting for it costs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, config=TINY):
    torch.manual_seed(seed)
    return gpt2.GPT2(config).eval()


def snapshot(root):
    """{relative path: (size, mtime, sha256)} of every file and folder under root: any write shows."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            data = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
            entries[str(path.relative_to(root))] = (path.stat().st_mtime_ns, data)
    return entries


def contents(root):
    """{relative path: bytes} of every file under root (what a rerun must reproduce)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def invoke(*args):
    return CliRunner().invoke(main.cli, [str(arg) for arg in args])


# ------------------------------------------------------------------------------ bad input

def save_variant(directory, config=TINY, change=None, text=None, weights=None):
    """A tiny saved model with one thing wrong: its config.json or its weights."""
    tiny_model(config=config).save_pretrained(directory)
    config_json = directory / "config.json"
    if change is not None:
        config_json.write_text(json.dumps({**json.loads(config_json.read_text()), **change}))
    if text is not None:
        config_json.write_text(text)
    if weights is not None:
        state = load_file(directory / "model.safetensors")
        weights(state)
        save_file(state, directory / "model.safetensors")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder with every kind of bad input file, shared by the bad-input tests (each checks
    that it stays byte for byte as it was)."""
    root = tmp_path_factory.mktemp("workspace")
    tiny_model().save_pretrained(root / "tiny")
    save_variant(root / "no-heads", change={"n_head": 0})
    save_variant(root / "heads-text", change={"n_head": "2"})
    save_variant(root / "config-list", text="[1, 2]")
    save_variant(root / "nan-weights", weights=lambda state: state["h.1.mlp.c_fc.bias"].fill_(float("nan")))
    save_variant(root / "no-config")
    os.remove(root / "no-config" / "config.json")
    save_variant(root / "small-vocab", config=replace(TINY, vocab_size=1000))
    save_variant(root / "short-context", config=replace(TINY, n_positions=8))
    (root / "a-file").write_text("not a folder")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("a user's own file")
    acts = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    labels = {"attribute.pos": torch.arange(64) % 2}
    save_file({"acts": acts, **labels}, root / "acts.safetensors")
    save_file({"acts": acts[:0], "attribute.pos": labels["attribute.pos"][:0]}, root / "no-rows.safetensors")
    save_file({"acts": acts[:, :0], **labels}, root / "no-columns.safetensors")
    save_file({"acts": acts.masked_fill(acts > 2, float("inf")), **labels}, root / "inf.safetensors")
    save_file({"acts": acts}, root / "unlabelled.safetensors")
    bound = asdict(replace(main.DEMO, weights="tiny", n_train=20, n_eval=20))
    for name, text in (("bound", json.dumps(bound)), ("corrupt", "{not json"),
                       ("not-object", "[1]"), ("bad-setting", json.dumps({**bound, "n_eval": 0}))):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
    (root / "figures-file").mkdir()
    (root / "figures-file" / "metrics.json").write_text(json.dumps({"config": {}, "circuit": {}, "results": []}))
    (root / "figures-file" / "figures").write_text("a file where the figures folder goes")
    return root


def assert_refused(workspace, monkeypatch, command, args, fragment, script=None):
    """`command` of main.py (or the click command `script`, e.g. tests/benchmarks.py) refuses `args`."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(ioi, "default_model", lambda *a, **k: pytest.fail("the embedded model was loaded"))
    before = snapshot(workspace)
    args = args.replace("{here}", workspace.as_uri()).split()
    result = CliRunner().invoke(script, args) if script else invoke(command, *args)
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output
    assert snapshot(workspace) == before  # nothing written, nothing lost


# Commands that read a model get `--weights tiny` first: a --weights in the case comes later and wins.
BAD_WEIGHTS = [("--weights nowhere", "nowhere"), ("--weights no-heads", "n_head=0"),
               ("--weights heads-text", "n_head='2'"), ("--weights config-list", "JSON object"),
               ("--weights nan-weights", "NaN or inf"), ("--weights no-config", "no config.json"),
               ("--device gpu", "'gpu' is not a device"), ("--device cuda:99", "cuda:99")]
BAD_IOI_WEIGHTS = BAD_WEIGHTS + [("--weights small-vocab", "vocabulary"),
                                  ("--weights short-context", "8 tokens")]
BAD_OUT = [("--out a-file", "is a file"), ("--out a-file/model", "a-file is a file")]
BAD_RUN = BAD_OUT + [(f"--weights tiny {args}", fragment) for args, fragment in BAD_IOI_WEIGHTS] + [
    ("--n-eval 5", "x>=10"), ("--n-train 0", "x>=10"), ("--epochs 0", "x>=1"), ("--preset huge", "huge"),
    ("--out bound --n-eval 30", "n_eval 20 -> 30"), ("--out bound --weights tiny --preset paper", "--force"),
    ("--out corrupt", "not valid JSON"), ("--out not-object", "JSON object"),
    ("--out bad-setting", "n_eval: 0 is not in the range"),
    ("--out bound --preset paper", "a preset does not keep --weights")]


@pytest.mark.parametrize("args,fragment", BAD_OUT + [
    ("--out mine", "holds other files"), ("--sha256 xyz --out new", "sha256"),
    ("--url not-a-url --out new", "not-a-url"), ("--url {here}/nowhere --out new", "nowhere"),
    ("--url {here}/no-config --out new", "config.json"),
    ("--url {here}/nan-weights --out new", "do not load"),
    ("--url {here}/small-vocab --out new", "vocabulary")])
def test_download_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "download", args, fragment)


@pytest.mark.parametrize("args,fragment", BAD_WEIGHTS + [
    ("--tokens -3", "-3"), ("--temperature nan", "nan"), ("--temperature inf", "inf"),
    ("--temperature -1", "x>=0"), ("--seed -1", "-1"), ("--weights small-vocab", "vocabulary")])
def test_generate_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "generate", f"--weights tiny {args}", fragment)


@pytest.mark.parametrize("args,fragment", [("--batch 0", "--batch"), ("--repeats 0", "--repeats"),
                                           ("--device gpu", "gpu"), ("--device cuda:99", "cuda:99")])
def test_bench_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "bench", args, fragment, benchmarks.bench)


@pytest.mark.parametrize("args,fragment", BAD_OUT + [("--out mine", "holds other files"), ("--seed -1", "--seed")])
def test_build_model_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "build-model", args, fragment)


@pytest.mark.parametrize("args,fragment", BAD_IOI_WEIGHTS + [
    ("--n 0", "--n"), ("--n -5", "-5"), ("--batch-size 0", "--batch-size"), ("--seed -1", "--seed")])
def test_ioi_eval_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "ioi-eval", f"--weights tiny {args}", fragment)


@pytest.mark.parametrize("args,fragment", [case for case in BAD_IOI_WEIGHTS if "--device" not in case[0]]
                         + [("--n 0", "--n"), ("--seed -1", "--seed")])
def test_nodes_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "nodes", f"--weights tiny {args}", fragment)


@pytest.mark.parametrize("args,fragment", [
    ("--acts nowhere.safetensors", "no such file"), ("--acts no-rows.safetensors", "at least one row"),
    ("--acts no-columns.safetensors", "one column"), ("--acts inf.safetensors", "NaN or inf"),
    ("--lr inf", "inf"), ("--lr nan", "nan"), ("--lr 0", "x>0"), ("--l1 nan", "nan"), ("--l1 -1", "x>=0"),
    ("--batch-size 0", "--batch-size"), ("--latents 0", "--latents"), ("--k 0", "--k"),
    ("--epochs 0", "--epochs"), ("--seed -1", "--seed"), ("--lr 1e30", "diverged"),
    ("--out a-file", "is a file"), ("--out a-file/sae", "a-file is a file"),
    ("--out mine", "holds other files")])
def test_train_sae_refuses_bad_input(workspace, monkeypatch, args, fragment):
    defaults = {"--acts": "acts.safetensors", "--out": "sae", "--arch": "vanilla", "--epochs": "3"}
    given = args.split()[::2]
    args = " ".join([args, "--no-progress"] + [f"{k} {v}" for k, v in defaults.items() if k not in given])
    assert_refused(workspace, monkeypatch, "train-sae", args, fragment)


@pytest.mark.parametrize("command", ["collect", "supervised", "train-saes", "run"])
@pytest.mark.parametrize("args,fragment", BAD_RUN)
def test_pipeline_steps_refuse_bad_input(workspace, monkeypatch, command, args, fragment):
    args = args if "--out" in args else f"--out new --n-train 10 --n-eval 10 {args}"  # few prompts: quick
    assert_refused(workspace, monkeypatch, command, args, fragment)


@pytest.mark.parametrize("args,fragment", BAD_OUT + [("--out bound", "weights 'tiny' -> None"),
                                                     ("--out corrupt", "not valid JSON")])
def test_demo_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "demo", args, fragment)


@pytest.mark.parametrize("args,fragment", [("--out a-file", "is a file"), ("--out nowhere", "not found"),
                                           ("--out bound", "metrics.json: not found"),
                                           ("--out figures-file", "figures-file/figures:")])
def test_report_refuses_bad_input(workspace, monkeypatch, args, fragment):
    assert_refused(workspace, monkeypatch, "report", args, fragment)


@pytest.mark.parametrize("change", [{"n_head": 0}, {"n_head": "12"}, {"n_layer": -1}, {"n_embd": 7.5},
                                    {"vocab_size": True}, {"layer_norm_epsilon": float("nan")}])
def test_model_configs_are_checked(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        gpt2.GPT2Config.from_hf_dict({**gpt2.GPT2Config().to_hf_dict(), **change})


# ------------------------------------------------------------------------------ killed saves

class Killed(BaseException):
    """Stands for a kill: not an Exception, so no `except Exception` can swallow it."""


def kill_on_call(monkeypatch, module, name, call):
    """Make module.name raise Killed on its `call`-th call (1-based), after the earlier ones ran."""
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise Killed(f"killed in {name}")
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


def hard_kill(monkeypatch):
    """A SIGKILL runs no clean-up: the temporary folder stays where the save left it."""
    monkeypatch.setattr(main, "recover_interrupted_save", lambda path: None)


def train_stack(run_folder, l1):
    """main.train_or_load_stack of a tiny stack (two nodes), where a run in `run_folder` keeps it."""
    datasets = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    specs = [dictionaries.SAESpec("vanilla", i, l1_coefficient=l1, seed=i, name=f"l1{l1}/node{i}") for i in range(2)]
    config = dictionaries.TrainConfig(d_sae=16, epochs=2)
    return main.train_or_load_stack(os.path.join(run_folder, "saes", "vanilla"), datasets, specs, config)


@pytest.mark.parametrize("hard", [False, True])
def test_killed_stack_save_never_mixes_old_and_new_saes(tmp_path, monkeypatch, hard):
    old_stack, new_stack, stack = tmp_path / "old", tmp_path / "new", Path("saes", "vanilla")
    train_stack(old_stack, l1=1.0)
    train_stack(new_stack, l1=5.0)                        # what an uninterrupted run saves
    before = contents(old_stack / stack)
    with monkeypatch.context() as patch:
        # the stack is one group: saved in saes/vanilla.parts (calls 1, 2), then in saes/vanilla (3, 4)
        kill_on_call(patch, dictionaries, "save_sae", call=4)  # between the two SAEs of the stack
        if hard:
            hard_kill(patch)
        with pytest.raises(Killed):
            train_stack(old_stack, l1=5.0)
    assert contents(old_stack / stack) == before          # the old stack is whole: no new SAE beside it
    assert (old_stack / "saes" / "vanilla.tmp").exists() == hard
    main.recover_interrupted_saves(old_stack)             # what the next run does first
    assert sorted(os.listdir(old_stack / "saes")) == ["vanilla", "vanilla.parts"]  # the group trained stays
    with monkeypatch.context() as patch:                  # the old settings still load the old stack
        patch.setattr(dictionaries, "train_sae_stack", lambda *args, **kwargs: pytest.fail("retrained"))
        train_stack(old_stack, l1=1.0)
    train_stack(old_stack, l1=5.0)
    assert contents(old_stack / stack) == contents(new_stack / stack)


def test_a_stack_killed_after_its_first_group_resumes_with_the_second(tmp_path, monkeypatch):
    """A stack of two SAEs trained one at a time (group 1): a run killed while training the
    second keeps the first, and the resumed run trains only the second, to the same SAEs."""
    datasets = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    specs = [dictionaries.SAESpec("vanilla", i, seed=i, name=f"node{i}") for i in range(2)]
    config = dictionaries.TrainConfig(d_sae=16, epochs=2)
    main.train_or_load_stack(str(tmp_path / "whole"), datasets, specs, config, group=1)
    folder, trained = str(tmp_path / "run" / "vanilla"), []
    with monkeypatch.context() as patch:
        kill_on_call(patch, dictionaries, "train_sae_stack", call=2)
        with pytest.raises(Killed):
            main.train_or_load_stack(folder, datasets, specs, config, group=1)
    assert not os.path.exists(folder) and os.listdir(f"{folder}.parts") == ["0"]
    train = dictionaries.train_sae_stack
    monkeypatch.setattr(dictionaries, "train_sae_stack", lambda data, group, *args, **kwargs:
                        trained.append(group) or train(data, group, *args, **kwargs))
    _, logs = main.train_or_load_stack(folder, datasets, specs, config, group=1)
    assert trained == [specs[1:]] and [log["sae"] for log in logs if log["epoch"] == 2] == [0, 1]
    assert contents(folder) == contents(tmp_path / "whole") and not os.path.exists(f"{folder}.parts")


def test_killed_between_the_two_renames_keeps_the_old_version(tmp_path):
    folder = tmp_path / "run" / "saes" / "vanilla"
    train_stack(tmp_path / "run", l1=1.0)
    before = contents(folder)
    os.rename(folder, f"{folder}.old")                     # moved aside, the new one not yet renamed in
    os.makedirs(f"{folder}.tmp/l15.0")
    (tmp_path / "run" / "metrics.json.tmp").write_text("half a fi")  # and a file save cut short
    main.recover_interrupted_saves(tmp_path / "run")
    assert contents(folder) == before
    assert sorted(os.listdir(tmp_path / "run")) == ["saes"] and os.listdir(folder.parent) == ["vanilla"]


def build_model(out, seed):
    """`main.py build-model` with a tiny stand-in for the embedded model (saving is what is tested);
    a Killed raised inside propagates, as a kill would end the process."""
    result = CliRunner().invoke(main.cli, ["build-model", "--out", out, "--seed", str(seed)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("hard", [False, True])
def test_killed_model_save_leaves_the_old_model(tmp_path, monkeypatch, hard):
    monkeypatch.setattr(ioi, "build_ioi_model", lambda config: tiny_model(seed=config.seed))
    monkeypatch.setattr(ioi, "held_out_prompts", lambda n: ioi.eval_prompts(8, seed=2))  # scored on 8 prompts
    monkeypatch.chdir(tmp_path)
    build_model("uninterrupted", seed=2)
    build_model("model", seed=1)
    before = contents(tmp_path / "model")
    with monkeypatch.context() as patch:
        kill_on_call(patch, main, "write_json", call=1)     # after the weights and config.json
        if hard:
            hard_kill(patch)
        with pytest.raises(Killed):
            build_model("model", seed=2)
    assert contents(tmp_path / "model") == before          # the old completion marker beside the old weights
    assert os.path.exists("model.tmp") == hard
    build_model("model", seed=2)
    assert sorted(os.listdir(tmp_path)) == ["model", "uninterrupted"]
    assert contents(tmp_path / "model") == contents(tmp_path / "uninterrupted")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two different models served from folders, as a hub would serve them, and one that does not load."""
    root = tmp_path_factory.mktemp("hub")
    for seed in (1, 2):
        tiny_model(seed).save_pretrained(root / f"model{seed}")
    tiny_model().save_pretrained(root / "broken")
    (root / "broken" / "model.safetensors").write_bytes(b"<html>not a model</html>")
    return root


@pytest.mark.parametrize("hard", [False, True])
def test_killed_download_keeps_the_model_in_out(hub, tmp_path, monkeypatch, hard):
    out = tmp_path / "gpt2"
    assert invoke("download", "--url", (hub / "model1").as_uri(), "--out", out).exit_code == 0
    with monkeypatch.context() as patch:
        kill_on_call(patch, main, "_fetch", call=2)         # config.json fetched, model.safetensors not
        if hard:
            hard_kill(patch)
        with pytest.raises(Killed):
            CliRunner().invoke(main.cli, ["download", "--url", (hub / "model2").as_uri(), "--out", str(out)],
                               catch_exceptions=False)
    assert contents(out) == contents(hub / "model1") and (tmp_path / "gpt2.tmp").exists() == hard
    for source in ("nowhere", "broken"):                    # a failed download costs nothing either
        assert invoke("download", "--url", (hub / source).as_uri(), "--out", out).exit_code == 1
        assert contents(out) == contents(hub / "model1")
    assert invoke("download", "--url", (hub / "model2").as_uri(), "--out", out).exit_code == 0
    assert contents(out) == contents(hub / "model2") and os.listdir(tmp_path) == ["gpt2"]


# ------------------------------------------------------------------------------ run folders

SECTIONS = [CrossSection("(B)NM out", (Node("z", 1, 0, "end"),), ("io", "pos"))]


@pytest.fixture
def run_folder(tmp_path, monkeypatch):
    """A working folder with the tiny model, a fixed circuit (discovery has its own test) and
    a guard against loading the embedded model."""
    monkeypatch.chdir(tmp_path)
    tiny_model().save_pretrained("tiny")
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda *a: (SECTIONS, {"heads": [], "sections": []}))
    monkeypatch.setattr(ioi, "default_model", lambda *a, **k: pytest.fail("the embedded model was loaded"))
    return tmp_path


def collect(*args):
    result = invoke("collect", "--out", "run", *args)
    assert result.exit_code == 0, result.output
    return json.loads(Path("run", "config.json").read_text())


def test_a_run_folder_keeps_its_settings(run_folder):
    made = collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20)
    paper = json.loads(json.dumps(asdict(main.RunConfig())))  # (tuples become lists)
    assert made == {**paper, "weights": "tiny", "n_train": 20, "n_eval": 20}  # weights: the paper's preset
    assert collect() == made                                   # no settings: the saved ones, the same weights
    assert collect("--n-eval", 20, "--device", "cpu") == made  # the same settings: fine
    refused = invoke("collect", "--out", "run", "--n-eval", 30)
    assert refused.exit_code == 1 and "n_eval 20 -> 30" in refused.output and "--force" in refused.output
    assert json.loads(Path("run", "config.json").read_text()) == made
    assert collect("--n-eval", 30, "--force") == {**made, "n_eval": 30}
    assert collect()["n_eval"] == 30


def test_a_failed_start_leaves_config_json_alone(run_folder, monkeypatch):
    collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20)
    before = Path("run", "config.json").read_bytes()
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda *args: ([], {"heads": [], "sections": []}))
    for folder, args in (("run", ["--n-eval", 30, "--force"]), ("fresh", ["--weights", "tiny"])):
        result = invoke("collect", "--out", folder, "--n-train", 20, *args)
        assert result.exit_code == 1 and "no cross-section found" in result.output
    assert Path("run", "config.json").read_bytes() == before and not Path("fresh", "config.json").exists()


def test_a_corrupt_config_json_is_reported_and_kept(run_folder):
    Path("run").mkdir()
    Path("run", "config.json").write_text('{"n_train": 20')
    result = invoke("collect", "--out", "run", "--weights", "tiny")
    assert result.exit_code == 1 and "run/config.json: not valid JSON" in result.output
    assert Path("run", "config.json").read_text() == '{"n_train": 20'
    assert collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20, "--force")["n_train"] == 20


def test_a_run_removes_what_killed_saves_left(run_folder):
    collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20)
    leftovers = [Path("run", "activations", "0123abcd.tmp"),
                 Path("run", "saes", "topk.tmp"), Path("run", "metrics.json.tmp")]
    for leftover in leftovers:
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"cut short")
    collect()
    assert not any(leftover.exists() for leftover in leftovers)


def test_force_replaces_a_bad_config_json_and_never_guesses_the_model(run_folder):
    """--force on a config.json with a bad value replaces it wholesale by the preset and the options
    given (no saved setting is kept); a bad or missing model is never guessed."""
    made = collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20, "--force")
    config = Path("run", "config.json")
    for change, message in (({"edit_k": "x", "seed": 7}, "edit_k: 'x' is not a non-empty list"),
                            ({"seed": 1.5}, "seed: 1.5 is not an integer"),
                            ({"colour": "red"}, "unknown setting colour")):
        config.write_text(json.dumps({**made, **change}))
        refused = invoke("collect", "--out", "run", "--n-train", 10, "--n-eval", 10)
        lines = refused.output.strip().splitlines()
        assert refused.exit_code == 1 and len(lines) == 1 and message in lines[0] and "--force" in lines[0]
    for weights in (5, None):  # a bad model, or none saved: --force refuses without --weights or --preset
        broken = {key: value for key, value in {**made, "weights": weights}.items() if value is not None}
        config.write_text(json.dumps(broken))
        refused = invoke("collect", "--out", "run", "--force")
        assert refused.exit_code == 1 and "give --weights" in refused.output
        assert json.loads(config.read_text()) == broken
    forced = collect("--force", "--weights", "tiny", "--n-train", 10, "--n-eval", 10)
    paper = json.loads(json.dumps(asdict(main.RunConfig())))
    assert forced == {**paper, "weights": "tiny", "n_train": 10, "n_eval": 10}  # seed 7 is not kept


def test_skip_sections_must_name_the_papers_cross_sections(run_folder):
    made = collect("--weights", "tiny", "--n-train", 20, "--n-eval", 20)
    Path("run", "config.json").write_text(json.dumps({**made, "skip_sections": ["(B)NM out", "S-I vv"]}))
    result = invoke("collect", "--out", "run")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "skip_sections: 'S-I vv' is not one of" in lines[0]


def test_a_value_error_on_the_way_is_one_line(workspace, monkeypatch):
    """A ValueError (a record that is not finite, an SAE that cannot be saved) ends as `Error: ...`."""
    message = "sufficiency at (B)NM out (vanilla): the value nan is not finite"
    monkeypatch.setattr(dictionaries, "save_sae", lambda *args: (_ for _ in ()).throw(ValueError(message)))
    assert_refused(workspace, monkeypatch, "train-sae", "--acts acts.safetensors --arch vanilla --epochs 1 "
                   "--latents 4 --out sae --no-progress", message)


def test_the_circuit_does_not_depend_on_n_eval(tmp_path, monkeypatch):
    """Discovery runs on its own fixed prompts, so two runs that differ only in --n-eval grade
    the same circuit (found here by the real `discover` on a tiny model)."""
    monkeypatch.chdir(tmp_path)
    tiny_model().save_pretrained("tiny")
    seen, discover = [], ioi.circuit_cross_sections
    monkeypatch.setattr(ioi, "circuit_cross_sections", lambda model, prompts, *args: seen.append(
        [p.text for p in prompts]) or discover(model, prompts, *args))
    outputs = []
    for n_eval in (20, 30):
        result = invoke("collect", "--out", f"run{n_eval}", "--weights", "tiny", "--n-train", 20,
                        "--n-eval", n_eval)
        assert result.exit_code == 0, result.output
        outputs.append(result.output.replace(f"run{n_eval}", "run"))
    assert seen[0] == seen[1] == [p.text for p in main.discovery_prompts()]
    assert outputs[0] == outputs[1]
    metrics = [json.loads(Path(f"run{n}", "config.json").read_text())["n_eval"] for n in (20, 30)]
    assert metrics == [20, 30]


# ------------------------------------------------------------ SAEs from elsewhere, non-finite values

D_IN, D_SAE = 16, 8  # one head of TINY reads 16 values


def sae_folder(directory, arch="standard", change=None, text=None, weights=None):
    """A SAELens 6 folder (an SAE over z@L1H0 of TINY), one thing changed in cfg.json or its weights."""
    g = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.zeros(D_SAE),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    if arch == "jumprelu":
        tensors["threshold"] = torch.ones(D_SAE)
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "k": 3 if arch == "topk" else None,
           "metadata": {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 0}}
    for key, value in (change or {}).items():  # "metadata.x" changes cfg["metadata"]["x"]
        table, _, name = key.rpartition(".")
        (cfg["metadata"] if table else cfg)[name] = value
    (weights or (lambda t: None))(tensors)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "sae_weights.safetensors")
    (directory / "cfg.json").write_text(text if text is not None else json.dumps(cfg))
    return directory


def nan_at(name, index=0):
    return lambda tensors: tensors[name].view(-1)[index].fill_(float("nan"))


# (folder, how it is made, what the one line says): the file, the field and the value
BAD_SAES = [
    ("cfg-list", dict(text="[1, 2]"), "cfg.json: expected a JSON object of settings, got list"),
    ("cfg-string", dict(text='"sae"'), "cfg.json: expected a JSON object of settings, got str"),
    ("head-string", dict(change={"metadata.hook_head_index": "0"}), "cfg.json: hook_head_index='0'"),
    ("head-bool", dict(change={"metadata.hook_head_index": True}), "cfg.json: hook_head_index=True"),
    ("k-above-d_sae", dict(arch="topk", change={"k": 9}),
     "cfg.json: k=9 is not supported (an integer in [1, d_sae=8])"),
    ("k-negative", dict(arch="topk", change={"k": -1}), "cfg.json: k=-1"),
    ("k-zero", dict(arch="topk", change={"k": 0}), "cfg.json: k=0"),
    ("k-fraction", dict(arch="topk", change={"k": 2.7}), "cfg.json: k=2.7"),
    ("k-text", dict(arch="topk", change={"k": "3"}), "cfg.json: k='3'"),
    ("b_enc-shape", dict(weights=lambda t: t.update(b_enc=torch.zeros(D_SAE + 1))),
     "sae_weights.safetensors: b_enc has shape (9,), not (8,)"),
    ("threshold-shape", dict(arch="jumprelu", weights=lambda t: t.update(threshold=torch.ones(3))),
     "sae_weights.safetensors: threshold has shape (3,), not (8,)"),
    ("nan-W_dec", dict(weights=nan_at("W_dec")), "sae_weights.safetensors: W_dec holds NaN or inf"),
    ("nan-threshold", dict(arch="jumprelu", weights=nan_at("threshold", 3)), "threshold holds NaN or inf"),
    ("scale-0", dict(change={"input_scale": 0}), "cfg.json: input_scale=0 is not supported"),
    ("scale-negative", dict(change={"input_scale": -1}), "cfg.json: input_scale=-1"),
    ("scale-text", dict(change={"input_scale": "abc"}), "cfg.json: input_scale='abc'"),
    ("scale-overflows", dict(change={"input_scale": 1e38}, weights=lambda t: t["W_enc"].mul_(100)),
     "cfg.json: input_scale=1e+38 folded into the weights: W_enc holds NaN or inf"),
    ("flag-no", dict(change={"apply_b_dec_to_input": "no"}), "cfg.json: apply_b_dec_to_input='no'"),
    ("flag-false-text", dict(change={"frozen_decoder": "false"}), "cfg.json: frozen_decoder='false'"),
    ("model-flag-text", dict(change={"metadata.model_from_pretrained_kwargs": {"fold_ln": "false"}}),
     "cfg.json: fold_ln='false'"),
    ("d_in-text", dict(change={"d_in": "16"}), "cfg.json: d_in='16' is not supported (an integer > 0)"),
    ("metadata-text", dict(change={"metadata": "x"}), "cfg.json: metadata='x' is not supported"),
]


@pytest.fixture(scope="module")
def bad_saes(workspace):
    for name, how, _ in BAD_SAES:
        sae_folder(workspace / "saes" / name, **how)
    save_file({"acts": 1e30 * torch.randn(64, 8)}, workspace / "huge.safetensors")
    save_file({"acts": torch.zeros(64, 8)}, workspace / "zeros.safetensors")
    return workspace


@pytest.mark.parametrize("name,how,fragment", BAD_SAES, ids=[case[0] for case in BAD_SAES])
def test_grade_sae_refuses_each_bad_sae_folder_in_one_line(bad_saes, monkeypatch, name, how, fragment):
    assert_refused(bad_saes, monkeypatch, "grade-sae", f"--sae saes/{name} --out run", f"saes/{name}/")
    with pytest.raises(ValueError) as error:
        dictionaries.load_sae(bad_saes / "saes" / name)
    assert fragment in str(error.value), str(error.value)


def test_a_good_folder_of_the_same_making_loads(tmp_path):
    """The bad folders differ from this one by their defect only."""
    for arch in ("standard", "topk", "jumprelu"):
        sae = dictionaries.load_sae(sae_folder(tmp_path / arch, arch))
        assert sae.meta["hook_head_index"] == 0 and sae.d_in == D_IN
        assert sae.k == (3 if arch == "topk" else None)


@pytest.mark.parametrize("args,fragment", [
    ("--acts huge.safetensors", "dataset 0: values up to"), ("--acts zeros.safetensors", "every row is 0"),
    ("--acts mine", "mine: a folder, not a file")])
def test_train_sae_names_the_real_cause(bad_saes, monkeypatch, args, fragment):
    """Huge activations once gave an SAE with an inf decoder; all-zero ones blamed the learning rate."""
    assert_refused(bad_saes, monkeypatch, "train-sae", f"{args} --arch vanilla --epochs 3 --out sae "
                   "--no-progress", fragment)


def test_save_sae_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    params = {"W_enc": torch.randn(4, 6, generator=g), "W_dec": torch.randn(6, 4, generator=g),
              "b_enc": torch.zeros(6), "b_dec": torch.ones(4)}
    with pytest.raises(ValueError, match="SAE not saved: W_dec, b_dec hold NaN or inf"):
        dictionaries.save_sae(dictionaries.SAE("vanilla", **params, input_scale=0.0), tmp_path / "zero-scale")
    params["b_enc"][2] = float("inf")
    with pytest.raises(ValueError, match="SAE not saved: b_enc holds NaN or inf"):
        dictionaries.save_sae(dictionaries.SAE("vanilla", **params), tmp_path / "inf-bias")
    assert list(tmp_path.iterdir()) == []


def poisoned(monkeypatch, epoch, sae, where):
    """Make SAE `sae`'s loss (where="loss") or a weight (where="weight") NaN at the end of `epoch`."""
    train_epoch, calls = dictionaries._train_epoch, []

    def wrapper(stack, *args):
        loss = train_epoch(stack, *args)
        calls.append(None)
        if len(calls) == epoch and where == "loss":
            loss[sae] = float("nan")
        if len(calls) == epoch and where == "weight":
            with torch.no_grad():
                stack.b_enc[sae, 0, 5] = float("nan")
        return loss
    monkeypatch.setattr(dictionaries, "_train_epoch", wrapper)


@pytest.mark.parametrize("where", ["loss", "weight"])
def test_training_that_goes_non_finite_stops_naming_the_sae_and_the_epoch(monkeypatch, where):
    specs = [dictionaries.SAESpec("vanilla", seed=s, name=f"sae{s}") for s in range(3)]
    poisoned(monkeypatch, epoch=3, sae=1, where=where)
    with pytest.raises(ValueError) as error:  # epoch 3: the last epoch, so a statistics pass sees the weight
        dictionaries.train_sae_stack(torch.randn(1, 64, 8), specs,
                                     dictionaries.TrainConfig(d_sae=16, epochs=3))
    message = str(error.value)
    assert f"diverged (NaN or inf) at epoch 3 in {specs[1]}" in message and "\n" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), torch.tensor(float("nan"))])
def test_a_record_of_a_non_finite_value_is_refused_where_it_is_made(value):
    with pytest.raises(ValueError, match=r"^sufficiency at \(B\)NM out \(sae:x\): the value (nan|-?inf) is"):
        metrics.Record("sufficiency", "(B)NM out", "sae:x", value)


def test_variance_explained_of_activations_that_never_vary_is_not_recorded():
    x = torch.ones(5, 3)  # Σ‖x - mean(x)‖² = 0: FVE is 0/0
    scores = dictionaries.core_metrics(x, x + 1, torch.ones(4))
    assert scores["fve"] is None and scores["mse"] == 1.0
    sae = dictionaries.SAE("vanilla", W_enc=torch.eye(3), W_dec=torch.eye(3), b_enc=torch.zeros(3),
                           b_dec=torch.zeros(3))
    at_node = metrics.SAEAtNode(sae, x, {})
    records = metrics.core_records({"vanilla": {None: {"z@L0H0@end": at_node}}}, {"z@L0H0@end": x}, {})
    assert {r.test for r in records} == {"l0", "mse", "dead_fraction"}
