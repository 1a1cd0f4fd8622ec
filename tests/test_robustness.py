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
    (root / "figures-file" / "metrics.json").write_text(json.dumps({"config": {}, "results": []}))
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
    ("--out bad-setting", "n_eval: 0 is not in the range")]


@pytest.mark.parametrize("args,fragment", BAD_OUT + [
    ("--out mine", "holds other files"), ("--sha256 xyz --out new", "sha256"),
    ("--url not-a-url --out new", "not-a-url"), ("--url {here}/nowhere --out new", "nowhere"),
    ("--url {here}/no-config --out new", "config.json"),
    ("--url {here}/nan-weights --out new", "do not load")])
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
        kill_on_call(patch, dictionaries, "save_sae", call=2)  # between the two SAEs of the stack
        if hard:
            hard_kill(patch)
        with pytest.raises(Killed):
            train_stack(old_stack, l1=5.0)
    assert contents(old_stack / stack) == before          # the old stack is whole: no new SAE beside it
    assert (old_stack / "saes" / "vanilla.tmp").exists() == hard
    main.recover_interrupted_saves(old_stack)             # what the next run does first
    assert sorted(os.listdir(old_stack / "saes")) == ["vanilla"]
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
