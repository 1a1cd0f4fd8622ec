"""Command-line interface: the whole paper (`demo`, `run`), its steps, and single tools.

Makelov, Lange & Nanda (arXiv 2405.08366): grade SAEs against supervised dictionaries on IOI. Read top
to bottom: `demo` and `run`; the pipeline (`open_run`, `Run`, `evaluate_run`); the step commands; the
single tools; the report; the plumbing that makes every step resumable (`cached`, `atomic_folder`).
"""
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import click
import numpy as np
import torch
from safetensors.torch import load_file

import dictionaries
import gpt2
import ioi
import metrics


class OneLineErrors(click.Group):
    """A bad option, an unreadable path (OSError) or a wrong file or result (ValueError) ends as one line
    `Error: ...` and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            one_line = click.ClickException(error.format_message())
            one_line.exit_code = error.exit_code
            raise one_line from None
        except OSError as error:
            names = " -> ".join(name for name in (error.filename, error.filename2) if name is not None)
            raise click.ClickException(f"{names}: {error.strerror}" if names else str(error)) from None
        except ValueError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=OneLineErrors)
def cli():
    """Grade sparse autoencoders against supervised dictionaries on IOI (arXiv 2405.08366)."""


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through)."""
    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def usable_device(ctx, param, value):
    """click callback for --device: a device torch can compute on, on this machine."""
    try:
        torch.empty(0, device=value)
    except (RuntimeError, AssertionError):  # not a device name, or none of this machine (no CUDA: an assert)
        raise click.BadParameter(f"{value!r} is not a device of this machine (cpu, cuda, cuda:N or mps)",
                                 ctx, param) from None
    return value


SEED, POSITIVE = click.IntRange(0, 2**32 - 1), click.IntRange(min=1)  # numpy refuses negative seeds
DEVICE_OPTION = click.option("--device", callback=usable_device, default="cpu", show_default=True,
                             help="cpu, cuda, cuda:N or mps.")
WEIGHTS_OPTION = click.option("--weights", help="GPT-2 checkpoint (dir or .safetensors); "
                                                "default: the embedded IOI model.")
FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Rebind a run folder made with other settings to these (caches are kept).")


def output_folder(marker=None):
    """click callback for --out: a writable folder; a non-empty one must hold `marker`, the completion file
    of the same artefact, since a save replaces the whole folder (`atomic_folder`): a user's files stay."""
    def check(ctx, param, value):
        path = parent = os.path.abspath(value)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise click.BadParameter(f"{value} cannot be written: {parent} is a file", ctx, param)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise click.BadParameter(f"{parent} is not writable", ctx, param)
        if marker and parent == path and os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
            raise click.BadParameter(f"{value} holds other files (no {marker}): choose a new or empty folder",
                                     ctx, param)
        return value
    return check


# How each setting of a run is checked (`RunConfig.__post_init__`), an option and config.json alike; any
# other setting: an integer >= 1.
SETTINGS = {"n_train": click.IntRange(min=10), "n_eval": click.IntRange(min=10), "seed": SEED,
            **dict.fromkeys(("sae_lr", "corpus_lr"), FiniteFloat(min=0, min_open=True)),
            "sae_plateau": FiniteFloat(min=0, max=1), "occlusion_alphas": FiniteFloat(),
            "f1_thresholds": FiniteFloat(), "sae_resamples": click.IntRange(min=0),
            **dict.fromkeys(("vanilla_l1", "gated_l1", "corpus_l1"), FiniteFloat(min=0)),
            **dict.fromkeys(("weights", "corpus", "device"), click.STRING),  # skip_sections: README §3's six
            "skip_sections": click.Choice([s.name for s in ioi.cross_sections(*[[(0, 0)]] * 3)])}


def run_options(function):
    """The options of every pipeline step: the keyword arguments of `open_run`."""
    options = [click.option("--out", default="runs/demo", show_default=True, callback=output_folder(),
                            help="Run folder (created if needed)."), WEIGHTS_OPTION,
               click.option("--preset", type=click.Choice(["demo", "laptop", "paper"]),
                            help="Settings: demo (minutes on a CPU), laptop (GPT-2 Small within the "
                                 "hour) or the paper's. Default: demo for the embedded model, else paper."),
               DEVICE_OPTION, click.option("--n-train", type=int, help="Training prompts."),
               click.option("--n-eval", type=int, help="Evaluation prompts."),
               click.option("--epochs", type=int, help="SAE training epochs."), FORCE_OPTION]
    for option in reversed(options):
        function = option(function)
    return function


# === the whole paper: demo and run ===

@cli.command()
@click.option("--out", default="runs/demo", show_default=True, callback=output_folder(), help="Run folder.")
@FORCE_OPTION
def demo(out, force):
    """The whole paper on the embedded small IOI model, scaled to minutes on a CPU."""
    evaluate_and_report(open_run(out, preset="demo", force=force, eta=True))


@cli.command("run")
@run_options
def run_command(**options):
    """Step 4, the whole paper -> metrics.json and report.md (steps 1-3 run, or load from the folder's
    caches). GPT-2 Small via --weights."""
    evaluate_and_report(open_run(**options, eta=True))


# === the pipeline: a run folder, its settings, its steps ===

ARCHS = ("vanilla", "gated", "topk")
DISCOVERY_N, DISCOVERY_SEED = 200, 1000  # a circuit is found on prompts of its own: not on --n-eval, --seed
SAES_PER_PROGRAM = 4  # SAEs trained as one tensor program: 2 to 4 was the fastest of 1..24 on 2 CPU cores


@dataclass
class RunConfig:
    """Every setting of one run, saved as config.json in the run folder. Defaults are the paper's
    (README §2 and §8, revised version); `DEMO` scales them down to minutes on two CPU cores."""
    weights: Optional[str] = None     # a GPT-2 checkpoint; None: the embedded small IOI model
    n_train: int = 20_000             # prompts for dictionaries and SAEs (all names)
    n_eval: int = 5_000               # evaluation prompts (first half of the names)
    seed: int = 0
    d_sae: int = 512
    epochs: int = 2000                # the paper's length; here a cap: SAEs train until they converge
    sae_plateau: float = 0.01         # converged: loss improves < 1% over the last 10% of epochs (0: no stop)
    sae_lr: float = 3e-4              # Adam learning rate (v1 of the paper: 1e-3)
    sae_resamples: int = 4            # dead-latent resamplings (vanilla, gated), at the first plateaus
    vanilla_l1: tuple = (0.5, 1.0, 2.5, 5.0)
    gated_l1: tuple = (0.5, 1.0, 2.5, 5.0)
    topk_k: tuple = (3, 6, 12, 24)
    edit_k: tuple = (2, 4, 8, 16)     # latents an SAE edit may change
    corpus: Optional[str] = None      # .txt / .jsonl for full-distribution SAEs; None: pydoc prose
    corpus_tokens: int = 250_000
    corpus_d_sae: int = 2048
    corpus_epochs: int = 20
    corpus_lr: float = 3e-4           # a fixed number of epochs: no convergence check, so the paper's rate
    corpus_l1: float = 1.0
    corpus_k: int = 6
    occlusion_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    f1_thresholds: tuple = (0.0, 0.2, 0.4, 0.6, 0.8)
    skip_sections: tuple = ()         # cross-sections found but not graded (and not trained on), by name
    batch_size: int = 256
    device: str = "cpu"

    def __post_init__(self):
        """Each setting checked by its `SETTINGS` type, from an option, a preset or config.json alike. JSON
        has types, so nothing is coerced (click alone would take "12", 12.7 or true for an integer)."""
        for field in fields(self):
            value, kind = getattr(self, field.name), SETTINGS.get(field.name, POSITIVE)
            if value is None and field.default is None:  # weights, corpus: the embedded model, pydoc prose
                continue
            many = isinstance(field.default, tuple)
            if many and not (isinstance(value, (list, tuple)) and (value or not field.default)):
                raise ValueError(f"{field.name}: {value!r} is not a {'non-empty ' * bool(field.default)}list")
            json_type, checked = {click.IntRange: int, FiniteFloat: (int, float)}.get(type(kind), str), []
            for item in value if many else [value]:
                if isinstance(item, bool) or not isinstance(item, json_type):
                    what = {int: "an integer", str: "a string"}.get(json_type, "a number")
                    raise ValueError(f"{field.name}: {item!r} is not {what}")
                try:
                    checked.append(kind.convert(item, None, None))
                except click.BadParameter as error:
                    raise ValueError(f"{field.name}: {error.message}") from None
            setattr(self, field.name, tuple(checked) if many else checked[0])
        if max(self.topk_k) > self.d_sae or self.corpus_k > self.corpus_d_sae:
            raise ValueError("topk_k, corpus_k: a top-k SAE's k exceeds its number of latents")


def read_config(path):
    """The RunConfig a run folder's config.json holds: a JSON object of every setting, each checked."""
    try:
        saved = read_json(path)
    except ValueError as error:  # malformed JSON, or not text
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"expected a JSON object of settings, got {type(saved).__name__}")
    names = [field.name for field in fields(RunConfig)]
    wrong = ([f"unknown setting {name}" for name in saved if name not in names]
             + [f"missing setting {name}" for name in names if name not in saved])
    if wrong:
        raise ValueError("; ".join(wrong))
    return RunConfig(**saved)


# The demo: one setting per architecture, SAEs trained to convergence (README, "Commands").
# At lr 1e-2 with one resampling, SAEs of the embedded model converge 3-4x sooner than at 3e-3 with
# four, and to a lower loss. (B)NM qk is skipped: on this model it is uninformative (the keys'
# positions move with the patch, so no-intervention edit accuracy is 1.00) and holds half the nodes.
DEMO = RunConfig(n_train=5_000, n_eval=500, epochs=1000, sae_lr=1e-2, sae_resamples=1, vanilla_l1=(1.0,),
                 gated_l1=(1.0,), topk_k=(3,), edit_k=(2, 4, 8), corpus_tokens=20_000, corpus_d_sae=512,
                 corpus_epochs=10, corpus_lr=3e-3, skip_sections=("(B)NM qk",))
# GPT-2 Small within the hour on two cores (README, "Commands"): the paper's six cross-sections, the
# demo's one setting per architecture and training recipe, fewer prompts, SAE edits of k = 2 and 4.
LAPTOP = replace(DEMO, n_train=2_000, n_eval=200, epochs=150, corpus_epochs=5, edit_k=(2, 4),
                 skip_sections=())
PRESETS = {"demo": DEMO, "laptop": LAPTOP, "paper": RunConfig()}


def open_run(out, weights=None, preset=None, device="cpu", force=False, circuit=None, eta=False,
             **overrides):
    """The run in `out`, bound to its config.json (else to `preset`: demo for the embedded model, paper
    for real weights) and the settings given; other settings need `force`, which never guesses the model."""
    recover_interrupted_saves(out)
    path = os.path.join(out, "config.json")
    given = {name: value for name, value in dict(overrides, weights=weights).items() if value is not None}
    saved, problem = None, None
    try:
        saved = read_config(path) if os.path.exists(path) else None
    except ValueError as error:
        problem = f"{path}: {error}"
    if problem and not (force and (preset or "weights" in given)):
        raise ValueError(f"{problem} (" + ("--force does not guess the folder's model: give --weights or "
                                           "--preset)" if force else "--force replaces it)"))
    if problem:  # (with --force) replaced wholesale by the preset and the options given
        click.echo(f"{problem}: replaced")
    default = "demo" if given.get("weights") is None else "paper"
    config = replace(saved if saved and not preset else PRESETS[preset or default], **given, device=device)
    changed = [f"{name} {value!r} -> {getattr(config, name)!r}" for name, value in asdict(saved).items()
               if name != "device" and value != getattr(config, name)] if saved else []
    if changed and not force:
        more = f"; {len(changed) - 3} more" if len(changed) > 3 else ""
        dropped = (" (a preset does not keep --weights: give it again)"
                   if "weights" not in given and config.weights != saved.weights else "")
        raise ValueError(f"{path} holds other settings ({'; '.join(changed[:3])}{more}){dropped}: "
                         "add --force to rebind the folder to these, or choose a new --out")
    if changed:  # (with --force) never silently: the model above all
        click.echo(f"{path}: rebound, {'; '.join(changed)}")
    return Run(out, config, circuit, eta)


class Run:
    """One run folder, each step cached under it (`cached`). `circuit`: (cross-sections, discovery table)
    to grade instead of finding one; `eta`: print first how long the run will take."""

    def __init__(self, out, config, circuit=None, eta=False):
        self.out, self.config, self.started = out, config, time.time()
        self.model = load_model(config.weights, config.device)
        self.make_prompts()
        self.find_circuit(circuit)
        if eta:
            click.echo(eta_text(estimate_seconds(self)))
        self.acts = {split: {} for split in self.splits}
        self.add_nodes(self.nodes)
        os.makedirs(out, exist_ok=True)  # last: a run that fails to start leaves config.json as it was
        write_json(os.path.join(out, "config.json"), asdict(config))

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def make_prompts(self):
        """Prompt sets (README §2, revised code): train over all names; eval over the first half, and
        one counterfactual of every eval prompt per attribute with names from the second."""
        c = self.config
        train, evaluation = ioi.train_prompts(c.n_train, c.seed), ioi.eval_prompts(c.n_eval, c.seed + 1)
        splits = {"eval": evaluation,
                  **{f"cf_{attribute}": ioi.counterfactuals(evaluation, attribute, seed=c.seed + 2 + i)
                     for i, attribute in enumerate(ioi.ATTRIBUTES)}}
        # Shortest first, each prompt beside its counterfactuals: a batch of one length pads little, and a
        # patched pass at `end` recomputes about one position a prompt, not the batch's spread of lengths.
        order = sorted(range(len(evaluation)), key=lambda i: len(evaluation[i].tokens))
        self.splits = {"train": train, **{name: [split[i] for i in order] for name, split in splits.items()}}
        self.found_with = discovery_prompts()  # not the evaluation prompts: see DISCOVERY_N
        every_split = [self.found_with, *self.splits.values()]
        ioi.check_reads_prompts(self.model, [prompt for prompts in every_split for prompt in prompts])
        self.attributes = {split: ioi.attribute_ids(prompts) for split, prompts in self.splits.items()}

    def find_circuit(self, circuit=None):
        """The cross-sections graded: found in the model (`ioi.circuit_cross_sections`), or given."""
        if circuit is None:
            click.echo("Finding the circuit ...")
        found, self.discovery = circuit or ioi.circuit_cross_sections(self.model, self.found_with,
                                                                       self.config.batch_size)
        skip = self.config.skip_sections
        self.sections = [s for s in found if s.name not in skip]
        self.skipped = [s.name for s in found if s.name in skip]
        if not self.sections:
            raise ValueError(f"every cross-section found is in skip_sections {skip}" if found else
                             "no cross-section found: the model does not seem to solve IOI")
        if self.skipped:
            click.echo(f"Not graded (skip_sections): {', '.join(self.skipped)}")
        self.nodes = list(dict.fromkeys(node for section in self.sections for node in section.nodes))
        click.echo(f"{len(self.sections)} cross-sections, {len(self.nodes)} nodes")

    def add_nodes(self, nodes):
        """Collect (or load) activations at more nodes in every split (the run's, or `grade-sae`'s)."""
        new = [node for node in nodes if node not in self.acts["train"]]
        for split, prompts in self.splits.items() if new else ():
            self.acts[split].update(collect_activations(self.path("activations"), self.model, prompts, new,
                                                        self.config.batch_size))

    def task(self):
        """The model on the evaluation prompts, as every test runs it."""
        return metrics.Task(self.model, self.splits["eval"], self.config.batch_size)

    def fit_supervised(self, nodes=None):
        """Mean and least-squares supervised dictionaries at every node (README §4), saved; or at `nodes`."""
        n_values = {"io": len(ioi.NAMES), "s": len(ioi.NAMES), "pos": len(ioi.PATTERNS)}
        fit = dictionaries.SupervisedDictionary.fit
        fitted = {name: {node: fit(self.acts["train"][node], self.attributes["train"], n_values, method)
                         for node in nodes or self.nodes}
                  for method, name in (("mean", "supervised"), ("lstsq", "supervised_lstsq"))}

        def save(by_node, folder):
            for node, dictionary in by_node.items():
                dictionary.save(os.path.join(folder, str(node)))
        for name, by_node in fitted.items() if nodes is None else ():
            atomic_folder(self.path("dictionaries", name), functools.partial(save, by_node))
        return fitted

    def sae_grids(self):
        """{method: [(SAESpec field, value)]}: the task SAEs' settings; folders l1<value>/, k<value>/."""
        c, l1 = self.config, "l1_coefficient"
        return {"vanilla": [(l1, v) for v in c.vanilla_l1], "gated": [(l1, v) for v in c.gated_l1],
                "topk": [("k", k) for k in c.topk_k],
                "random_decoder": [(l1, c.vanilla_l1[len(c.vanilla_l1) // 2])]}

    def sae_train_config(self):
        """Task SAEs (and the phenomena's SAEs) train until they converge, capped at `epochs`."""
        c, schedule = self.config, dictionaries.TrainConfig.resample_at  # when to resample: a fixed schedule
        return dictionaries.TrainConfig(d_sae=c.d_sae, epochs=c.epochs, lr=c.sae_lr,
                                        resample_at=schedule[:c.sae_resamples], plateau=c.sae_plateau or None)

    def train_task_saes(self):
        """({method: {setting: {node: SAE}}}, {(method, setting, node): its last training log}) for every
        architecture and setting (README §8) and the frozen-random-decoder floor, one stack per method."""
        c, n, saes, training = self.config, len(self.nodes), {}, {}
        datasets = torch.stack([self.acts["train"][node] for node in self.nodes])  # [node, N, d_head]
        for method, grid in self.sae_grids().items():
            arch = "vanilla" if method == "random_decoder" else method  # the floor: a vanilla SAE
            specs = [dictionaries.SAESpec(arch, i, seed=c.seed + j, frozen_decoder=method == "random_decoder",
                                          name=f"{name.removesuffix('_coefficient')}{value}/{node}",
                                          **{name: value})
                     for j, (name, value) in enumerate(grid) for i, node in enumerate(self.nodes)]
            trained, logs = train_or_load_stack(self.path("saes", method), datasets, specs,
                                                self.sae_train_config(), c.device)
            final = {log["sae"]: log for log in logs}  # the last log of each SAE: how its training ended
            for j, (_, value) in enumerate(grid):
                saes.setdefault(method, {})[value] = dict(zip(self.nodes, trained[j * n:(j + 1) * n]))
                training.update({(method, value, node): final[j * n + i]
                                 for i, node in enumerate(self.nodes)})
        return saes, training

    def train_corpus_saes(self):
        """{f"{arch}_fulldist": {node: SAE}}: SAEs trained on every token position of generic text."""
        c = self.config
        heads = list(dict.fromkeys((node.hook_name, node.head) for node in self.nodes))
        click.echo(f"Collecting {c.corpus_tokens} corpus activations at {len(heads)} (hook, head) pairs ...")
        texts, context = dictionaries.iter_corpus_texts(c.corpus), min(128, self.model.config.n_positions)
        corpus = dictionaries.collect_corpus_activations(self.model, gpt2.load_tokenizer(), heads, texts,
                                                         c.corpus_tokens, context=context)
        datasets = torch.stack([corpus[head] for head in heads]).cpu()  # [head, tokens, d_head]
        config = dictionaries.TrainConfig(d_sae=c.corpus_d_sae, epochs=c.corpus_epochs, lr=c.corpus_lr)
        saes = {}
        for arch in ARCHS:
            specs = [dictionaries.SAESpec(arch, i, l1_coefficient=c.corpus_l1, k=c.corpus_k, seed=c.seed,
                                          name=f"{name}.{head}") for i, (name, head) in enumerate(heads)]
            trained, _ = train_or_load_stack(self.path("saes", f"{arch}_fulldist"), datasets, specs, config,
                                             c.device)
            by_head = dict(zip(heads, trained))
            saes[f"{arch}_fulldist"] = {node: by_head[(node.hook_name, node.head)] for node in self.nodes}
        return saes

    def at_nodes(self, supervised, task_saes, corpus_saes):
        """The dictionaries behind metrics' grading interface: supervised {method: {node: ..}},
        task SAEs {method: {setting: {node: ..}}} and full-distribution SAEs {method: {node: ..}}."""
        def wrap(saes):
            return metrics.saes_at_nodes(saes, self.acts["train"], self.attributes["train"])
        return ({method: {node: metrics.SupervisedAtNode(d) for node, d in fitted.items()}
                 for method, fitted in supervised.items()},
                {method: {setting: wrap(saes) for setting, saes in settings.items()}
                 for method, settings in task_saes.items()},
                {method: wrap(saes) for method, saes in corpus_saes.items()})


def discovery_prompts(n=DISCOVERY_N, seed=DISCOVERY_SEED):
    """Evaluation-style prompts (the first half of the names) that `ioi.discover` finds heads with."""
    return ioi.eval_prompts(n, seed=seed)


def load_model(weights, device="cpu"):
    """GPT-2 weights from `weights`, or the embedded small IOI model when it is None."""
    return (ioi.default_model() if weights is None else gpt2.GPT2.from_pretrained(weights)).to(device).eval()


def train_or_load_stack(folder, datasets, specs, train_config, device="cpu", group=SAES_PER_PROGRAM):
    """(SAEs, logs) trained `group` at a time, each group cached in <folder>.parts until the stack is in
    `folder` (`cached`). Always the saved SAEs (README §8): a resumed run grades what a fresh one does."""
    digest = hashlib.sha256(datasets.numpy().tobytes()).hexdigest()[:16]
    parts = f"{folder}.parts"

    def key(specs):
        return {"datasets": digest, "specs": [asdict(spec) for spec in specs], "train": asdict(train_config)}

    def save(into, specs, saes, logs):
        for spec, sae in zip(specs, saes):
            dictionaries.save_sae(sae.to("cpu"), os.path.join(into, spec.name))
        write_json(os.path.join(into, "logs.json"), logs)

    def load(specs):
        return lambda saved: ([dictionaries.load_sae(os.path.join(saved, spec.name)) for spec in specs],
                              read_json(os.path.join(saved, "logs.json")))

    def train(tmp):
        saes, logs = [], []
        with click.progressbar(range(0, len(specs), group), show_eta=True,
                               label=f"{len(specs)} {specs[0].arch} SAEs, {group} at a time") as offsets:
            for offset in offsets:
                part = specs[offset:offset + group]

                def train_part(tmp):
                    save(tmp, part, *dictionaries.train_sae_stack(datasets.to(device), part, train_config))
                trained, part_logs = cached(os.path.join(parts, str(offset)), key(part), train_part,
                                            load(part))
                saes += trained
                logs += [{**log, "sae": log["sae"] + offset} for log in part_logs]
        save(tmp, specs, saes, logs)
    saes_and_logs = cached(folder, key(specs), train, load(specs))
    shutil.rmtree(parts, ignore_errors=True)  # the whole stack is saved: its groups are not needed
    return saes_and_logs


# --- the ETA: the run's plan (its phases, as `evaluate_run` names them, and their work), timed here

TASK_SAES, CORPUS_SAES, SECTIONS = "Task SAEs", "Full-distribution SAEs", "Tests 1-3 at every cross-section"
CORE, PHENOMENA = "Core SAE metrics", "Feature occlusion and over-splitting"


def plan(run):
    """{phase: its work} as `evaluate_run` does it: SAE stacks (arch, SAEs, d_sae, epochs, inputs), or passes
    over the evaluation prompts, Counter {kind: passes} (at most, for Test 2's choices and LD recovered)."""
    def kind(nodes, ld_only=True):  # a pass costs by where it starts (`Task.patched`) and what it reads
        position = min((node.position for node in nodes), key=ioi.POSITIONS.index)  # io < s1 < ... < end
        return ioi.Node("z", min(node.layer for node in nodes), 0, position), ld_only
    c, grids = run.config, run.sae_grids()
    grading = Counter({kind(run.nodes, False): 1})  # the clean run
    ld_recovered = Counter(kind([node]) for node in run.nodes)  # each node at its mean
    for section in run.sections:
        n = len(section.attributes)
        chosen = sum(min(len(grid), n) for grid in grids.values()) + len(ARCHS)  # settings Test 2 keeps
        # LD only: mean-ablated, approximation, causal curves; the argmax: counterfactuals, every edit
        grading[kind(section.nodes)] += 1 + 2 + 2 * 2 + chosen * (2 + 2 * len(c.f1_thresholds))
        grading[kind(section.nodes, False)] += 3 * n + (len(grids) + len(ARCHS)) * n * len(
            metrics.sae_edits(c.edit_k))
        for node in section.nodes:
            ld_recovered[kind([node])] += chosen
    stacks = [("vanilla" if method == "random_decoder" else method, len(run.nodes) * len(grid))
              for method, grid in grids.items()] + [("topk", len(c.occlusion_alphas))]  # + the α sweep
    heads = len({(node.hook_name, node.head) for node in run.nodes})
    return {TASK_SAES: [(arch, n_sae, c.d_sae, c.epochs, c.n_train) for arch, n_sae in stacks],
            CORPUS_SAES: [(arch, heads, c.corpus_d_sae, c.corpus_epochs, c.corpus_tokens) for arch in ARCHS],
            SECTIONS: grading, CORE: ld_recovered,
            PHENOMENA: Counter(kind([node], False) for node in run.nodes for _ in ioi.ATTRIBUTES)}


def seconds(fn, device="cpu"):
    """Wall-clock seconds of fn(), waiting for the GPU where there is one (the project's one timer)."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def estimate_seconds(run):
    """{phase: seconds} from scratch: the `plan`, the activations and the corpus, at the speed of passes and
    SAE steps timed here. A lower bound: the work between passes (latent F1s, edit search, fits, toys) is
    not counted; on the laptop preset it made Tests 1-3 take 1.5x their estimate (README, "Status")."""
    c = run.config
    middle = len(run.splits["eval"]) // 2  # a batch of one length, as the run's (see `Run.make_prompts`)
    prompts, d_head = run.splits["eval"][middle:][:64], run.model.config.n_embd // run.model.config.n_head
    task = metrics.Task(run.model, prompts, c.batch_size)  # one task: its caches serve every kind of pass

    @functools.cache
    def per_prompt(kind=(None, False)):  # a pass of `plan`, per prompt; no node: the unpatched pass
        node, ld_only = kind
        patches = {} if node is None else {node: torch.zeros(len(prompts), d_head)}
        task.patched(patches, ld_only)  # not timed: it builds the cache of the unpatched pass
        return seconds(lambda: task.patched(patches, ld_only), c.device) / len(prompts)

    @functools.cache
    def per_step(arch, n_sae, d_sae, batch_size):  # 16 epochs of one batch less 8: the set-up cancels
        data = torch.randn(1, batch_size, d_head, device=c.device)
        specs = [dictionaries.SAESpec(arch, seed=i) for i in range(n_sae)]

        def best(epochs):  # the fastest of five: the first pays one-time costs, and a shared machine is noisy
            config = dictionaries.TrainConfig(d_sae, batch_size=batch_size, epochs=epochs, resample_at=())
            return min(seconds(lambda: dictionaries.train_sae_stack(data, specs, config), c.device)
                       for _ in range(5))
        return max(0.0, best(16) - best(8)) / 8

    def training(arch, n_sae, d_sae, epochs, n):  # SAES_PER_PROGRAM at a time, one group after another
        batch = min(dictionaries.TrainConfig.batch_size, n)
        steps = epochs * math.ceil(n / batch) * math.ceil(n_sae / SAES_PER_PROGRAM)
        return steps * per_step(arch, min(n_sae, SAES_PER_PROGRAM), d_sae, batch)

    def cost(work):
        if isinstance(work, Counter):
            return c.n_eval * sum(n * per_prompt(kind) for kind, n in work.items())
        return sum(training(*stack) for stack in work)
    estimate = {"Activations": sum(map(len, run.splits.values())) * per_prompt(),
                **{phase: cost(work) for phase, work in plan(run).items()}}
    estimate[CORPUS_SAES] += c.corpus_tokens / len(prompts[0].tokens) * per_prompt()  # a prompt's, by token
    return estimate


def eta_text(estimate):
    """The estimate as lines: the total, then each phase. The task SAEs stop when they converge, often far
    below the epoch cap (the demo's: at 10-45% of it), so their bound is not added into the total."""
    def clock(s):
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"
    known = sum(s for phase, s in estimate.items() if phase != TASK_SAES)
    return "\n".join([f"Estimated time for the whole run: at least {clock(known)}, plus at most "
                      f"{clock(estimate[TASK_SAES])} to train the task SAEs (less if they converge); "
                      "counted: model passes and SAE steps, not the work between them"]
                     + [f"  {phase}: {clock(s)}" for phase, s in estimate.items()])


@contextmanager
def stopwatch(label):
    started = time.time()
    yield
    click.echo(f"{label}: {time.time() - started:.0f} s")


def evaluate_run(run, oversplitting_grids=metrics.OVERSPLITTING_GRIDS):
    """Every test of the paper on one run -> records (README §5-§9), fitting and training (or loading) the
    dictionaries and SAEs on the way. `oversplitting_grids`: see metrics.oversplitting_toy_records."""
    with stopwatch("Supervised dictionaries"):
        supervised = run.fit_supervised()
    with stopwatch(TASK_SAES):
        task_saes, training = run.train_task_saes()
    with stopwatch(CORPUS_SAES):
        corpus_saes = run.train_corpus_saes()
    supervised, task_saes, corpus_saes = run.at_nodes(supervised, task_saes, corpus_saes)
    task = run.task()
    clean_run = task.patched()
    records = metrics.grade_model(task.prompts, clean_run)
    records += grade_dictionaries(run, task, clean_run, supervised, task_saes, corpus_saes, training)
    with stopwatch(PHENOMENA):
        records += grade_phenomena(run, task, clean_run, supervised["supervised"], task_saes)
        records += metrics.geometry_records(run.nodes, run.acts, run.attributes)
        truth = {node: ioi.true_features(run.model, node) for node in run.nodes}
        records += metrics.ground_truth_records(task_saes, supervised["supervised"], truth)
    with stopwatch("Over-splitting toy"):
        records += metrics.oversplitting_toy_records(oversplitting_grids, run.config.seed)
    return records


def grade_dictionaries(run, task, clean_run, supervised, task_saes, other_saes, training, graded=None):
    """Tests 1-3 at every cross-section (`grade_sections`), or at `graded` (grade-sae's section inputs),
    then every SAE's core metrics and LD recovered (README §5-§8)."""
    with stopwatch(SECTIONS):
        records = grade_sections(run, task, clean_run, supervised, task_saes, other_saes, graded)
    with stopwatch(CORE):
        saes = metrics.every_setting(task_saes, other_saes)
        sections = [inputs.section for inputs in graded] if graded else run.sections
        records += metrics.core_records(saes, run.acts["eval"], training)
        records += metrics.ld_recovered_records(task, clean_run, run.acts["eval"], sections, saes,
                                                metrics.chosen_settings(records))
    return records


def grade_sections(run, task, clean_run, supervised, task_saes, other_saes, graded=None):
    """`metrics.section_tests` at every cross-section, each method cached in grades/ once graded (a killed
    run resumes at the next), keyed by the settings (bar the device) and SAEs; or uncached at `graded`."""
    tests = metrics.section_tests(task, supervised, task_saes, other_saes, run.config.edit_k,
                                  run.config.f1_thresholds)
    if graded:
        return [record for inputs in graded for grade in tests.values() for record in grade(inputs)]
    settings = {name: value for name, value in asdict(run.config).items() if name != "device"}
    stamps = {os.path.basename(os.path.dirname(path)): read_json(path)
              for path in sorted(glob.glob(run.path("saes", "*", "key.json")))}
    key, records = {"settings": settings, "saes": stamps}, []

    def load(saved):
        return [metrics.Record(**row) for row in read_json(os.path.join(saved, "records.json"))]
    with click.progressbar(length=len(run.sections) * len(tests), label="Grading cross-sections",
                           item_show_func=lambda step: step) as bar:
        for section in run.sections:  # its inputs computed only if a method is not cached yet
            inputs = functools.cache(functools.partial(metrics.section_inputs, task, section, run.acts,
                                                       run.attributes, clean_run))
            for method, grade in tests.items():
                def save(tmp):
                    write_json(os.path.join(tmp, "records.json"), [row.to_json() for row in grade(inputs())])
                folder = run.path("grades", re.sub(r"[^A-Za-z0-9]+", "_", section.name).strip("_"), method)
                records += cached(folder, key, save, load)
                bar.update(1, f"{section.name}: {method}")
    return records


def grade_phenomena(run, task, clean_run, supervised, task_saes):
    """README §9 (`metrics.grade_phenomena`); where occlusion is testable, the α sweep: top-k SAEs
    trained on a - α u_IO at its node, one per α; and the occlusion toy at the measured norms."""
    c = run.config
    phenomena = metrics.grade_phenomena(task, clean_run, run.nodes, run.acts, supervised, task_saes)
    records, node = phenomena.records, phenomena.occlusion_node
    if node is not None:
        io_features = supervised[node].dictionary.features["io"]
        datasets = metrics.io_shrunk_activations(run.acts["train"][node], io_features,
                                                 run.attributes["train"]["io"], c.occlusion_alphas)
        specs = [dictionaries.SAESpec("topk", i, k=c.topk_k[0], seed=c.seed, name=f"alpha{alpha}")
                 for i, alpha in enumerate(c.occlusion_alphas)]
        saes, _ = train_or_load_stack(run.path("saes", "occlusion_alpha_sweep"), datasets, specs,
                                      run.sae_train_config(), c.device)
        records += metrics.alpha_sweep_records(node, saes, datasets, c.occlusion_alphas,
                                               run.attributes["train"], c.topk_k[0])
    return records + metrics.occlusion_toy_records(phenomena.toy_norms, c.seed)


def write_metrics(run, rows):
    """metrics.json: the config, the circuit that was graded, and one flat row per result."""
    circuit = {"sections": sections_json(run.sections), "skipped": run.skipped, "discovery": run.discovery}
    write_json(run.path("metrics.json"), {"config": asdict(run.config), "circuit": circuit, "results": rows})


def sections_json(sections):
    return [{"name": s.name, "nodes": [str(n) for n in s.nodes], "attributes": list(s.attributes)}
            for s in sections]


def evaluate_and_report(run, oversplitting_grids=metrics.OVERSPLITTING_GRIDS):
    """Every test (`evaluate_run`) -> metrics.json and report.md, and the report's summary."""
    write_metrics(run, [record.to_json() for record in evaluate_run(run, oversplitting_grids)])
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')} "
               f"in {time.time() - run.started:.0f} s")


# === step commands: the pipeline one step at a time ===

@cli.command()
@run_options
def collect(**options):
    """Step 1: find the circuit and cache activations at its nodes."""
    run = open_run(**options)
    click.echo(circuit_tables(sections_json(run.sections), heads=[], verdicts=[])[0])
    click.echo(f"Activations cached in {run.path('activations')}")


@cli.command()
@run_options
def supervised(**options):
    """Step 2: fit mean and least-squares supervised dictionaries at every node (README §4)."""
    run = open_run(**options)
    run.fit_supervised()
    click.echo(f"Supervised dictionaries saved in {run.path('dictionaries')}")


@cli.command("train-saes")
@run_options
@click.option("--source", type=click.Choice(["ioi", "corpus", "both"]), default="both", show_default=True,
              help="Task SAEs on IOI activations, full-distribution SAEs on corpus text, or both.")
def train_saes(source, **options):
    """Step 3: train every SAE of the run (all nodes x settings, one batched stack per architecture)."""
    run = open_run(**options)
    if source != "corpus":
        run.train_task_saes()
    if source != "ioi":
        run.train_corpus_saes()
    click.echo(f"SAEs saved in {run.path('saes')} (SAELens layout)")


# === single tools: a model, prompts, one SAE, an SAE from elsewhere ===

DOWNLOAD_TIMEOUT = 60  # seconds a server may stay silent


def _fetch(url, path):
    """Copy `url` to `path` (urlretrieve raises ContentTooShortError if it is cut off); its sha256."""
    import http.client
    import socket
    import urllib.error
    import urllib.request
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # a stalled server ends as an error, not a hang
    try:
        urllib.request.urlretrieve(url, path)
    except urllib.error.HTTPError as error:
        raise ValueError(f"{url}: HTTP {error.code} {error.reason}") from None
    # unreachable, no such file, timed out, cut off (OSError, HTTPException); not a URL (ValueError)
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise ValueError(f"{url}: {getattr(error, 'reason', error)}") from None
    finally:
        socket.setdefaulttimeout(previous)
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@cli.command("download")
@click.option("--url", default="https://huggingface.co/openai-community/gpt2/resolve/main", show_default=True,
              help="Base URL holding model.safetensors and config.json (file:// works too).")
@click.option("--out", default=os.path.join("models", "gpt2"), show_default=True,
              callback=output_folder("config.json"), help="Folder to write them to.")
@click.option("--sha256", default=None, help="Expected sha256 of model.safetensors.")
def download_command(url, out, sha256):
    """Fetch GPT-2 Small (Hugging Face layout) into a folder that replaces --out once the model loads and
    reads the IOI prompts: a failed download leaves nothing, and costs no model already there."""
    url = url.rstrip("/")
    if sha256 is not None and not re.fullmatch("[0-9a-fA-F]{64}", sha256):
        raise click.BadParameter(f"{sha256!r} is not a sha256 (64 hexadecimal digits)", param_hint="--sha256")

    def fetch_and_check(folder):
        digests = {name: _fetch(f"{url}/{name}", os.path.join(folder, name))
                   for name in ("config.json", "model.safetensors")}
        if sha256 and digests["model.safetensors"] != sha256.lower():
            raise click.ClickException(f"{url}/model.safetensors: sha256 {digests['model.safetensors']} "
                                       f"does not match the expected {sha256}")
        try:
            model = gpt2.GPT2.from_pretrained(folder)
        except ValueError as error:  # named by where they came from, not by the temporary folder
            message = str(error).replace(os.path.join(folder, ""), url + "/")
            raise click.ClickException(f"downloaded files do not load: {message}") from None
        ioi.check_reads_prompts(model, discovery_prompts(), f"{url}: the model")
        return model, digests["model.safetensors"]
    model, digest = atomic_folder(out, fetch_and_check)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"{out}: GPT-2 with {n_params / 1e6:.1f}M parameters, {model.config.n_layer} layers, "
               f"loads fine (model.safetensors sha256 {digest})")


@cli.command("generate")
@WEIGHTS_OPTION
@click.option("--prompt", default="When Mary and John went to the store, John gave a drink to",
              show_default=True)
@click.option("--tokens", "n_tokens", type=click.IntRange(min=0), default=20, show_default=True,
              help="Number of tokens to add.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sample softmax(logits / T).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the sampler.")
@DEVICE_OPTION
def generate_command(weights, prompt, n_tokens, temperature, seed, device):
    """Continue a prompt: a quick look at what a model has learnt."""
    model = load_model(weights, device)
    tokenizer = gpt2.load_tokenizer()
    prompt_tokens = torch.tensor([[gpt2.BOS_TOKEN_ID, *tokenizer.encode_ordinary(prompt)]], device=device)
    if prompt_tokens.max() >= model.config.vocab_size:
        raise click.ClickException(f"the model's vocabulary ({model.config.vocab_size}) is below GPT-2's")
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = gpt2.generate_tokens(model, prompt_tokens, n_tokens, temperature, generator)
    click.echo(prompt + tokenizer.decode(tokens[0, prompt_tokens.shape[1]:].tolist()))


@cli.command("build-model")
@click.option("--out", default=os.path.join("models", "ioi-circuit"), show_default=True,
              callback=output_folder("circuit_config.json"), help="Folder to save it in.")
@click.option("--seed", type=SEED, default=ioi.CircuitConfig.seed, show_default=True,
              help="Seed of its random name codes and residual basis.")
def build_model_command(out, seed):
    """Save the embedded IOI model (GPT-2's circuit written by hand) in Hugging Face's layout."""
    config = ioi.CircuitConfig(seed=seed)
    model = ioi.build_ioi_model(config)

    def write(folder):  # circuit_config.json last: it marks a complete save
        model.save_pretrained(folder)
        write_json(os.path.join(folder, "circuit_config.json"), asdict(config))
    atomic_folder(out, write)
    scores = ioi.evaluate(model, ioi.held_out_prompts(1000))
    click.echo(f"held-out prompts: accuracy {scores['accuracy']:.1%}, top-1 {scores['top1_accuracy']:.1%}, "
               f"mean LD {scores['mean_logit_diff']:.2f}; saved to {out}")


@cli.command("ioi-eval")
@WEIGHTS_OPTION
@click.option("--n", type=POSITIVE, default=1000, show_default=True, help="Number of prompts.")
@click.option("--seed", type=SEED, default=1, show_default=True, help="Seed of the prompt sampler.")
@click.option("--held-out", is_flag=True,
              help="Templates, objects and places kept out of the training prompts.")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@DEVICE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def ioi_eval_command(weights, n, seed, held_out, batch_size, device, as_json):
    """How well a model does IOI: logit difference, accuracy, top-1, P(IO), per template."""
    model = load_model(weights, device)
    prompts = ioi.held_out_prompts(n, seed) if held_out else ioi.eval_prompts(n, seed)
    ioi.check_reads_prompts(model, prompts)
    start = time.time()
    result = ioi.evaluate(model, prompts, batch_size)
    result["prompts_per_s"] = n / (time.time() - start)
    if as_json:
        return click.echo(json.dumps(result))
    rows = [(f"{t}: {ioi.TEMPLATES[t]}" + " (held out)" * (t in ioi.HELD_OUT_TEMPLATES), r)
            for t, r in result["per_template"].items()] + [("all", result)]
    click.echo(_table([(label, r["n"], r["mean_logit_diff"], f"{r['accuracy']:.1%}",
                        f"{r['top1_accuracy']:.1%}", r["io_prob"]) for label, r in rows],
                      ["template", "n", "mean LD", "accuracy", "top-1", "P(IO)"]))
    kind = "held-out" if held_out else "evaluation"
    click.echo(f"{n} {kind} prompts, {result['prompts_per_s']:.0f} prompts/s")


@cli.command("nodes")
@WEIGHTS_OPTION
@click.option("--n", type=POSITIVE, default=DISCOVERY_N, show_default=True,
              help="Prompts used to find the heads (models other than GPT-2 Small).")
@click.option("--seed", type=SEED, default=DISCOVERY_SEED, show_default=True)
def nodes_command(weights, n, seed):
    """The circuit's nodes and cross-sections: known for GPT-2 Small (Wang et al.'s heads), found for other
    models (by default on the prompts the pipeline finds its circuit with)."""
    model, prompts = load_model(weights), discovery_prompts(n, seed)
    ioi.check_reads_prompts(model, prompts)
    sections, table = ioi.circuit_cross_sections(model, prompts)
    click.echo("\n\n".join(circuit_tables(sections_json(sections), table["heads"], table["sections"])))


@cli.command("train-sae")
@click.option("--acts", "acts_path", required=True, help="safetensors file with an `acts` tensor [N, d].")
@click.option("--arch", type=click.Choice(["vanilla", "gated", "topk", "random_decoder"]), required=True,
              help="random_decoder: vanilla encoder over a frozen random unit decoder (the paper's floor).")
@click.option("--latents", type=POSITIVE, default=512, show_default=True, help="Dictionary size d_sae.")
@click.option("--l1", type=FiniteFloat(min=0),
              help="Sparsity coefficient λ, inputs at mean norm √d  [default: 1 vanilla, 2.5 gated].")
@click.option("--k", type=POSITIVE, default=3, show_default=True, help="Latents kept per input (topk).")
@click.option("--epochs", type=POSITIVE,
              help="Passes over the data  [default: enough for about 6000 steps, at most 2000 epochs].")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate (the paper's v1 value; its revised 3e-4 needs many more steps).")
@click.option("--batch-size", type=POSITIVE, default=512, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", required=True, callback=output_folder("cfg.json"),
              help="Folder for the SAE (SAELens layout: cfg.json + sae_weights.safetensors).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_sae_command(acts_path, arch, latents, l1, k, epochs, lr, batch_size, seed, out, no_progress):
    """Train one SAE on an activations file and save it in the SAELens layout."""
    l1 = {"gated": 2.5}.get(arch, 1.0) if l1 is None else l1  # gated penalises the gate, which needs more
    acts = dictionaries.load_activations(acts_path)
    config = dictionaries.TrainConfig(d_sae=latents, lr=lr, batch_size=batch_size,
                                      epochs=epochs or min(2000, -(-6000 // -(-len(acts) // batch_size))))
    spec = dictionaries.SAESpec("vanilla" if arch == "random_decoder" else arch, l1_coefficient=l1, k=k,
                                seed=seed, frozen_decoder=arch == "random_decoder", name=arch)
    with click.progressbar(length=config.epochs, label=f"1 {spec.arch} SAEs", hidden=no_progress) as bar:
        sae, logs = dictionaries.train_sae(acts, spec, config, progress=bar.update)
    atomic_folder(out, lambda folder: dictionaries.save_sae(sae, folder))
    final = logs[-1]
    click.echo(f"{arch} SAE {acts.shape[1]}->{latents}, {config.epochs} epochs: l0 {final['l0']:.2f}  "
               f"mse {final['mse']:.4g}  fve {final['fve']:.4f}  dead {final['dead_fraction']:.3f}  -> {out}")


# --- grade-sae: any SAE in SAELens's layout, graded like ours (README, "Use with TransformerLens / SAELens")

def grade_sae_in_run(run, sae, label, min_section_effect=metrics.MIN_SECTION_EFFECT):
    """`grade-sae` in an open run -> metrics.json (replacing an earlier grading of `label`); sections moving
    the LD by less than `min_section_effect` are skipped: sufficiency and necessity would divide by ~0."""
    hook_name, hook_head = sae.meta.get("hook_name"), sae.meta.get("hook_head_index")
    act, layer, head = ioi.hook_reads(hook_name, hook_head, sae.d_in, run.model.config)
    sae, folded = dictionaries.as_plain_model_sae(sae, run.model, act, layer, head)
    for what in folded:
        click.echo(f"{hook_name}: {what}")
    sections = ioi.sections_read(run.sections, act, layer, head)
    if not sections:
        raise ValueError(f"{hook_name} reads none of the circuit's cross-sections "
                         f"({', '.join(s.name for s in run.sections)})")
    run.add_nodes([node for section in sections for node in section.nodes])
    task = run.task()
    clean_run, graded = task.patched(), []
    for section in sections:
        inputs = metrics.section_inputs(task, section, run.acts, run.attributes, clean_run)
        if metrics.moves_the_task(inputs, min_section_effect):
            graded.append(inputs)
        else:
            click.echo(f"{section.name}: skipped, mean-ablating it moves the mean LD by less than "
                       f"{min_section_effect:.0%}")
    if not graded:
        raise ValueError(f"{label}: none of the sites it reads is causal for IOI in this model")
    nodes = list(dict.fromkeys(node for inputs in graded for node in inputs.section.nodes))
    ours, training = run.train_task_saes() if set(nodes) <= set(run.nodes) else ({}, {})
    theirs = {label: dict.fromkeys(nodes, sae.to(run.config.device))}
    supervised, ours, theirs = run.at_nodes(run.fit_supervised(nodes), ours, theirs)
    records = grade_dictionaries(run, task, clean_run, supervised, ours, theirs, training, graded)
    records += [metrics.Record("graded_sae", inputs.site, label, len(inputs.section.nodes), reads=hook_name,
                               head=hook_head) for inputs in graded]
    path = run.path("metrics.json")
    kept = [row for row in (read_json(path)["results"] if os.path.exists(path) else [])
            if row.get("graded_sae") != label]
    if not any(row["site"] == "model" for row in kept):  # the model's own records are written once
        records += metrics.grade_model(task.prompts, clean_run)
    write_metrics(run, kept + [replace(r, graded_sae=label).to_json() for r in records])


@cli.command("grade-sae")
@click.option("--sae", "sae_dir", required=True,
              help="SAE folder in SAELens's layout (cfg.json + sae_weights.safetensors).")
@click.option("--name", default=None, help="Its name in the report  [default: sae:FOLDER].")
@run_options
def grade_sae_command(sae_dir, name, **options):
    """Grade any SAE on IOI beside the supervised dictionaries at the nodes it reads (cfg.json's
    hook_name): one head's q|k|v|z, all heads' hook_z, or the residual stream at the paper's positions."""
    sae = dictionaries.load_sae(sae_dir)
    run = open_run(**options)
    grade_sae_in_run(run, sae, name or f"sae:{Path(sae_dir).resolve().name}")
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')}")


# === report (report.md, figures, terminal summary) ===
# One run's results retold from its metrics.json alone. The sections are data (`REPORT_SECTIONS`): each table,
# and the figure drawn from its numbers, is a `Report.pivot` of the records. README "Reading the report".

PAPER_SCALE = {"n_train": 20_000, "n_eval": 5_000, "d_sae": 512, "epochs": 2000}  # README §2, §8
HEADLINE = [("io", "(B)NM out"), ("pos", "(B)NM qk"), ("pos", "(B)NM q"),
            ("pos", "S-I out"), ("pos", "S-I v"), ("pos", "Ind+DT out")]  # (attribute, site)
METHODS = ["mean_ablation", "supervised", "supervised_lstsq", "vanilla", "gated", "topk", "random_decoder",
           "vanilla_fulldist", "gated_fulldist", "topk_fulldist"]
COLORS = {**dict(zip(METHODS, ["#7f7f7f", "#2ca02c", "#98df8a", "#d62728", "#1f77b4", "#ff7f0e",
                               "#8c564b", "#ff9896", "#aec7e8", "#ffbb78"])),
          "IO names": "#2ca02c", "S names": "#d62728"}  # a method looks the same in every figure
ORDER = {"site": [site for _, site in HEADLINE], "method": ["none", *METHODS],
         "attribute": ["io", "s", "pos"]}  # the paper's
OPTIONAL = ("setting", "reads", "head")  # fields of a row key that a record may lack
EDIT, NO_EDIT = ("edit_accuracy", "weight_removed"), "edit_accuracy_no_intervention"
NAMES, SWEEP = ("occlusion_io_names", "occlusion_s_names"), ("alpha_sweep_io_names", "alpha_sweep_s_names")
TOY = {f"oversplit_toy_{c}": c.replace("_", " ") for c in ("counted", "random_wins", "ideal_wins", "ties",
                                                           "not_counted", "share_random_wins")}
LABELS = {"site": "cross-section", **dict.fromkeys((NAMES[0], SWEEP[0]), "IO names"), "alpha": "α",
          **dict.fromkeys((NAMES[1], SWEEP[1]), "S names"), "pos_latents": "Pos latents", "l1": "λ",
          "threshold": "F1 ≥ t", "occlusion_toy_recovered": "share recovered", "graded_sae": "nodes graded",
          "logit_diff_histogram": "prompts per bin of LD", "low": "LD = logit[IO] − logit[S]",
          "oversplit_toy_loss": "Toy ±µ + noise: best SAE loss", "geometry_lstsq_fve": "least-squares FVE",
          "geometry_effective_rank": "effective rank", "geometry_io_s_overlap": "IO–S overlap", **TOY}
FORMATS = {**dict.fromkeys([*NAMES, *SWEEP, "pos_latents", "graded_sae", *list(TOY)[:-1]], ".0f"),
           **dict.fromkeys(("evidence_answers_changed", "evidence_ld_moved"), ".0%")}


def _fmt(x, spec=".2f"):
    """A table cell: a number in `spec`, a dash for None or NaN, anything else as it prints."""
    return "–" if x is None or x != x else format(x, spec) if isinstance(x, float) else str(x)


def _setting(method, setting):
    return "" if setting is None else f"k={setting:g}" if method.startswith("topk") else f"λ={setting:g}"


def _keys(records, fields):
    """The distinct tuples of `fields` in records (of a str: its values): in ORDER, numbers ascending."""
    names = (fields,) if isinstance(fields, str) else fields

    def rank(key):
        return [(ORDER[f].index(v) if v in ORDER.get(f, ()) else len(ORDER.get(f, ())),
                 v if isinstance(v, (int, float)) else 0) for f, v in zip(names, key)]
    keys = sorted(dict.fromkeys(tuple(r.get(f) if f in OPTIONAL else r[f] for f in names) for r in records),
                  key=rank)
    return [key for (key,) in keys] if isinstance(fields, str) else keys


def _table(rows, headers):
    """A markdown table of `rows` under `headers`, each cell through `_fmt`."""
    lines = ["| " + " | ".join(map(_fmt, row)) + " |" for row in [headers, *rows]]
    return "\n".join(lines[:1] + ["|" + "---|" * len(headers)] + lines[1:])


def circuit_tables(sections, heads, verdicts, skipped=()):
    """Markdown tables of a circuit: its cross-sections, the heads `ioi.discover` gave a role, verdicts."""
    roles = ["name mover", "S-inhibition", "induction/duplicate token"]
    found = sorted((row for row in heads if row["role"]), key=lambda row: (
        roles.index(row["role"]) if row["role"] in roles else len(roles), -abs(row["ld_drop"] or 0)))
    return [_table([(s["name"], ", ".join(f"`{node}`" for node in s["nodes"]), ", ".join(s["attributes"]))
                    for s in sections], ["cross-section", "nodes", "attributes edited"])] + [
        _table([(r["head"], r["position"], r["direct_effect"], r["query_effect"], r["ld_drop"],
                 r["fraction"] and f"{r['fraction']:.1%}", r["role"]) for r in found],
               ["head", "position", "direct effect", "LD drop via q", "LD drop", "of LD", "role"])
    ] * bool(heads) + [
        f"Graded if mean-ablating its nodes moves the mean LD ≥ {metrics.MIN_SECTION_EFFECT:.0%}",
        _table([(d["section"], d["ld_drop"], d["fraction"], "not graded: in the run's skip_sections"
                 if d["section"] in skipped else "graded" if d["kept"] else "dropped: not causal here")
                for d in verdicts], ["cross-section", "LD drop", "of LD", "verdict"])] * bool(verdicts)


def _against_paper(low, high, ours):
    """The paper's range [low, high], our min–max and the verdict; counts where both bounds are whole."""
    spec = ".2f" if 0 < low % 1 or 0 < high % 1 else ".0f"  # an infinite bound's % 1 is NaN

    def span(a, b):
        return (f"≥ {a:{spec}}" if b == np.inf else f"≤ {b:{spec}}" if a == -np.inf
                else f"{a:{spec}}" if a == b else f"{a:{spec}}–{b:{spec}}")
    return span(low, high), span(min(ours), max(ours)), (
        "within the paper's range" if low <= min(ours) and max(ours) <= high
        else "higher" if min(ours) > high else "lower" if max(ours) < low else "overlaps")


def _t(caption, tests, rows=("site",), columns=None, **options):
    """A table spec: the arguments of `Report.pivot` (a column per test by default)."""
    return dict(caption=caption, tests=tests, rows=rows, columns=columns, **options)


# The report's sections in order, each a list of blocks: a table spec, or a (Report method, arguments...)
# that returns blocks. Test 2's tables share their rows and cells; a node's SAEs are a row each.
EDITS = {"rows": ("site", "attribute"), "columns": "method", "cell": "edit_cell"}
SAES = {"rows": ("site", "method", "setting"), "head": ("node",)}
GATES = {"tests": ("gate_present", "gate_causal"), "rows": ("site", "attribute"), "columns": "method",
         "head": ("node",)}
REPORT_SECTIONS = {
    "## 1. The model solves IOI": [
        _t("GPT-2 Small: mean LD ≈ 3.3, top-1 ≈ 91%.", ("logit_diff", "accuracy", "top1_accuracy"),
           site="model"),
        _t(None, ("logit_diff_histogram",), ("low",), "method", plot="ld_histogram.png",
           marks=[("axvline", 0, None)])],
    "## 2. The circuit: cross-sections we patch and edit": [("circuit",)],
    "## 3. Test 1 — approximation: sufficiency and necessity": [
        _t("Sufficiency / necessity (README §5):", ("sufficiency", "necessity"), columns="method",
           plot="approximation.png")],
    "## 4. Test 2 — control: editing an attribute with a few latents": [
        ("control",),
        _t("Edit accuracy / weight removed at k = 2 (latents changed of L0):", (EDIT[0], NO_EDIT), **EDITS),
        _t("The same, F1-guided: 1 latent out, 1 in:", EDIT[:1], edit="f1", **EDITS),
        _t("F1-guided, 2 out + 2 in as the paper:", EDIT[:1], edit="f1", k=4, **EDITS),
        _t("The SAE setting chosen (README §8; L2 after a k = 2 edit):", ("edit_distance_k2",), chosen=True,
           **{**EDITS, "cell": "chosen_cell"})],
    "## 5. Test 3 — interpretability (README §7)": [
        _t("F1 coverage: the share of values with a latent of F1 ≥ 0.8:", ("f1_coverage",),
           ("site", "attribute"), "method", plot="f1_coverage.png"),
        _t("Sufficiency keeping / necessity removing the latents of F1 ≥ t:",
           ("causal_keep_sufficiency", "causal_remove_necessity"), ("threshold",), "method",
           plot="causal_f1.png", marks=[("axvline", 0.6, None)])],
    "## 6. Two SAE failure modes\n\n### Feature occlusion": [
        ("evidence", "occlusion", ("io", "s")),
        _t("Names with a latent of F1 ≥ 0.5:", NAMES, plot="occlusion.png", **SAES),
        _t("Mean norm of the supervised features:", ("supervised_feature_norm",), columns="attribute",
           head=("node",)),
        _t("Names with a latent, top-k SAEs on a − α·u_IO:", SWEEP, ("alpha",), plot="alpha_sweep.png"),
        _t("Per node: the stronger name present / the weaker causal:", phenomenon="occlusion", **GATES),
        _t("Reproduced: the stronger name has latents for ≥ half the names, the weaker for < half as many:",
           ("occlusion_reproduced",), **SAES),
        _t("Toy a = u_IO + v_S: features with a vanilla-SAE latent of F1 > 0.9:",
           ("occlusion_toy_recovered",), ("ratio", "attribute", "setting"))],
    "### Feature over-splitting": [
        ("evidence", "oversplitting", ("pos",)),
        _t("Latents best read as a Pos value (GPT-2 Small: ≥ 10):", ("pos_latents",),
           phenomenon="oversplitting", **SAES),
        _t("Per node: Pos present / causal:", phenomenon="oversplitting", **GATES),
        ("oversplit_toy",),
        _t("Who wins on the toy, counted where the ideal SAE fires on ≥ 2%:", tuple(TOY), ("grid",))],
    "## 7. Core SAE metrics (mean over nodes)": [
        _t("`*_fulldist`: SAEs trained on prose (blind to prose on the embedded model):", ("l0", "mse", "fve",
           "dead_fraction", "ld_recovered", "train_steps", "train_converged"), ("method", "setting"))],
    "## 8. Comparison with the paper": [("paper",)],
    "## 9. Geometry and ground truth (beyond the paper)": [
        _t("Per node: least-squares fit FVE, effective rank, mean |cos| of IO and S codes:",
           ("geometry_lstsq_fve", "geometry_effective_rank", "geometry_io_s_overlap"), head=("node",)),
        _t("Mean-code norm / its shuffled-label noise floor:", ("evidence_eval_norm", "evidence_noise_floor"),
           columns="attribute", head=("node",)),
        _t("Decoder rows' best cosine with the true feature directions / the supervised mean codes:",
           ("ground_truth_cosine", "supervised_cosine"), ("site", "method", "setting"), "attribute")],
    "## 10. SAEs from elsewhere (`grade-sae`)": [
        _t("The hook each reads and the nodes graded (core metrics: section 7):", ("graded_sae",),
           ("method", "reads", "head", "site"))]}
# README §6, revised paper, k = 2 over the headline sites: the paper's (low, high) range of each quantity.
PAPER_EDITS = [("supervised", EDIT[0], 0.80, 0.96), ("supervised", EDIT[1], 0.37, 0.64),
               ("gated", EDIT[0], 0.87, 0.97), ("gated", EDIT[1], 0.57, 0.79),
               ("topk", EDIT[0], 0.86, 0.95), ("topk", EDIT[1], 0.39, 0.68), ("vanilla", EDIT[0], 0.24, 0.61)]


class Report:
    """One run's metrics.json as markdown and figures, section by section (README §1-§9)."""

    def __init__(self, path):
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise click.ClickException(f"{path}: not found (run the pipeline first)")
        self.config, circuit, self.by_test, self.figures = data["config"], data["circuit"], {}, {}
        found = circuit.get("discovery") or {}
        self.circuit_parts = [circuit.get("sections") or [], found.get("heads") or [],
                              found.get("sections") or [], circuit.get("skipped") or []]
        for i, row in enumerate(data["results"]):
            try:  # checked against the one schema, the one that wrote it
                record = metrics.Record.from_json(row).to_json()
            except (TypeError, ValueError) as e:
                raise click.ClickException(f"{path}: malformed record {i}: {e}")
            self.by_test.setdefault(record["test"], []).append(record)  # each query scans one test only
        self.chosen = {}  # {(site, method): {attribute: setting}}, as Test 2 chose (metrics.choose_settings)
        for r in self.find("edit_distance_k2", chosen=True):
            self.chosen.setdefault((r["site"], r["method"]), {})[r["attribute"]] = r["setting"]
        graded = {r["site"] for test in ("edit_accuracy", "sufficiency") for r in self.by_test.get(test, [])}
        self.headline = [(attribute, site) for attribute, site in HEADLINE if site in graded]  # in this run

    def find(self, test, **match):
        """The records of one test whose fields equal `match` (a missing field counts as None)."""
        return [r for r in self.by_test.get(test, []) if all(r.get(k) == v for k, v in match.items())]

    def at(self, test, choose_for=None, **match):
        """The mean value of the matching records; a task SAE's at the setting Test 2 chose at its site
        (README §8) for the attribute `choose_for` (default: the match's), else the one chosen most often."""
        groups, values, attribute = {}, [], choose_for or match.get("attribute")
        for r in self.find(test, **match):
            groups.setdefault((r["site"], r["method"]), []).append(r)
        for site_method, records in groups.items():
            choice = self.chosen.get(site_method, {})
            preferred = [choice.get(attribute), *(s for s, _ in Counter(choice.values()).most_common())]
            present = sorted({r.get("setting") for r in records} - {None})
            setting = next((s for s in preferred if s in present), present[0] if present else None)
            values += [r["value"] for r in records if r.get("setting") == setting]
        return float(np.mean(values)) if values else None

    def edit(self, test, site, method, attribute, k=2, edit="greedy"):
        """A test of an edit (README §6), of SAEs greedy at k = 2 by default (a supervised edit has no k)."""
        how = {} if method.startswith("supervised") or method == "none" else {"k": k, "edit": edit}
        return self.at(test, site=site, method=method, attribute=attribute, **how)

    def pivot(self, caption, tests, rows, columns, cell=None, keys=None, values=None, head=(), plot=None,
              marks=(), **match):
        """[caption, table] of the records of `tests` that `match`: a row per value of the fields `rows` (or
        per `keys`), a column per value of the field `columns` (or per `values`; None: per test), a cell the
        method `cell`(where, column) or the tests' values joined by " / ". `plot`: drawn too, x the row."""
        records = [r for test in tests for r in self.find(test, **match)]
        names = list(tests) if columns is None else values or _keys(records, columns)
        table, panels = [], {}  # {title: {series: [(x, y)]}}
        for key in keys or _keys(records, rows):
            where = {**match, **dict(zip(rows, key))}
            table.append([_setting(where.get("method") or "", v) if f == "setting" else v
                          for f, v in zip(rows, key)])
            x = key[0] if len(key) == 1 else "\n".join(map(_fmt, table[-1]))
            for name in names:
                these, extra = ((name,), {}) if columns is None else (tests, {columns: name})
                found = [] if cell else [self.at(test, **where, **extra) for test in these]
                for test, value in zip(these, found):
                    title = caption[:-1] if columns is None else LABELS.get(test, test.replace("_", " "))
                    panels.setdefault(title, {}).setdefault(LABELS.get(name, name), []).append((x, value))
                table[-1].append(getattr(self, cell)(where, name) if cell else " / ".join(
                    _fmt(value, FORMATS.get(test, ".2f")) for test, value in zip(these, found)))
        headers = [*head, *(LABELS.get(name, name) for name in [*rows[len(head):], *names])]
        figure = self.figure(plot, [(title, series, {"xlabel": LABELS.get(rows[0], rows[0])}, marks)
                                    for title, series in panels.items()]) if plot else []
        return ([caption, _table(table, headers)] if caption and table else []) + figure

    def figure(self, name, panels):
        """Keep figures/<name>: a panel per (title, {label: [(x, y)]}, Axes settings, dashed marks)."""
        points = [point for _, series, _, _ in panels for line in series.values() for point in line]
        if all(y is None for _, y in points):
            return []
        from matplotlib.figure import Figure  # a bare Figure keeps no pyplot state, so nothing leaks
        named = any(isinstance(x, str) for x, _ in points)  # x names a group: points, not joined
        ncols, nrows = min(len(panels), 2), -(-len(panels) // 2)
        width = max(4.5, 0.5 * len({x for x, _ in points})) if named else 4.5
        fig = Figure(figsize=(1.5 + width * ncols, 3.3 * nrows), layout="constrained")
        for i, (title, series, settings, marks) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1, title=title, **settings)
            for label, line in series.items():
                x, y = list(zip(*[(x, y) for x, y in line if x is not None and y is not None])) or [(), ()]
                ax.plot(x, y, "o" if named else "o-", label=label, color=COLORS.get(label))
            for method, at, label in marks:
                if at is not None:
                    getattr(ax, method)(at, label=label, color=COLORS.get(label, "k"), ls="--", lw=1)
            ax.tick_params("x", labelsize=8, labelrotation=20)
            ax.minorticks_off()
        handles = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside right upper")
        self.figures[name] = fig
        return [f"![{name[:-4].replace('_', ' ')}](figures/{name})"]

    def summary(self):
        """The terminal summary (also "At a glance"): the model, edit accuracy and sufficiency per site."""
        ld, accuracy = (_fmt(self.at(test, site="model")) for test in ("logit_diff", "accuracy"))
        table = self.pivot("Edit accuracy at k = 2 / sufficiency:", (), ("attribute", "site"), "method",
                           cell="glance_cell", keys=self.headline, values=("supervised", *ARCHS))
        return "\n\n".join([f"Model: mean LD {ld}, accuracy {accuracy}.", *table])

    def glance_cell(self, where, method):
        sufficiency = self.at("sufficiency", site=where["site"], method=method)
        return f"{_fmt(self.edit(EDIT[0], method=method, **where))} / {_fmt(sufficiency)}"

    def circuit(self):
        return circuit_tables(*self.circuit_parts) if self.circuit_parts[0] else []

    def edit_cell(self, where, method):
        """'edit accuracy / weight removed', and for SAEs '(latents changed of L0 there)'; none: no edit."""
        if method == "none":
            return self.edit(NO_EDIT, method=method, **where)
        text = " / ".join(_fmt(self.edit(test, method=method, **where)) for test in EDIT)
        changed = self.edit("latents_changed", method=method, **where)
        l0 = self.at("l0_at_site", site=where["site"], method=method, choose_for=where["attribute"])
        return text if changed is None else f"{text} ({changed:.1f} of L0 {_fmt(l0)})"

    def chosen_cell(self, where, method):
        return next((f"{_setting(method, r['setting'])} ({_fmt(r['value'])})"
                     for r in self.find("edit_distance_k2", **where, method=method)), None)

    def evidence(self, phenomenon, attributes):
        """The gate of a phenomenon (README §9): the node where it is tested, or the 4 closest to it."""
        gate = self.find("phenomenon_testable", phenomenon=phenomenon)
        testable = bool(gate and gate[0]["value"])
        nodes = [gate[0]["site"]] if testable else sorted(  # the weaker attribute's norm, strongest first
            _keys(self.find("evidence_norm"), "site"),
            key=lambda n: -min(self.at("evidence_norm", site=n, attribute=a) or 0 for a in attributes))[:4]
        caption = (f"Testable where the stronger of {', '.join(attributes)} is present (mean-code norm over "
                   f"its shuffled-label floor ≥ {metrics.PRESENT}) and the weaker causal (alone it changes "
                   f"≥ {metrics.CAUSAL:.0%} of the answers or of the mean LD): norm / answers changed / LD "
                   "moved. " + (f"It runs at `{nodes[0]}`:" if testable else "**Not testable here.**"))
        return self.pivot(caption, ("evidence_norm", "evidence_answers_changed", "evidence_ld_moved"),
                          ("site",), "attribute", keys=[(n,) for n in nodes], values=attributes,
                          head=("node",)) if gate else []

    def paper(self):
        """Our min–max beside the paper's range (README §6, §9), and a verdict comparing the two."""
        sites = [(a, s) for a, s in self.headline  # where an edit must change the model's answer
                 if (self.edit(NO_EDIT, s, "none", a) or 0) < 0.5]
        names = [[self.at(test, site=n, method=m, setting=s) or 0 for test in NAMES]  # trained SAEs, as `pos`
                 for n, m, s in _keys(self.find(NAMES[0]), ("site", "method", "setting")) if m in ARCHS]
        gain = {test: [self.at(test, alpha=alphas[-1]) - self.at(test, alpha=alphas[0])] if alphas else []
                for test in SWEEP for alphas in [_keys(self.find(test), "alpha")]}  # names with a latent
        counted, won = (self.at(f"oversplit_toy_{c}", grid="paper") for c in ("counted", "share_random_wins"))
        rows = [*[(f"{m}: {test.replace('_', ' ')} at k = 2", low, high,
                   [self.edit(test, s, m, a) for a, s in sites]) for m, test, low, high in PAPER_EDITS],
                ("occlusion: IO minus S names with a latent (F1 ≥ 0.5)", 1, np.inf,
                 [io - s for io, s in names]),
                ("α sweep: S names with a latent gained", 1, np.inf, gain[SWEEP[1]]),
                ("α sweep: IO names with a latent gained", -np.inf, -1, gain[SWEEP[0]]),
                ("over-splitting: latents interpreted as a Pos value", 10, np.inf,
                 [r["value"] for r in self.find("pos_latents", phenomenon="oversplitting")
                  if r["method"] in ARCHS]),  # trained SAEs: the frozen random decoder is a floor
                (f"toy: share of the {_fmt(counted, '.0f')} λ counted that the random SAE wins", 0.95, 1,
                 [won]),
                *[(f"{p}: testable in the model (1: yes)", 1, 1,
                   [self.at("phenomenon_testable", phenomenon=p)]) for p in ("occlusion", "oversplitting")]]
        table = [(quantity, *_against_paper(low, high, ours)) for quantity, low, high, values in rows
                 for ours in [[value for value in values if value is not None]] if ours]
        return [_table(table, ["quantity", "paper", "this run", "verdict"])] if table else []

    def control(self):
        """Per headline site, edit accuracy at k = 2 against the weight removed (dashed: no edit), and
        against the latents a greedy edit changes (a supervised edit swaps one feature whatever k: a line)."""
        records = self.find(EDIT[0])
        methods, ks = _keys(records, "method"), sorted({r["k"] for r in records if r.get("k") is not None})
        saes, panels = [m for m in methods if not m.startswith("supervised")], []
        accuracy = {"ylabel": "edit accuracy", "ylim": (0, 1.1)}
        by_k = {"xlabel": "latents changed", "xscale": "log", "xticks": ks, "xticklabels": ks, **accuracy}
        for a, s in self.headline:
            at_2 = {m: [(self.edit(EDIT[1], s, m, a), self.edit(EDIT[0], s, m, a))] for m in methods}
            over_k = {m: [(self.edit("latents_changed", s, m, a, k), self.edit(EDIT[0], s, m, a, k))
                          for k in ks] for m in saes}
            panels += [(f"edit {a} @ {s}", at_2, {"xlabel": "weight removed", **accuracy},
                        [("axhline", self.edit(NO_EDIT, s, "none", a), "no edit")]),
                       (f"edit {a} @ {s}, k = {', '.join(map(str, ks))}", over_k, by_k,
                        [("axhline", self.edit(EDIT[0], s, m, a), m) for m in methods if m not in saes])]
        return self.figure("control_headline.png", panels)

    def oversplit_toy(self):
        """The toy's best loss per SAE against λ (paper's grid), marked where the ideal SAE stops firing."""
        fired = max([r["l1"] for r in self.find("oversplit_toy_loss", method="ideal_2_latent", grid="paper")
                     if r["firing"] >= 0.02], default=None)
        return self.pivot(None, ("oversplit_toy_loss",), ("l1",), "method", plot="oversplit_toy.png",
                          marks=[("axvline", fired, "ideal SAE fires on < 2% beyond")], grid="paper")

    def markdown(self):
        c = self.config
        changes = ([] if c.get("weights") else ["a small IOI model instead of GPT-2 Small"]) + [
            f"{key} = {c[key]} instead of {paper}" for key, paper in PAPER_SCALE.items()
            if c.get(key) is not None and c[key] != paper]
        blocks = ["# Supervised dictionaries vs sparse autoencoders on IOI",
                  "Makelov, Lange & Nanda, *Towards Principled Evaluations of Sparse Autoencoders for "
                  "Interpretability and Control* (arXiv 2405.08366), reproduced; README §1-§9 define every "
                  "quantity, [Reading the report](README.md#reading-the-report) says what to look for."
                  + (f" Scaled down to run on a CPU: {'; '.join(changes)}." if changes else ""),
                  _table([(key, json.dumps(value)) for key, value in c.items()], ["setting", "value"]),
                  "## At a glance", self.summary()]
        for heading, parts in REPORT_SECTIONS.items():
            body = [block for part in parts for block in (
                self.pivot(**part) if isinstance(part, dict) else getattr(self, part[0])(*part[1:]))]
            if body or "grade-sae" not in heading:  # §10 only where an SAE from elsewhere was graded
                blocks += [heading] + (body or ["_Nothing in metrics.json here; section skipped._"])
        return "\n\n".join(blocks) + "\n"


def write_report(run_dir) -> str:
    """Write <run_dir>/report.md and figures/*.png from its metrics.json; return the terminal summary.
    The whole report is rendered before anything is written, and each file is written atomically."""
    path = os.path.join(run_dir, "metrics.json")
    try:  # not JSON, or a field missing or of the wrong kind wherever a section reads it: one line
        report = Report(path)
        markdown = report.markdown()
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise click.ClickException(f"{path}: malformed metrics.json ({type(e).__name__}: {e})")
    os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
    for name, fig in report.figures.items():
        atomic_write(os.path.join(run_dir, "figures", name),
                     lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    atomic_write(os.path.join(run_dir, "report.md"), lambda tmp: Path(tmp).write_text(markdown))
    return report.summary()


@cli.command()
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder holding metrics.json.")
def report(run_dir):
    """Write report.md and figures/ from RUN_DIR/metrics.json and print a summary."""
    click.echo(write_report(run_dir))
    click.echo(f"Wrote {os.path.join(run_dir, 'report.md')}")
# === end report ===


# === plumbing: atomic saves and the one cache ===

def atomic_write(path, write, folder=False):
    """Call write(PATH.tmp), then rename it to `path`; return what `write` returns. A file or folder is then
    wholly old or wholly new: the old one waits at PATH.old; `recover_interrupted_save` undoes a kill."""
    path = os.path.normpath(path)
    recover_interrupted_save(path)
    try:
        if folder:
            os.makedirs(path + ".tmp")
        result = write(path + ".tmp")
        if os.path.exists(path):
            os.rename(path, path + ".old")
        os.rename(path + ".tmp", path)
    finally:
        recover_interrupted_save(path)
    return result


def write_json(path, data):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1)))


def read_json(path):
    return json.loads(Path(path).read_text())


def atomic_folder(path, write):
    """`atomic_write` of a multi-file artefact: write(tmp) fills a fresh folder."""
    return atomic_write(path, write, folder=True)


def cached(folder, key, build, load):
    """The project's one cache: load(folder) if `folder` was built from `key` (JSON of all the result
    depends on); else build(tmp) fills a fresh folder that replaces it. A stale result is never reused."""
    key = json.loads(json.dumps(key))  # as key.json reads back: tuples become lists
    stamp = os.path.join(folder, "key.json")
    if not (os.path.exists(stamp) and read_json(stamp) == key):
        def write(tmp):
            build(tmp)
            write_json(os.path.join(tmp, "key.json"), key)  # last: it marks the folder complete
        atomic_folder(folder, write)
    return load(folder)


def recover_interrupted_save(path):
    """Undo a killed `atomic_write` of `path`: the old version comes back if the new one never replaced it."""
    path = os.path.normpath(path)
    if os.path.exists(path + ".old") and not os.path.exists(path):
        os.rename(path + ".old", path)
    for leftover in (path + ".tmp", path + ".old"):
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            os.remove(leftover)


def recover_interrupted_saves(out):
    """Undo every save a killed run left unfinished in its folder `out` (in what a run writes only)."""
    for name in ("config.json", "metrics.json", "report.md"):
        recover_interrupted_save(os.path.join(out, name))
    for folder in ("activations", "dictionaries", "saes", "grades", "figures"):
        for root, dirs, files in os.walk(os.path.join(out, folder)):  # parents first
            for name in dirs + files:
                if name.endswith((".tmp", ".old")):
                    recover_interrupted_save(os.path.join(root, os.path.splitext(name)[0]))


def collect_activations(cache_dir, model, prompts, nodes, batch_size):
    """`ioi.collect_activations`, cached in `cache_dir` under a hash of the weights, prompts and nodes."""
    nodes = list(dict.fromkeys(nodes))
    key = {"weights": gpt2.weights_hash(model), "prompts": ioi.prompts_fingerprint(prompts),
           "nodes": [str(node) for node in nodes]}

    def build(tmp):
        activations = ioi.collect_activations(model, prompts, nodes, batch_size)
        dictionaries.save_tensors({str(node): acts for node, acts in activations.items()},
                                  os.path.join(tmp, "activations.safetensors"))
    folder = os.path.join(cache_dir, hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16])
    tensors = cached(folder, key, build, lambda tmp: load_file(os.path.join(tmp, "activations.safetensors")))
    return {node: tensors[str(node)] for node in nodes}


if __name__ == "__main__":
    cli()
