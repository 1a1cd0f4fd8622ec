"""Command-line interface: one subcommand per step of the pipeline, plus `demo` and `run`.

Follows the order of Makelov, Lange & Nanda (arXiv 2405.08366): a model solves IOI,
we collect activations at circuit nodes, fit supervised dictionaries and SAEs, grade
them on approximation, control and interpretability, and write a report.
Where to start: `demo`, then `open_run`, `Run` and `evaluate_run`; the report is `Report`.
"""
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import click
import numpy as np
import torch

import dictionaries
import gpt2
import ioi
import metrics


class OneLineErrors(click.Group):
    """The command group. Every failure a user can cause ends as one line `Error: ...` and a
    non-zero exit, never a traceback: a bad option without click's usage block (exit 2), a
    path that cannot be read or written with its name (OSError, caught here once for all)."""

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


@click.group(cls=OneLineErrors)
def cli():
    """Grade sparse autoencoders against supervised dictionaries on IOI (arXiv 2405.08366)."""


# === option types: every option is checked before any work or write ===

class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (click's FloatRange lets nan through:
    every comparison with nan is false)."""
    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class Device(click.ParamType):
    """A device torch can compute on, on this machine."""
    name = "device"

    def convert(self, value, param, ctx):
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            self.fail(f"{value!r} is not a device (cpu, cuda, cuda:N or mps)", param, ctx)
        if device.type == "cuda" and not torch.cuda.is_available():
            self.fail(f"{value}: CUDA is not available on this machine", param, ctx)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            self.fail(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)", param, ctx)
        if device.type == "mps" and not torch.backends.mps.is_available():
            self.fail(f"{value}: MPS is not available on this machine", param, ctx)
        if device.type not in ("cpu", "cuda", "mps"):
            self.fail(f"{value}: unsupported device type (cpu, cuda, cuda:N or mps)", param, ctx)
        return value


SEED = click.IntRange(0, 2**32 - 1)  # numpy refuses negative seeds
DEVICE_OPTION = click.option("--device", type=Device(), default="cpu", show_default=True,
                             help="cpu, cuda, cuda:N or mps.")


def output_folder(marker=None):
    """click callback for --out: a folder that can be created or written, checked before any
    work. A save replaces the whole folder (gpt2.atomic_folder), so an existing non-empty one
    is accepted only if it holds `marker`, the completion file of an artefact of the same
    kind: a user's own files are never swept away."""
    def check(ctx, param, value):
        path = os.path.abspath(value)
        if os.path.exists(path) and not os.path.isdir(path):
            raise click.BadParameter(f"{value} is a file, not a folder", ctx, param)
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise click.BadParameter(f"{value} cannot be created: {parent} is a file", ctx, param)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise click.BadParameter(f"{parent} is not writable", ctx, param)
        others = marker and os.path.isdir(path) and os.listdir(path)
        if others and not os.path.isfile(os.path.join(path, marker)):
            raise click.BadParameter(f"{value} holds other files (no {marker}): choose a new or empty folder",
                                     ctx, param)
        return value
    return check


# === gpt2 commands (download, generate; bench is at the end) ===

GPT2_SMALL_URL = "https://huggingface.co/openai-community/gpt2/resolve/main"


def _fetch(url, path):
    """Stream `url` into `path` with a progress bar; returns the sha256 of what was written."""
    import http.client
    import urllib.error
    import urllib.request
    digest, written = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:
            size = int(response.headers.get("Content-Length") or 0)
            # Outside a terminal a bar is only its label: a log keeps just the summary or the error.
            with click.progressbar(length=size, label=os.path.basename(url),
                                   hidden=not sys.stdout.isatty()) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise click.ClickException(f"{url}: HTTP {error.code} {error.reason}") from None
    # unreachable, no such file, timeout, cut off (OSError, HTTPException); not a URL at all (ValueError)
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise click.ClickException(f"{url}: {getattr(error, 'reason', error)}") from None
    if size and written != size:
        raise click.ClickException(f"{url}: connection closed after {written} of {size} bytes")
    return digest.hexdigest()


def _sha256_option(ctx, param, value):
    if value is not None and not re.fullmatch("[0-9a-fA-F]{64}", value):
        raise click.BadParameter(f"{value!r} is not a sha256 (64 hexadecimal digits)", ctx, param)
    return value


@cli.command("download")
@click.option("--url", default=GPT2_SMALL_URL, show_default=True,
              help="Base URL holding model.safetensors and config.json (file:// works too).")
@click.option("--out", default=os.path.join("models", "gpt2"), show_default=True,
              callback=output_folder("config.json"), help="Folder to write them to.")
@click.option("--sha256", default=None, callback=_sha256_option, help="Expected sha256 of model.safetensors.")
def download_command(url, out, sha256):
    """Fetch GPT-2 Small's weights and config (Hugging Face layout) and check that they load.

    Both files go to a temporary folder that replaces --out only once they load (and the
    hash matches), so a failed download never leaves a file that looks usable, and never
    costs the model already in --out.
    """
    def fetch_and_check(folder):
        digests = {name: _fetch(f"{url.rstrip('/')}/{name}", os.path.join(folder, name))
                   for name in ("config.json", "model.safetensors")}
        if sha256 and digests["model.safetensors"] != sha256.lower():
            raise click.ClickException(f"{url.rstrip('/')}/model.safetensors: sha256 "
                                       f"{digests['model.safetensors']} does not match the expected {sha256}")
        try:
            return gpt2.GPT2.from_pretrained(folder), digests["model.safetensors"]
        except ValueError as error:  # named by where they came from, not by the temporary folder
            message = str(error).replace(os.path.join(folder, ""), url.rstrip("/") + "/")
            raise click.ClickException(f"downloaded files do not load: {message}") from None

    model, digest = gpt2.atomic_folder(out, fetch_and_check)
    n_params = sum(p.numel() for p in model.parameters())
    click.echo(f"{out}: GPT-2 with {n_params / 1e6:.1f}M parameters, {model.config.n_layer} layers, "
               f"loads fine (model.safetensors sha256 {digest})")


@cli.command("generate")
@click.option("--weights", default=None,
              help="GPT-2 checkpoint (dir or .safetensors); default: the embedded model.")
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
        raise click.ClickException(f"the model's vocabulary ({model.config.vocab_size}) "
                                   "is smaller than GPT-2's")
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = gpt2.generate_tokens(model, prompt_tokens, n_tokens, temperature, generator)
    click.echo(prompt + tokenizer.decode(tokens[0, prompt_tokens.shape[1]:].tolist()))


# === ioi commands (build-model, ioi-eval, nodes) ===

WEIGHTS_HELP = "GPT-2 checkpoint (dir or .safetensors); default: the embedded IOI model."
# The circuit of a model other than GPT-2 Small is found on prompts of its own: a fixed set,
# apart from the training and evaluation prompts, so the graded circuit never depends on
# --n-eval or --seed (README, "What the demo shows, and how it is scaled down").
DISCOVERY_N, DISCOVERY_SEED = 200, 1000


def discovery_prompts(n=DISCOVERY_N, seed=DISCOVERY_SEED):
    """Evaluation-style prompts (the first half of the names) that `ioi.discover` finds heads with."""
    return ioi.eval_prompts(n, seed=seed)


@cli.command("build-model")
@click.option("--out", default=os.path.join("models", "ioi-circuit"), show_default=True,
              callback=output_folder("circuit_config.json"), help="Folder to save it in.")
@click.option("--seed", type=SEED, default=ioi.CircuitConfig.seed, show_default=True,
              help="Seed of its random name codes and residual basis.")
def build_model_command(out, seed):
    """Save the embedded IOI model (GPT-2's circuit written by hand) in Hugging Face's layout."""
    config = ioi.CircuitConfig(seed=seed)
    model = ioi.build_ioi_model(config)

    def write(folder):  # into a temporary folder, renamed to `out` once complete
        model.save_pretrained(folder)
        # last: its presence marks a complete save
        gpt2.write_json(os.path.join(folder, "circuit_config.json"), asdict(config))
    gpt2.atomic_folder(out, write)
    scores = ioi.evaluate(model, ioi.held_out_prompts(1000))
    click.echo(f"held-out prompts: accuracy {scores['accuracy']:.1%}, top-1 {scores['top1_accuracy']:.1%}, "
               f"mean LD {scores['mean_logit_diff']:.2f}; saved to {out}")


@cli.command("ioi-eval")
@click.option("--weights", default=None, help=WEIGHTS_HELP)
@click.option("--n", type=click.IntRange(min=1), default=1000, show_default=True, help="Number of prompts.")
@click.option("--seed", type=SEED, default=1, show_default=True, help="Seed of the prompt sampler.")
@click.option("--held-out", is_flag=True,
              help="Templates, objects and places kept out of the training prompts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@DEVICE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def ioi_eval_command(weights, n, seed, held_out, batch_size, device, as_json):
    """How well a model does IOI: logit difference, accuracy, top-1, P(IO), per template."""
    model = load_model(weights, device)
    prompts = ioi.held_out_prompts(n, seed) if held_out else ioi.eval_prompts(n, seed)
    check_reads_prompts(model, prompts)
    start = time.time()
    result = ioi.evaluate(model, prompts, batch_size)
    result["prompts_per_s"] = n / (time.time() - start)
    if as_json:
        click.echo(json.dumps(result))
        return
    kind = "held-out" if held_out else "evaluation"
    click.echo(f"{n} {kind} prompts, {result['prompts_per_s']:.0f} prompts/s")
    click.echo(f"{'template':>8} {'n':>6} {'mean LD':>8} {'accuracy':>9} {'top-1':>7} {'P(IO)':>6}")
    rows = [(str(t), r, ioi.TEMPLATES[t] + (" (held out)" if t in ioi.HELD_OUT_TEMPLATES else ""))
            for t, r in result["per_template"].items()] + [("all", result, "")]
    for label, r, text in rows:
        click.echo(f"{label:>8} {r['n']:>6} {r['mean_logit_diff']:>8.2f} {r['accuracy']:>9.1%} "
                   f"{r['top1_accuracy']:>7.1%} {r['io_prob']:>6.2f}  {text}")


@cli.command("nodes")
@click.option("--weights", default=None, help=WEIGHTS_HELP)
@click.option("--n", type=click.IntRange(min=1), default=DISCOVERY_N, show_default=True,
              help="Prompts used to find the heads (models other than GPT-2 Small).")
@click.option("--seed", type=SEED, default=DISCOVERY_SEED, show_default=True)
def nodes_command(weights, n, seed):
    """The circuit's nodes and cross-sections: known for GPT-2 Small, found for other models
    (by default on the prompts the pipeline finds its circuit with)."""
    model, prompts = load_model(weights), discovery_prompts(n, seed)
    check_reads_prompts(model, prompts)
    sections, table = ioi.circuit_cross_sections(model, prompts)
    if table["heads"]:
        click.echo("Heads found, each class by its own measure (>= 1/3 of the strongest head's, "
                   ">= 2% of the LD):\nname movers by direct effect on the LD; S-inhibition by the LD drop "
                   "through the name movers'\nqueries when their z at end is mean-ablated; induction/"
                   "duplicate token by the drop at s2.")
        header = ("head", "at", "direct", "via q", "LD drop", "(of LD)", "role")
        for row in [header, *_circuit_rows(table["heads"])]:
            click.echo("  {:>7} {:<4} {:>7} {:>7} {:>8} {:>8}  {}".format(*row))
        click.echo("Cross-sections are kept if mean-ablating all their nodes at once moves the LD by >= 5%:")
        for row in table["sections"]:
            click.echo(f"  {row['section']:>12} LD drop {row['ld_drop']:>8.3f} ({row['fraction']:.1%})  "
                       f"{'kept' if row['kept'] else 'dropped: not causal in this model'}")
    else:
        click.echo("GPT-2 Small: head classes of Wang et al. (2022)")
        for role, heads in ioi.GPT2_SMALL_HEADS.items():
            click.echo(f"  {role:>20}: " + " ".join(f"{layer}.{head}" for layer, head in heads))
    for section in sections:
        nodes = " ".join(str(node) for node in section.nodes)
        click.echo(f"{section.name} (edits {', '.join(section.attributes)}): {nodes}")


def _circuit_rows(heads):
    """Rows (head, position, direct effect, effect via queries, LD drop, fraction, role) of the
    heads `ioi.discover` gave a role, strongest first; measures not taken are a dash."""
    def fmt(value, spec=".2f"):
        return "–" if value is None else format(value, spec)
    roles = ["name mover", "S-inhibition", "induction/duplicate token"]  # the circuit, from the logits back
    found = sorted((row for row in heads if row["role"]), key=lambda row: (
        roles.index(row["role"]) if row["role"] in roles else len(roles), -abs(row["ld_drop"] or 0)))
    return [(row["head"], row["position"], fmt(row["direct_effect"]), fmt(row["query_effect"]),
             fmt(row["ld_drop"]), fmt(row["fraction"], ".1%"), row["role"]) for row in found]


# === dictionaries commands (train-sae, supervised) ===

@cli.command("train-sae")
@click.option("--acts", "acts_path", required=True, help="safetensors file with an `acts` tensor [N, d].")
@click.option("--arch", type=click.Choice(["vanilla", "gated", "topk", "random_decoder"]), required=True,
              help="random_decoder: vanilla encoder over a frozen random unit decoder (the paper's floor).")
@click.option("--latents", type=click.IntRange(min=1), default=512, show_default=True,
              help="Dictionary size d_sae.")
@click.option("--l1", type=FiniteFloat(min=0),
              help="Sparsity coefficient λ on inputs scaled to mean norm √d  "
                   "[default: 1 vanilla, 2.5 gated].")
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Latents kept per input (topk).")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Passes over the data  [default: enough for about 6000 steps, at most 2000 epochs].")
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
              help="Adam learning rate (the paper's v1 value; its revised 3e-4 needs many more steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", required=True, callback=output_folder("cfg.json"),
              help="Folder for the SAE (SAELens layout: cfg.json + sae_weights.safetensors).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_sae_command(acts_path, arch, latents, l1, k, epochs, lr, batch_size, seed, out, no_progress):
    """Train one SAE on an activations file and save it in the SAELens layout."""
    l1 = {"gated": 2.5}.get(arch, 1.0) if l1 is None else l1  # gated penalises the gate, which needs more
    try:
        acts = dictionaries.load_activations(acts_path)
        steps_per_epoch = -(-len(acts) // batch_size)
        config = dictionaries.TrainConfig(d_sae=latents, lr=lr, batch_size=batch_size,
                                          epochs=epochs or min(2000, -(-6000 // steps_per_epoch)))
        spec = dictionaries.SAESpec("vanilla" if arch == "random_decoder" else arch, l1_coefficient=l1, k=k,
                                    seed=seed, frozen_decoder=arch == "random_decoder", name=arch)
        sae, logs = dictionaries.train_sae(acts, spec, config, progress=not no_progress)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    gpt2.atomic_folder(out, lambda folder: dictionaries.save_sae(sae, folder))
    final = logs[-1]
    click.echo(f"{arch} SAE {acts.shape[1]}->{latents}, {config.epochs} epochs: l0 {final['l0']:.2f}  "
               f"mse {final['mse']:.4g}  fve {final['fve']:.4f}  dead {final['dead_fraction']:.3f}  -> {out}")


@cli.command("fit-supervised")
@click.option("--acts", "acts_path", required=True,
              help="safetensors file: `acts` [N, d] and one LongTensor `attribute.<name>` [N] per attribute.")
@click.option("--method", type=click.Choice(["mean", "lstsq"]), default="mean", show_default=True)
@click.option("--out", required=True, callback=output_folder("dictionary.json"),
              help="Folder for the dictionary.")
def supervised_command(acts_path, method, out):
    """Fit a supervised dictionary (arXiv 2405.08366) to an activations file with known attribute values."""
    try:
        acts, attributes = dictionaries.load_labelled_activations(acts_path)
        dictionary = dictionaries.SupervisedDictionary.fit(acts, attributes, method=method)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    gpt2.atomic_folder(out, dictionary.save)
    residual = acts - dictionary.reconstruct(attributes)
    fve = 1 - residual.pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    sizes = ", ".join(f"{name} {len(u)}" for name, u in dictionary.features.items())
    click.echo(f"{method} dictionary ({sizes} values): fraction of variance explained {fve:.4f} -> {out}")


# === pipeline commands (collect, supervised, train-saes, run, demo, grade-sae) ===

ARCHS = ("vanilla", "gated", "topk")


@dataclass
class RunConfig:
    """Every setting of one run; saved as config.json in the run folder.

    Defaults are the paper's (README §2 and §8, revised version); `DEMO` scales them down
    so the whole pipeline runs on two CPU cores in minutes.
    """
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

    @classmethod
    def load(cls, path):
        """The settings in a run folder's config.json, each checked by its option type: a
        corrupt file is a one-line error, and is never overwritten."""
        def refused(problem):
            return click.ClickException(f"{path}: {problem}")
        try:
            saved = gpt2.read_json(path)
        except ValueError as error:  # malformed JSON, or not text
            raise refused(f"not valid JSON ({error})") from None
        if not isinstance(saved, dict):
            raise refused(f"expected a JSON object of settings, got {type(saved).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = set(saved) - names, names - set(saved)
        problems = [f"{label} settings {', '.join(sorted(keys))}"
                    for label, keys in (("unknown", unknown), ("missing", missing)) if keys]
        if problems:
            raise refused("; ".join(problems))
        try:
            config = cls(**{f.name: _checked_setting(f, saved[f.name]) for f in fields(cls)})
        except click.BadParameter as error:
            raise refused(error.message) from None
        if max(config.topk_k) > config.d_sae or config.corpus_k > config.corpus_d_sae:
            raise refused("a top-k SAE's k exceeds its number of latents")
        return config


# How config.json's numeric settings are checked, where not as positive integers.
SETTING_TYPES = {"n_train": click.IntRange(min=10), "n_eval": click.IntRange(min=10), "seed": SEED,
                 **dict.fromkeys(("sae_lr", "corpus_lr"), FiniteFloat(min=0, min_open=True)),
                 "sae_plateau": FiniteFloat(min=0, max=1), "occlusion_alphas": FiniteFloat(),
                 "f1_thresholds": FiniteFloat(), "sae_resamples": click.IntRange(min=0),
                 **dict.fromkeys(("vanilla_l1", "gated_l1", "corpus_l1"), FiniteFloat(min=0))}


def _checked_setting(field, value):
    """`value` as the RunConfig setting `field`, or a click.BadParameter naming it: a path or
    null (weights, corpus), a string (device), else numbers of the type in SETTING_TYPES."""
    if field.name == "skip_sections":
        if isinstance(value, list) and all(isinstance(name, str) for name in value):
            return tuple(value)
        raise click.BadParameter(f"{field.name}: {value!r} is not a list of cross-section names")
    if field.name in ("weights", "corpus", "device"):
        if isinstance(value, str) or value is None and field.name != "device":
            return value
        expected = "a string" if field.name == "device" else "a path or null"
        raise click.BadParameter(f"{field.name}: {value!r} is not {expected}")
    kind = SETTING_TYPES.get(field.name, click.IntRange(min=1))
    number = int if isinstance(kind, click.IntRange) else (int, float)

    def convert(item):  # JSON has types: click alone would also take "12", 12.7 or true for an integer
        if isinstance(item, bool) or not isinstance(item, number):
            raise click.BadParameter(f"{item!r} is not {'an integer' if number is int else 'a number'}")
        return kind.convert(item, None, None)
    try:
        if isinstance(field.default, tuple):
            if not isinstance(value, list) or not value:
                raise click.BadParameter(f"{value!r} is not a non-empty list")
            return tuple(convert(item) for item in value)
        return convert(value)
    except click.BadParameter as error:
        raise click.BadParameter(f"{field.name}: {error.message}") from None


# The demo: one setting per architecture, SAEs trained to convergence (README, "What the demo shows").
# At lr 1e-2 with one resampling, SAEs of the embedded model converge 3-4x sooner than at 3e-3 with
# four, and to a lower loss (e.g. v@L2H0@s2: vanilla 171 epochs, loss 6.76 against 1,000 epochs
# unconverged, 6.89; gated 202 epochs, 9.53 against 643, 9.72 with one resampling at 3e-3).
# (B)NM qk is skipped: on this model it is uninformative (the keys' positions move with the
# patch, so no-intervention edit accuracy is 1.00) and holds half the nodes.
DEMO = RunConfig(n_train=5_000, n_eval=500, epochs=1000, sae_lr=1e-2, sae_resamples=1, vanilla_l1=(1.0,),
                 gated_l1=(1.0,), topk_k=(3,), edit_k=(2, 4, 8), corpus_tokens=20_000, corpus_d_sae=512,
                 corpus_epochs=10, corpus_lr=3e-3, skip_sections=("(B)NM qk",))


def load_model(weights, device="cpu"):
    """GPT-2 weights from `weights`, or the embedded small IOI model when it is None."""
    try:
        model = ioi.default_model() if weights is None else gpt2.GPT2.from_pretrained(weights)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    return model.to(device).eval()


def check_reads_prompts(model, prompts):
    """A one-line error unless `model` can read every prompt: GPT-2's whole vocabulary (IOI
    prompts and corpus text are GPT-2 tokens) and positions up to the longest prompt."""
    if model.config.vocab_size <= gpt2.BOS_TOKEN_ID:
        raise click.ClickException(f"the model's vocabulary ({model.config.vocab_size} tokens) is smaller "
                                   f"than GPT-2's ({gpt2.BOS_TOKEN_ID + 1}), whose tokens make the prompts")
    longest = max(len(prompt.tokens) for prompt in prompts)
    if longest > model.config.n_positions:
        raise click.ClickException(f"the model reads at most {model.config.n_positions} tokens "
                                   f"(n_positions), but a prompt has {longest}")


def make_splits(config):
    """Prompt sets (README §2, revised code): train over all names; eval over the first half,
    and one counterfactual of every eval prompt per attribute with names from the second."""
    train = ioi.train_prompts(config.n_train, seed=config.seed)
    evaluation = ioi.eval_prompts(config.n_eval, seed=config.seed + 1)
    return {"train": train, "eval": evaluation,
            **{f"cf_{attribute}": ioi.counterfactuals(evaluation, attribute, seed=config.seed + 2 + i)
               for i, attribute in enumerate(ioi.ATTRIBUTES)}}


def train_or_load_stack(folder, datasets, specs, train_config, device="cpu", progress=True):
    """SAEs one per spec trained on `datasets` as one batched stack, cached in `folder`
    (`gpt2.cached`, keyed by the data, specs and training). Returns (saes, logs).
    A stack trains in groups of `max_stack` SAEs, one after another; until the whole stack is
    saved, each finished group is cached in <folder>.parts, so a killed run redoes one group at most.
    The SAEs returned are always the saved ones (input scale folded into the weights, README §8),
    so a run that resumes grades exactly the SAEs an uninterrupted run grades. `device`: where the
    stack trains (datasets stay on the CPU; the SAEs come back there)."""
    key = {"datasets": hashlib.sha256(datasets.numpy().tobytes()).hexdigest()[:16],
           "specs": [asdict(spec) for spec in specs], "train": asdict(train_config)}
    parts, group = f"{folder}.parts", train_config.max_stack or len(specs)

    def train(tmp):
        if len(specs) <= group:
            saes, logs = dictionaries.train_sae_stack(datasets.to(device), specs, train_config,
                                                      progress=progress)
        else:  # the same SAEs as one call (the groups train independently), resumable group by group
            saes, logs = [], []
            with click.progressbar(range(0, len(specs), group), show_eta=True, hidden=not progress,
                                   label=f"{len(specs)} {specs[0].arch} SAEs, {group} at a time") as offsets:
                for offset in offsets:
                    trained, group_logs = train_or_load_stack(os.path.join(parts, str(offset)), datasets,
                                                              specs[offset:offset + group], train_config,
                                                              device, progress=False)
                    saes += trained
                    logs += [{**log, "sae": log["sae"] + offset} for log in group_logs]
        for spec, sae in zip(specs, saes):
            dictionaries.save_sae(sae.to("cpu"), os.path.join(tmp, spec.name))
        gpt2.write_json(os.path.join(tmp, "logs.json"), logs)

    def load(saved):
        return ([dictionaries.load_sae(os.path.join(saved, spec.name)) for spec in specs],
                gpt2.read_json(os.path.join(saved, "logs.json")))
    saes_and_logs = gpt2.cached(folder, key, train, load)
    shutil.rmtree(parts, ignore_errors=True)  # the whole stack is saved: its groups are not needed
    return saes_and_logs


def architecture(method):
    """The SAE architecture behind a task-SAE method: the random-decoder floor is a vanilla SAE."""
    return "vanilla" if method == "random_decoder" else method


class Run:
    """One run folder: the model, prompts, circuit and activations, built step by step.

    Each step caches its result under the folder (activations, dictionaries, SAEs), keyed
    by what produced it, so an interrupted run resumes and a changed setting recomputes.
    `circuit` = (cross-sections, discovery table) grades a given circuit instead of finding one;
    `eta`: print how long the whole run will take (`estimate_seconds`) before the work starts.
    """

    def __init__(self, out, config, circuit=None, eta=False):
        self.out, self.config, self.started = out, config, time.time()
        self.model = load_model(config.weights, config.device)
        self.splits = make_splits(config)
        found_with = discovery_prompts()  # not the evaluation prompts: see DISCOVERY_N
        check_reads_prompts(self.model, [p for split in [found_with, *self.splits.values()] for p in split])
        self.attributes = {split: ioi.attribute_ids(prompts) for split, prompts in self.splits.items()}
        if circuit is None:
            click.echo("Finding the circuit ...")
        found, self.discovery = circuit or ioi.circuit_cross_sections(self.model, found_with,
                                                                       config.batch_size)
        if not found:
            raise click.ClickException("no cross-section found: the model does not seem to solve IOI")
        self.sections = [s for s in found if s.name not in config.skip_sections]
        self.skipped = [s.name for s in found if s.name in config.skip_sections]
        if self.skipped:
            click.echo(f"Not graded (skip_sections): {', '.join(self.skipped)}")
        if not self.sections:
            raise click.ClickException(f"every cross-section found is in skip_sections "
                                       f"{config.skip_sections}")
        self.nodes = list(dict.fromkeys(node for section in self.sections for node in section.nodes))
        click.echo(f"{len(self.sections)} cross-sections, {len(self.nodes)} nodes")
        if eta:
            click.echo(eta_text(estimate_seconds(self)))
        self.acts = {split: {} for split in self.splits}
        self.add_nodes(self.nodes)
        # Last: the folder is bound to these settings only once they have produced its
        # activations, so a run that fails to start neither leaves nor changes config.json.
        os.makedirs(out, exist_ok=True)
        gpt2.write_json(os.path.join(out, "config.json"), asdict(config))

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def add_nodes(self, nodes):
        """Collect (or load from the cache) activations at more nodes, in every split: the run's
        own, then those an SAE from elsewhere reads (`grade-sae`)."""
        new = [node for node in nodes if node not in self.acts["train"]]
        for split, prompts in self.splits.items() if new else ():
            self.acts[split].update(ioi.collect_activations(self.model, prompts, new, self.config.batch_size,
                                                            cache_dir=self.path("activations")))

    def task(self):
        """The model on the evaluation prompts, as every test runs it."""
        return metrics.Task(self.model, self.splits["eval"], self.config.batch_size)

    def fit_supervised(self, nodes=None):
        """Mean and least-squares supervised dictionaries at every node (README §4), or at `nodes`."""
        n_values = {"io": len(ioi.NAMES), "s": len(ioi.NAMES), "pos": len(ioi.PATTERNS)}
        fit = dictionaries.SupervisedDictionary.fit
        fitted = {name: {node: fit(self.acts["train"][node], self.attributes["train"], n_values, method)
                         for node in nodes or self.nodes}
                  for method, name in (("mean", "supervised"), ("lstsq", "supervised_lstsq"))}

        def save(by_node, folder):
            for node, dictionary in by_node.items():
                dictionary.save(os.path.join(folder, str(node)))
        # the run's own dictionaries are kept; ones fitted for another SAE's nodes are not
        for name, by_node in fitted.items() if nodes is None else ():
            gpt2.atomic_folder(self.path("dictionaries", name), lambda folder: save(by_node, folder))
        return fitted

    def train_task_saes(self):
        """({method: {setting: {node: SAE}}}, {(method, setting, node): its last training log}) for
        every architecture and hyper-parameter (README §8), plus the frozen-random-decoder floor;
        all nodes x settings of one architecture train as one batched stack."""
        c, n, saes, training = self.config, len(self.nodes), {}, {}
        datasets = torch.stack([self.acts["train"][node] for node in self.nodes])  # [node, N, d_head]
        for method, grid in self.sae_grids().items():
            arch = architecture(method)
            specs = [dictionaries.SAESpec(arch, i, seed=c.seed + j, frozen_decoder=method == "random_decoder",
                                          name=f"{name.removesuffix('_coefficient')}{value}/{node}",
                                          **{name: value})
                     for j, (name, value) in enumerate(grid) for i, node in enumerate(self.nodes)]
            trained, logs = train_or_load_stack(self.path("saes", method), datasets, specs,
                                                self.sae_train_config(), c.device)
            final = {log["sae"]: log for log in logs}  # the last log of each SAE: how its training ended
            saes[method] = {value: dict(zip(self.nodes, trained[j * n:(j + 1) * n]))
                            for j, (_, value) in enumerate(grid)}
            training.update({(method, value, node): final[j * n + i]
                             for j, (_, value) in enumerate(grid) for i, node in enumerate(self.nodes)})
        return saes, training

    def sae_grids(self):
        """{method: [(SAESpec field, value)]}: the task SAEs' settings; folders l1<value>/, k<value>/."""
        c, l1 = self.config, "l1_coefficient"
        return {"vanilla": [(l1, v) for v in c.vanilla_l1], "gated": [(l1, v) for v in c.gated_l1],
                "topk": [("k", k) for k in c.topk_k],
                "random_decoder": [(l1, c.vanilla_l1[len(c.vanilla_l1) // 2])]}

    def sae_train_config(self):
        """Task SAEs (and the phenomena's SAEs) train until they converge, capped at `epochs`."""
        c = self.config
        resample_at = dictionaries.TrainConfig.resample_at[:c.sae_resamples]  # (fixed schedule: when)
        return dictionaries.TrainConfig(d_sae=c.d_sae, epochs=c.epochs, lr=c.sae_lr, resample_at=resample_at,
                                        plateau=c.sae_plateau or None)

    def train_corpus_saes(self):
        """{f"{arch}_fulldist": {node: SAE}}: SAEs trained on every token position of generic text."""
        c = self.config
        heads = list(dict.fromkeys((node.hook_name, node.head) for node in self.nodes))
        click.echo(f"Collecting {c.corpus_tokens} corpus activations at {len(heads)} (hook, head) pairs ...")
        texts = dictionaries.iter_corpus_texts(c.corpus)
        corpus = dictionaries.collect_corpus_activations(self.model, gpt2.load_tokenizer(), heads, texts,
                                                         c.corpus_tokens,
                                                         context=min(128, self.model.config.n_positions))
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


# --- how long a run will take: counted work times a short calibration on this machine

CAPPED_PHASE = "task SAEs, at the epoch cap"  # the one phase whose length is not known in advance


def planned_patched_runs(run):
    """{phase: Counter {layer: forward passes over the evaluation prompts that patch from that layer
    on}}, as `evaluate_run` will make them. An upper bound where Test 2 may choose one SAE setting
    for several attributes (then it grades it once)."""
    c = run.config
    n_edits = 2 * len(c.edit_k)  # greedy and F1-guided, at each k
    sae_grading = 2 + 2 * len(c.f1_thresholds)  # sufficiency, necessity; the causal curves
    grading = Counter({0: 1})  # the clean run
    ld_recovered = Counter(node.layer for node in run.nodes)  # every node patched at its mean
    for section in run.sections:
        n_attributes = len(section.attributes)
        chosen = [min(len(grid), n_attributes) for grid in run.sae_grids().values()] + [1] * len(ARCHS)
        grading[min(node.layer for node in section.nodes)] += (
            1 + n_attributes + 2  # reference runs: mean-ablated, each counterfactual; mean ablation
            + 2 * (2 + n_attributes)  # the two supervised dictionaries
            + sum(chosen) * sae_grading + len(chosen) * n_attributes * n_edits)  # SAEs
        ld_recovered.update(node.layer for node in section.nodes for _ in range(sum(chosen)))
    return {"grading": grading, "ld_recovered": ld_recovered,
            "phenomena": Counter(node.layer for node in run.nodes for _ in ioi.ATTRIBUTES)}


def seconds_per_sae_step(arch, n_sae, d_in, d_sae, batch_size, device="cpu"):
    """One training step of a stack of `n_sae` SAEs, on random data: 16 epochs of one batch less 8,
    so set-up and all but one of the statistics at checkpoints (1, 2, 4, 8, 16) cancel."""
    data = torch.randn(1, batch_size, d_in, device=device)
    specs = [dictionaries.SAESpec(arch, seed=i) for i in range(n_sae)]

    def seconds(epochs):  # the fastest of five: the first pays one-time costs, and a shared machine is noisy
        config = dictionaries.TrainConfig(d_sae=d_sae, batch_size=batch_size, epochs=epochs, resample_at=(),
                                          max_stack=None)
        return min(_seconds(lambda: dictionaries.train_sae_stack(data, specs, config), device)
                   for _ in range(5))
    return max(0.0, seconds(16) - seconds(8)) / 8


def estimate_seconds(run):
    """{phase: seconds} for the whole run from scratch (work cached in the folder is skipped): the
    work counted, times a forward pass and SAE steps timed here. SAE training is counted to the epoch
    cap (`epochs`): converging SAEs stop sooner, so that phase is an upper bound. Not counted: the
    supervised fits, the core metrics and the toy models (under a minute together in the demo)."""
    c, group = run.config, dictionaries.TrainConfig.max_stack
    prompts, d_head = run.splits["eval"][:c.batch_size], run.model.config.n_embd // run.model.config.n_head

    @functools.cache
    def per_prompt(layer=0):  # a pass that patches from `layer` on (`metrics.Task.patched`), per prompt
        resume = (layer, ioi.residual_streams(run.model, prompts, layer, c.batch_size)) if layer else None

        def forward():
            metrics.patched_run(run.model, prompts, batch_size=c.batch_size, resume=resume)
        forward()  # not timed: the first pass pays one-time costs
        return _seconds(forward, c.device) / len(prompts)
    n_prompts = sum(map(len, run.splits.values()))

    def training(arch, n_sae, d_sae, epochs, n):  # groups of max_stack SAEs, one after another
        batch_size = min(dictionaries.TrainConfig.batch_size, n)
        steps = epochs * math.ceil(n / batch_size) * math.ceil(n_sae / group)
        return steps * seconds_per_sae_step(arch, min(n_sae, group), d_head, d_sae, batch_size, c.device)
    task_saes = sum(training(architecture(method), len(run.nodes) * len(grid),
                             c.d_sae, c.epochs, c.n_train) for method, grid in run.sae_grids().items())
    heads = len({(node.hook_name, node.head) for node in run.nodes})
    corpus_forward = c.corpus_tokens / len(prompts[0].tokens) * per_prompt()  # (a prompt's cost per token)
    corpus_saes = sum(training(arch, heads, c.corpus_d_sae, c.corpus_epochs, c.corpus_tokens)
                      for arch in ARCHS)
    return {"activations": n_prompts * per_prompt(), CAPPED_PHASE: task_saes,
            "full-distribution SAEs": corpus_forward + corpus_saes,
            **{f"{phase}: {sum(counts.values())} runs": c.n_eval * sum(n * per_prompt(layer)
                                                                 for layer, n in counts.items())
               for phase, counts in planned_patched_runs(run).items()}}


def eta_text(seconds):
    """The estimate as lines: the total, then each phase. The task SAEs stop when they converge, often
    far below the cap (the demo's: at 10-45% of it), so their bound is not added into the total."""
    def clock(s):
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"
    known = sum(s for phase, s in seconds.items() if phase != CAPPED_PHASE)
    return "\n".join([f"Estimated time for the whole run: {clock(known)}, plus at most "
                      f"{clock(seconds[CAPPED_PHASE])} to train the task SAEs (less if they converge)"]
                     + [f"  {phase}: {clock(s)}" for phase, s in seconds.items()])


@contextmanager
def stopwatch(label):
    started = time.time()
    yield
    click.echo(f"{label}: {time.time() - started:.0f} s")


def evaluate_run(run, oversplitting_grids=metrics.OVERSPLITTING_GRIDS):
    """Every test of the paper on one run -> records (README §5-§9); the dictionaries and SAEs are
    fitted and trained, or loaded from the run folder, on the way. `oversplitting_grids`: the
    over-splitting toy's grids (metrics.oversplitting_toy_records)."""
    with stopwatch("Supervised dictionaries"):
        supervised = run.fit_supervised()
    with stopwatch("Task SAEs"):
        task_saes, training = run.train_task_saes()
    with stopwatch("Full-distribution SAEs"):
        corpus_saes = run.train_corpus_saes()
    supervised, task_saes, corpus_saes = run.at_nodes(supervised, task_saes, corpus_saes)
    task = run.task()
    clean_run = task.patched()
    records = metrics.grade_model(task.prompts, clean_run)
    with stopwatch("Tests 1-3 at every cross-section"):
        records += grade_sections(run, task, clean_run, supervised, task_saes, corpus_saes)
    with stopwatch("Core SAE metrics"):
        saes = metrics.every_setting(task_saes, corpus_saes)
        records += metrics.core_records(saes, run.acts["eval"], training)
        records += metrics.ld_recovered_records(task, clean_run, run.acts["eval"], run.sections, saes,
                                                metrics.chosen_settings(records))
    with stopwatch("Feature occlusion and over-splitting"):
        records += grade_phenomena(run, task, clean_run, supervised["supervised"], task_saes)
    with stopwatch("Over-splitting toy"):
        records += metrics.oversplitting_toy_records(oversplitting_grids, run.config.seed)
    return records


def grade_sections(run, task, clean_run, supervised, task_saes, corpus_saes):
    """`metrics.grade_section` at every cross-section of the run, with a progress bar. Each
    section's records are cached in grades/ (`gpt2.cached`) as soon as it is graded, so a killed
    run resumes at the next section; they are reused only under the same settings and SAEs."""
    # What graded records depend on: the settings (bar the device) and every SAE stack's key.
    settings = {name: value for name, value in asdict(run.config).items() if name != "device"}
    stamps = {os.path.basename(os.path.dirname(path)): gpt2.read_json(path)
              for path in sorted(glob.glob(run.path("saes", "*", "key.json")))}
    key, records = {"settings": settings, "saes": stamps}, []

    def load(saved):
        return [metrics.Record(**row) for row in gpt2.read_json(os.path.join(saved, "records.json"))]
    with click.progressbar(run.sections, label="Grading cross-sections",
                           item_show_func=lambda section: section.name if section else "") as sections:
        for section in sections:
            def grade(tmp):
                inputs = metrics.section_inputs(task, section, run.acts, run.attributes, clean_run)
                graded = metrics.grade_section(task, inputs, supervised, task_saes, corpus_saes,
                                               run.config.edit_k, run.config.f1_thresholds)
                gpt2.write_json(os.path.join(tmp, "records.json"), [row.to_json() for row in graded])
            folder = run.path("grades", re.sub(r"[^A-Za-z0-9]+", "_", section.name).strip("_"))
            records += gpt2.cached(folder, key, grade, load)
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
    sections = [{"name": s.name, "nodes": [str(n) for n in s.nodes], "attributes": list(s.attributes)}
                for s in run.sections]
    circuit = {"sections": sections, "skipped": run.skipped, "discovery": run.discovery}
    gpt2.write_json(run.path("metrics.json"), {"config": asdict(run.config), "circuit": circuit,
                                               "results": rows})


def evaluate_and_report(run, oversplitting_grids=metrics.OVERSPLITTING_GRIDS):
    """Every test (`evaluate_run`) -> metrics.json and report.md, and the report's summary."""
    write_metrics(run, [record.to_json() for record in evaluate_run(run, oversplitting_grids)])
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')} "
               f"in {time.time() - run.started:.0f} s")


def recover_interrupted_saves(out):
    """Undo every save a killed run left unfinished in its folder `out`: gpt2.atomic_write and
    gpt2.atomic_folder leave NAME.tmp (and NAME.old) behind only when killed midway. Only what
    a run writes is looked at, since `out` may hold other files too."""
    saved = [os.path.join(out, name) for name in ("config.json", "metrics.json", "report.md")]
    for folder in ("activations", "dictionaries", "saes", "grades", "figures"):
        for root, dirs, files in os.walk(os.path.join(out, folder)):
            saved += [os.path.join(root, os.path.splitext(name)[0]) for name in dirs + files
                      if name.endswith((".tmp", ".old"))]
    for path in saved:  # parents first: a leftover inside a removed one is gone already
        gpt2.recover_interrupted_save(path)


def open_run(out, weights=None, preset=None, device="cpu", force=False, circuit=None, eta=False,
             **overrides):
    """The run in folder `out`, bound to the settings in its config.json: the saved ones; or with
    `preset`, or in a new folder, a preset ("demo", scaled down, for the embedded model; "paper" for
    real GPT-2 weights); either overridden by the settings given. Other settings than the saved ones
    are a one-line error unless `force`. The device only decides where the run computes, so it is
    not bound. `circuit`, `eta`: see `Run`."""
    recover_interrupted_saves(out)
    path, saved = os.path.join(out, "config.json"), None
    try:
        saved = RunConfig.load(path) if os.path.exists(path) else None
    except click.ClickException as error:
        if not force:
            raise click.ClickException(f"{error.message} (--force replaces it)") from None
    given = {name: value for name, value in dict(overrides, weights=weights).items() if value is not None}
    presets = {"demo": DEMO, "paper": RunConfig()}
    base = saved if saved and not preset else presets[preset or ("demo" if weights is None else "paper")]
    config = replace(base, **given, device=device)
    changed = [] if saved is None else [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(config, f.name)!r}" for f in fields(RunConfig)
        if f.name != "device" and getattr(saved, f.name) != getattr(config, f.name)]
    if changed and not force:
        more = f"; {len(changed) - 3} more" if len(changed) > 3 else ""
        raise click.ClickException(f"{path} holds other settings ({'; '.join(changed[:3])}{more}): "
                                   "add --force to rebind the folder to these, or choose a new --out")
    return Run(out, config, circuit, eta)


FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Rebind a run folder made with other settings to these (caches are kept).")


def run_options(function):
    """Options shared by every pipeline step, the keyword arguments of `open_run`: the run folder
    and what it runs on."""
    options = [
        click.option("--out", "out", default="runs/demo", show_default=True, callback=output_folder(),
                     help="Run folder (created if needed)."),
        click.option("--weights", default=None, help=WEIGHTS_HELP),
        click.option("--preset", type=click.Choice(["demo", "paper"]), default=None,
                     help="Settings: demo (minutes on a CPU) or the paper's. "
                          "Default: demo for the embedded model."),
        DEVICE_OPTION,
        click.option("--n-train", type=click.IntRange(min=10), default=None, help="Training prompts."),
        click.option("--n-eval", type=click.IntRange(min=10), default=None, help="Evaluation prompts."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help="SAE training epochs."),
        FORCE_OPTION,
    ]
    for option in reversed(options):
        function = option(function)
    return function


@cli.command()
@run_options
def collect(**options):
    """Step 1: find the circuit and cache activations at its nodes."""
    run = open_run(**options)
    for section in run.sections:
        nodes = " ".join(str(node) for node in section.nodes)
        click.echo(f"{section.name:12s} {', '.join(section.attributes):12s} {nodes}")
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
    if source in ("ioi", "both"):
        run.train_task_saes()
    if source in ("corpus", "both"):
        run.train_corpus_saes()
    click.echo(f"SAEs saved in {run.path('saes')} (SAELens layout)")


@cli.command("run")
@run_options
def run_command(**options):
    """Step 4, the whole paper: grade dictionaries and SAEs on every test -> metrics.json and
    report.md (steps 1-3 run, or load from the folder's caches, as needed). GPT-2 Small via --weights."""
    evaluate_and_report(open_run(**options, eta=True))


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, callback=output_folder(), help="Run folder.")
@FORCE_OPTION
def demo(out, force):
    """The whole paper on the embedded small IOI model, scaled to minutes on a CPU."""
    evaluate_and_report(open_run(out, preset="demo", force=force, eta=True))


# --- grade-sae: any SAE in SAELens's layout, graded like ours (README, "Use with TransformerLens / SAELens")

SAE_HOOK = re.compile(r"blocks\.(\d+)\.(?:attn\.hook_([qkvz])|hook_(resid_pre|resid_mid|resid_post))")
FIRST_LAYER_READ = {"resid_pre": 0, "resid_mid": 1, "resid_post": 1}  # resid_pre@L feeds layer L's heads on


def sae_reads(meta, d_in, config):
    """(act, layer, head) that an SAE reads, from cfg.json's hook_name and hook_head_index, checked
    against the model: one head's q|k|v|z (d_head values), all heads concatenated (head None,
    n_head * d_head values), or the residual stream (d_model values). One-line error otherwise."""
    hook_name, head = meta.get("hook_name"), meta.get("hook_head_index")
    match = SAE_HOOK.fullmatch(str(hook_name))
    if match is None:
        raise click.ClickException(f"hook_name={hook_name!r}: grade-sae reads blocks.L.attn.hook_q|k|v|z "
                                   "(hook_head_index: one head, or none for all) or blocks.L.hook_resid_*")
    layer, act = int(match[1]), match[2] or match[3]
    if layer >= config.n_layer:
        raise click.ClickException(f"hook_name={hook_name!r}: the model has {config.n_layer} layers")
    if head is not None and (act in ioi.RESIDUAL_ACTS or not 0 <= head < config.n_head):
        raise click.ClickException(f"hook_head_index={head!r} with {hook_name}: the model has "
                                   f"{config.n_head} heads, the residual stream none")
    expected = config.d_head if head is not None else config.n_embd
    if d_in != expected:
        where = hook_name + ("" if head is None else f" head {head}")
        raise click.ClickException(f"d_in={d_in}: {where} of this model has {expected} values")
    return act, layer, head


def as_plain_model_sae(sae, model, act, layer, head):
    """The SAE on this model's plain activations. SAELens trains on TransformerLens's processed
    model unless cfg.json's metadata.model_from_pretrained_kwargs says otherwise (ours do), where
    fold_value_biases drops the value bias b_V (plus ln1's bias times W_V under fold_ln) from hook_v
    and hook_z, and center_writing_weights centres the residual stream: both fold into the SAE."""
    settings, params = sae.meta.get("model_from_pretrained_kwargs") or {}, sae.params
    if act in ("v", "z") and settings.get("fold_value_biases", True):
        config, block = model.config, model.h[layer]
        values = slice(2 * config.n_embd, None)  # c_attn computes q, k, v
        b_V = block.attn.c_attn.bias[values]                                       # [d_model]
        if settings.get("fold_ln", True):  # folded in first, ln1's bias joins the value bias
            b_V = b_V + block.ln_1.bias @ block.attn.c_attn.weight[:, values]
        b_V = b_V.detach().view(config.n_head, config.d_head)
        params = dictionaries.fold_input_shift(params, b_V.flatten() if head is None else b_V[head])
        click.echo(f"{sae.meta.get('hook_name')}: read without the value bias (fold_value_biases)")
    if act in ioi.RESIDUAL_ACTS and settings.get("center_writing_weights", True):
        params = dictionaries.fold_input_centring(params)
        click.echo(f"{sae.meta.get('hook_name')}: read centred (center_writing_weights)")
    return replace(sae, **params)


def sae_sections(sections, act, layer, head):
    """The run's cross-sections as the SAE sees them. Each node maps to the SAE's node that reads
    it: the same head; every head of its layer; or the residual stream at its position, upstream
    of its layer. Sections with no such node are left out; sections that map to the same nodes
    are graded once, for all their attributes."""
    def covering(node):
        if act in ioi.HEAD_ACTS and (node.act, node.layer) == (act, layer) and head in (None, node.head):
            return ioi.Node(act, layer, head, node.position)
        if act in ioi.RESIDUAL_ACTS and node.layer >= layer + FIRST_LAYER_READ[act]:
            return ioi.Node(act, layer, None, node.position)
        return None

    merged = {}
    for section in sections:
        nodes = tuple(dict.fromkeys(n for n in map(covering, section.nodes) if n is not None))
        if nodes:
            names, attributes = merged.get(nodes, ([], []))
            merged[nodes] = (names + [section.name], attributes + list(section.attributes))
    reads = f"{act}@L{layer}" + ("" if head is None else f"H{head}")
    return [ioi.CrossSection(f"{' + '.join(names)} [{reads}]", nodes,
                             tuple(a for a in ioi.ATTRIBUTES if a in attrs))
            for nodes, (names, attrs) in merged.items()]


def grade_other_sae(run, label, sae, sections, min_section_effect=metrics.MIN_SECTION_EFFECT):
    """The paper's three tests (and the core SAE metrics) for one SAE from elsewhere at the sites
    it reads, beside the supervised dictionaries fitted at the same nodes (and our task SAEs,
    where it reads single heads, as ours do). Sites whose mean ablation moves the LD by less than
    `min_section_effect` are skipped (sufficiency and necessity would divide by ~0). -> records"""
    task, c = run.task(), run.config
    clean_run = task.patched()
    graded = []
    for section in sections:
        inputs = metrics.section_inputs(task, section, run.acts, run.attributes, clean_run)
        if metrics.moves_the_task(inputs, min_section_effect):
            graded.append(inputs)
        else:
            click.echo(f"{section.name}: skipped, mean-ablating it moves the mean LD by less than "
                       f"{min_section_effect:.0%}")
    if not graded:
        raise click.ClickException(f"{label}: none of the sites it reads is causal for IOI in this model")
    nodes = list(dict.fromkeys(node for inputs in graded for node in inputs.section.nodes))
    supervised = run.fit_supervised(nodes)
    ours, training = run.train_task_saes() if all(node in run.nodes for node in nodes) else ({}, {})
    sae = sae.to(c.device)
    supervised, ours, theirs = run.at_nodes(supervised, ours, {label: {node: sae for node in nodes}})
    records = []
    for inputs in graded:
        click.echo(f"Grading {label} at {inputs.site} ...")
        records += metrics.grade_section(task, inputs, supervised, ours, theirs, c.edit_k, c.f1_thresholds)
        records.append(metrics.Record("graded_sae", inputs.site, label, len(inputs.section.nodes),
                                      reads=sae.meta.get("hook_name"), head=sae.meta.get("hook_head_index")))
    saes = metrics.every_setting(ours, theirs)
    records += metrics.core_records(saes, run.acts["eval"], training)
    records += metrics.ld_recovered_records(task, clean_run, run.acts["eval"],
                                            [inputs.section for inputs in graded], saes,
                                            metrics.chosen_settings(records))
    return records + metrics.grade_model(task.prompts, clean_run)


def grade_sae_in_run(run, sae, label, min_section_effect=metrics.MIN_SECTION_EFFECT):
    """`grade-sae` once its run is open: grade `sae` at the sections it reads and put its records,
    named `label`, in metrics.json (created if needed; replacing those of an earlier grading)."""
    act, layer, head = sae_reads(sae.meta, sae.d_in, run.model.config)
    sae = as_plain_model_sae(sae, run.model, act, layer, head)
    sections = sae_sections(run.sections, act, layer, head)
    if not sections:
        raise click.ClickException(f"{sae.meta['hook_name']} reads none of the circuit's cross-sections "
                                   f"({', '.join(s.name for s in run.sections)})")
    run.add_nodes([node for section in sections for node in section.nodes])
    records = grade_other_sae(run, label, sae, sections, min_section_effect)
    path = run.path("metrics.json")
    kept = [row for row in (gpt2.read_json(path)["results"] if os.path.exists(path) else [])
            if row.get("graded_sae") != label]
    has_model = any(row["site"] == "model" for row in kept)  # the model's own records are written once
    write_metrics(run, kept + [replace(r, graded_sae=label).to_json()
                               for r in records if not (has_model and r.site == "model")])


@cli.command("grade-sae")
@click.option("--sae", "sae_dir", required=True,
              help="SAE folder in SAELens's layout (cfg.json + sae_weights.safetensors).")
@click.option("--name", default=None, help="Its name in the report  [default: sae:FOLDER].")
@run_options
def grade_sae_command(sae_dir, name, **options):
    """Grade any SAE on IOI, beside the supervised dictionaries at the nodes it reads (cfg.json's
    hook_name): one head's q|k|v|z, all heads' hook_z, or the residual stream at the paper's positions."""
    try:
        sae = dictionaries.load_sae(sae_dir)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    run = open_run(**options)
    grade_sae_in_run(run, sae, name or f"sae:{Path(sae_dir).resolve().name}")
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')}")


# === benchmarks (bench): our GPT-2 forward and batched SAE training, timed ===

def forward_flops(config, batch, n_pos, logits_at_last_only):
    """Matmul FLOPs (2 per multiply-add) of one forward pass over [batch, n_pos] tokens. Per token and
    layer: 2·4d² for q, k, v and the output projection, 2·2·d·d_mlp for the MLP, 2·2·n_pos·d for
    attention scores and their weighted sum of values (the full square is computed, then masked). The
    unembedding (2·d·vocab) runs at every position, or at one per prompt with logits at the last
    position only (as nanoGPT slices before it). LayerNorms, biases, GELU and softmax are not counted."""
    d, tokens = config.n_embd, batch * n_pos
    per_layer = tokens * (2 * 4 * d * d + 2 * 2 * d * config.d_mlp + 2 * 2 * n_pos * d)
    unembedded = batch if logits_at_last_only else tokens
    return config.n_layer * per_layer + unembedded * 2 * d * config.vocab_size


def _seconds(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_forward(config=None, batch=100, n_pos=19, repeats=5, device="cpu", matmul_size=2048, seed=0):
    """Time our IOI-style forward (logits at the last position only, hook_z of every head cached: what
    the pipeline runs) against Hugging Face's ordinary one (logits at every position) on the same
    random weights (speed does not depend on their values) and prompts, and against a plain matmul.
    The three are timed in turn within each repeat, so a busy machine slows all of them alike; we
    report medians, and the best matmul time as the machine's FLOP rate."""
    import statistics
    config = config or gpt2.GPT2Config()
    torch.manual_seed(seed)
    ours = gpt2.GPT2(config).to(device).eval()
    tokens = torch.randint(config.vocab_size, (batch, n_pos), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = gpt2.BOS_TOKEN_ID
    tokens = tokens.to(device)
    last = torch.full((batch,), n_pos - 1, device=device)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(config.n_layer)]
    a, b = (torch.randn(matmul_size, matmul_size, device=device) for _ in range(2))
    runs = {"ours": lambda: ours.run_with_cache(tokens, z_names, logits_at=last)[0],
            "matmul": lambda: a @ b}
    try:
        import transformers
    except ImportError:
        pass
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict()))
        # strict=False: lm_head is tied to the token embedding
        hf.load_state_dict({f"transformer.{k}": v for k, v in ours.state_dict().items()}, strict=False)
        hf = hf.to(device).eval()
        runs["hf"] = lambda: hf(tokens, use_cache=False).logits
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: allocator, thread pool, kernel choice
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_seconds(run, device))
    ours_s = statistics.median(times["ours"])
    matmul_gflops = 2 * matmul_size ** 3 / min(times["matmul"]) / 1e9
    ours_gflops = forward_flops(config, batch, n_pos, logits_at_last_only=True) / ours_s / 1e9
    result = {"batch": batch, "n_pos": n_pos, "repeats": repeats, "matmul_size": matmul_size,
              "ours_tokens_per_s": batch * n_pos / ours_s, "ours_gflops": ours_gflops,
              "matmul_gflops": matmul_gflops, "ours_fraction_of_matmul": ours_gflops / matmul_gflops,
              "hf_s": None, "ours_over_hf": None, "max_abs_logit_diff": None}
    if "hf" in runs:
        hf_s = statistics.median(times["hf"])
        result.update(hf_s=hf_s, hf_tokens_per_s=batch * n_pos / hf_s, ours_over_hf=hf_s / ours_s,
                      hf_gflops=forward_flops(config, batch, n_pos, logits_at_last_only=False) / hf_s / 1e9,
                      max_abs_logit_diff=(runs["ours"]() - runs["hf"]()[:, -1]).abs().max().item())
    return result


@cli.command("bench")
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="Prompts per forward pass.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed passes of each contender (median).")
@DEVICE_OPTION
def bench_command(batch, repeats, device):
    """Benchmarks: our GPT-2 forward vs Hugging Face and the matmul FLOP rate, then SAE training."""
    r = bench_forward(batch=batch, repeats=repeats, device=device)
    click.echo(f"GPT-2 Small shape, random weights, {batch} prompts x {r['n_pos']} tokens on {device}, "
               f"median of {repeats}, {torch.get_num_threads()} threads")
    if r["hf_s"] is None:
        click.echo("  HF transformers:  skipped (transformers is not installed)")
    else:
        click.echo(f"  HF transformers, logits at every position:   {r['hf_tokens_per_s']:9,.0f} tokens/s  "
                   f"{r['hf_gflops']:6.1f} GFLOP/s")
    click.echo(f"  ours, logits at the last position + hook_z:  {r['ours_tokens_per_s']:9,.0f} tokens/s  "
               f"{r['ours_gflops']:6.1f} GFLOP/s = {r['ours_fraction_of_matmul']:.0%} of the matmul rate")
    click.echo(f"  fp32 matmul {r['matmul_size']}^3, best of {repeats}:{r['matmul_gflops']:38.1f} GFLOP/s")
    if r["hf_s"] is not None:
        click.echo(f"  ours / HF: {r['ours_over_hf']:.2f}x faster  "
                   f"(max |delta logit| {r['max_abs_logit_diff']:.1e})")
    # The SAE half: batched stack vs per-SAE loop, FLOP rate, the paper's grid projected.
    s = dictionaries.bench_sae_training()
    click.echo(f"SAE training: {s['n_sae']} {s['arch']} SAEs {s['d_in']} -> {s['d_sae']}, batch 512, "
               f"{s['epochs']} epochs of {s['n']} inputs, best of 2")
    click.echo(f"  loop, one SAE at a time:          {s['loop_s']:6.2f} s  "
               f"({s['loop_ms_per_sae_step']:.2f} ms per SAE step)")
    click.echo(f"  one stack of {s['n_sae']}:                {s['stack_s']:6.2f} s")
    click.echo(f"  stacks of {s['stack_size']} (the default):      {s['grouped_s']:6.2f} s  "
               f"({s['ms_per_sae_step']:.2f} ms per SAE step, {s['gflops']:.0f} GFLOP/s)")
    click.echo(f"  a step's 5 matmuls alone: {s['matmul_ms_one']:.2f} ms for one SAE, "
               f"{s['matmul_ms_stacked']:.2f} ms per SAE in a stack of {s['stack_size']} "
               f"({s['matmul_gflops_stacked']:.0f} GFLOP/s)")
    click.echo(f"  batched / loop: {s['speedup']:.2f}x faster; at most {s['speedup_ceiling']:.2f}x if a "
               "stacked step were nothing but its matmuls")
    click.echo("  the paper's grid (55 nodes x 12 settings, 20,000 x 64, batch 512) here: "
               f"{s['paper_grid_hours']:.1f} h at its 2,000 epochs;")
    click.echo(f"    {s['paper_grid_converged_hours']:.1f} h stopped at convergence, assuming "
               f"{s['converged_epochs']} epochs (our slowest measured convergence: README, Status)")


# === report (report.md, figures, terminal summary) ===
# The report retells the paper's results section for one run. It reads only metrics.json:
# flat records {"test", "site", "method", "value", ...params}. Any test may be missing; its
# section then says so in one line instead of failing.

PAPER_SCALE = {"n_train": 20_000, "n_eval": 5_000, "d_sae": 512, "epochs": 2000}  # README §2, §8
HEADLINE = [("io", "(B)NM out"), ("pos", "(B)NM qk"), ("pos", "(B)NM q"),
            ("pos", "S-I out"), ("pos", "S-I v"), ("pos", "Ind+DT out")]  # (attribute, site)
SITES = [site for _, site in HEADLINE]
METHODS = ["mean_ablation", "supervised", "supervised_lstsq", "vanilla", "gated", "topk",
           "random_decoder", "vanilla_fulldist", "gated_fulldist", "topk_fulldist"]
COLORS = dict(zip(METHODS, ["#7f7f7f", "#2ca02c", "#98df8a", "#d62728", "#1f77b4", "#ff7f0e",
                            "#8c564b", "#ff9896", "#aec7e8", "#ffbb78"]))
MARKERS = dict(zip(METHODS, "xsPoD^v*dp"))
# README §6, revised paper, k = 2, over the headline sites: (edit accuracy, weight removed) ranges.
PAPER_EDITS = {"supervised": ((0.80, 0.96), (0.37, 0.64)), "gated": ((0.87, 0.97), (0.57, 0.79)),
               "topk": ((0.86, 0.95), (0.39, 0.68)), "vanilla": ((0.24, 0.61), None)}
DASHED, DOTTED = {"color": "k", "ls": "--", "lw": 1}, {"color": "k", "ls": ":", "lw": 0.8}
BAR_COLORS = {**COLORS, "IO names": "#2ca02c", "S names": "#d62728"}
APPROXIMATION = ("sufficiency", "necessity")
EDIT = ("edit_accuracy", "weight_removed")


# --- formatting: the one table helper, and figure panels as data ---

def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _fmt(x):
    return "–" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def _count(x):
    return None if x is None or not np.isfinite(x) else int(round(x))


def _percent(x):
    return "–" if x is None else f"{x:.0%}"


def _setting(method, setting):
    return "" if setting is None else f"k={setting:g}" if method.startswith("topk") else f"λ={setting:g}"


def _distinct(records, key="method", order=METHODS):
    """The distinct values of `key` in records: those in `order` first, the others as they come."""
    seen = list(dict.fromkeys(r.get(key) for r in records))
    return sorted(seen, key=lambda v: order.index(v) if v in order else len(order) + seen.index(v))


def _table(rows, headers):
    """A markdown table; floats print with two decimals, None as a dash."""
    lines = ["| " + " | ".join(map(_fmt, row)) + " |" for row in [headers, *rows]]
    return "\n".join(lines[:1] + ["|" + "---|" * len(headers)] + lines[1:])


def _line(label, points, **style):
    """A panel series: the line through those (x, y) points that have both coordinates."""
    points = [(x, y) for x, y in points if x is not None and y is not None]
    return ("plot", label, tuple(zip(*points)), style)


def _mark(label, axis, at, **style):
    """A line across a panel, horizontal (axis "h") or vertical ("v"), as a list: empty if at is None."""
    return [] if at is None else [(f"ax{axis}line", label, (at,), style)]


def _bars(groups, heights, marks=(), **settings):
    """A panel of grouped bars: per group, one bar for each label of `heights` {label: heights}."""
    width = 0.8 / len(heights)
    bars = [("bar", label, (np.arange(len(groups)) + (i - (len(heights) - 1) / 2) * width,
                            [np.nan if v is None else float(v) for v in values]),
             {"width": width, "color": BAR_COLORS.get(label)})
            for i, (label, values) in enumerate(heights.items())]
    return {"series": bars + list(marks), "xticks": range(len(groups)), "xticklabels": groups, **settings}


# --- checking metrics.json once, so that no section meets a key it cannot read ---

NUMBER, TEXT, NUMBER_OR_NULL = (int, float), str, (int, float, type(None))
# Every key a record may carry, and its type (metrics.Record; a value may be NaN: an undefined share).
RECORD_TYPES = {"test": TEXT, "site": TEXT, "method": TEXT, "value": NUMBER, "attribute": TEXT, "edit": TEXT,
                "node": TEXT, "grid": TEXT, "phenomenon": TEXT, "reads": TEXT, "graded_sae": TEXT,
                **dict.fromkeys(["k", "threshold", "low", "high", "alpha", "norm", "l1", "firing", "setting",
                                 "head"], NUMBER)}
# The keys beyond test, site, method and value that the report reads from every record of a test
# (or of a test and method); metrics.py always writes them.
RECORD_NEEDS = {"logit_diff_histogram": ("low", "high"), "edit_accuracy": ("attribute",),
                "weight_removed": ("attribute",), "latents_changed": ("attribute", "k", "edit"),
                "edit_accuracy_no_intervention": ("attribute",), "edit_distance_k2": ("setting",),
                "f1_coverage": ("attribute",), "causal_keep_sufficiency": ("threshold",),
                "causal_remove_necessity": ("threshold",), "evidence_norm": ("attribute",),
                "evidence_answers_changed": ("attribute",), "evidence_ld_moved": ("attribute",),
                "phenomenon_testable": ("phenomenon",), "supervised_feature_norm": ("attribute",),
                "alpha_sweep_io_names": ("alpha",), "alpha_sweep_s_names": ("alpha",),
                "occlusion_toy_recovered": ("attribute",), "oversplit_toy_loss": ("l1", "grid"),
                ("oversplit_toy_loss", "ideal_2_latent"): ("firing",)}
# The circuit block (the sections graded, and what `ioi.discover` found): its keys and their types.
OR_NULL = {list: (list, type(None)), dict: (dict, type(None))}
CIRCUIT_TYPES = {"sections": OR_NULL[list], "skipped": OR_NULL[list], "discovery": OR_NULL[dict]}
SECTION_TYPES = {"name": TEXT, "nodes": list, "attributes": list}
HEAD_TYPES = {"head": TEXT, "position": TEXT, "role": TEXT, "direct_effect": NUMBER_OR_NULL,
              "query_effect": NUMBER_OR_NULL, "ld_drop": NUMBER_OR_NULL, "fraction": NUMBER_OR_NULL}
VERDICT_TYPES = {"section": TEXT, "ld_drop": NUMBER_OR_NULL, "fraction": NUMBER_OR_NULL, "kept": object}
KINDS = {NUMBER: "a number", TEXT: "text", NUMBER_OR_NULL: "a number or null", list: "a list",
         OR_NULL[list]: "a list or null", OR_NULL[dict]: "an object or null"}


def _bad_key(obj, types, needs=()):
    """What is wrong with `obj`, which must be an object holding `needs` and whose keys have the `types`
    {key: type} where present; None if nothing."""
    if not isinstance(obj, dict):
        return f"{json.dumps(obj)[:60]} is not an object"
    missing = [key for key in needs if key not in obj]
    if missing:
        return f"lacks '{missing[0]}'"
    wrong = next((key for key, kind in types.items() if key in obj and not isinstance(obj[key], kind)), None)
    return wrong and f"'{wrong}' is {json.dumps(obj[wrong])[:60]}, not {KINDS[types[wrong]]}"


def _metrics_problem(data):
    """What the report could not read in metrics.json, in one line, or None: {"results": [records]}, each
    record with its test's keys; "config" and "circuit" objects if present."""
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        return "malformed, expected {'results': [records with a 'test']}"
    for i, record in enumerate(data["results"]):
        keys = record if isinstance(record, dict) else {}
        # str(): a test or method of any JSON type can be looked up; _bad_key then says what is wrong with it
        test, method = str(keys.get("test")), str(keys.get("method"))
        needs = ("test", "site", "method", "value", *RECORD_NEEDS.get(test, ()),
                 *RECORD_NEEDS.get((test, method), ()))
        problem = _bad_key(record, RECORD_TYPES, needs)
        if problem:
            return f"malformed record {i} (test {test}): {problem}"
    config, circuit = data.get("config") or {}, data.get("circuit") or {}

    def parts():  # (name, object, types, needed keys); each part is reached only if the one above is sound
        yield "config", config, {key: NUMBER_OR_NULL for key in PAPER_SCALE}, ()
        yield "circuit", circuit, CIRCUIT_TYPES, ()
        discovery = circuit.get("discovery") or {}
        yield "circuit.discovery", discovery, {"heads": list, "sections": list}, ()
        for name, items, types in (("sections", circuit.get("sections") or [], SECTION_TYPES),
                                   ("discovery.heads", discovery.get("heads", []), HEAD_TYPES),
                                   ("discovery.sections", discovery.get("sections", []), VERDICT_TYPES)):
            yield from ((f"circuit.{name}[{i}]", item, types, tuple(types)) for i, item in enumerate(items))
    return next((f"malformed {name}: {problem}" for name, obj, types, needs in parts()
                 if (problem := _bad_key(obj, types, needs))), None)


class Report:
    """One run's metrics.json as markdown, section by section (README §1-§9). Any test may be missing:
    each section method returns its markdown blocks, or none when metrics.json holds nothing for it."""

    def __init__(self, data, figdir):
        self.config, self.circuit_found = data.get("config") or {}, data.get("circuit") or {}
        self.figdir, self.by_test = figdir, {}  # records by test: each query scans one test only
        for record in data["results"]:
            self.by_test.setdefault(record["test"], []).append(record)

    @classmethod
    def load(cls, run_dir):
        """The report of <run_dir>/metrics.json, or a one-line ClickException saying what is wrong."""
        path = os.path.join(run_dir, "metrics.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise click.ClickException(f"{path}: not found (run the pipeline first)")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise click.ClickException(f"{path}: not valid JSON ({e})")
        problem = _metrics_problem(data)
        if problem:
            raise click.ClickException(f"{path}: {problem}")
        return cls(data, os.path.join(run_dir, "figures"))

    # --- looking records up ---

    def find(self, test, **match):
        """The records of one test whose fields equal `match` (a missing field counts as None)."""
        return [r for r in self.by_test.get(test, []) if all(r.get(k) == v for k, v in match.items())]

    def mean(self, test, **match):
        return _mean([r["value"] for r in self.find(test, **match)])

    def at(self, test, site, method, choose_for=None, **match):
        """Mean value of a test at a site. Task SAEs come in several settings (λ or k): take the one
        chosen in Test 2 for the attribute `choose_for` (default: the record's own attribute), else
        the one chosen most often, else the first. Supervised and "none" edits have no k or kind."""
        if method.startswith("supervised") or method == "none":
            match = {key: value for key, value in match.items() if key not in ("k", "edit")}
        settings = sorted({r["setting"] for r in self.find(test, site=site, method=method)
                           if r.get("setting") is not None})
        chosen = [r for r in self.find("edit_distance_k2", site=site, method=method, chosen=True)
                  if r["setting"] in settings]
        attribute = choose_for or match.get("attribute")
        counts = Counter([r["setting"] for r in chosen if r.get("attribute") == attribute]
                         or [r["setting"] for r in chosen])
        setting = counts.most_common(1)[0][0] if counts else (settings or [None])[0]
        return self.mean(test, site=site, method=method, setting=setting, **match)

    def edit(self, test, site, method, attribute, k=2, kind="greedy"):
        """Edit accuracy, weight removed or latents changed (README §6); greedy at k = 2 by default."""
        return self.at(test, site, method, attribute=attribute, k=k, edit=kind)

    def headline(self):
        """The paper's headline (attribute, site) pairs that this run graded."""
        sites = {r["site"] for test in ("edit_accuracy", "sufficiency") for r in self.by_test.get(test, [])}
        return [(attribute, site) for attribute, site in HEADLINE if site in sites]

    def figure(self, name, panels, ncols=3, size=(4.2, 3.3)):
        """Draw `panels` into figures/<name> (written atomically); return its markdown link. A panel is a
        dict of Axes settings (title, xlabel, ...) and "series": (Axes method, label, arguments, style)."""
        from matplotlib.figure import Figure  # a bare Figure keeps no pyplot state, so nothing leaks
        ncols, nrows = min(len(panels), ncols), -(-len(panels) // ncols)
        fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes, panels):
            for method, label, args, style in panel["series"]:
                getattr(ax, method)(*args, label=label, **style)
            ax.set(**{key: value for key, value in panel.items() if key != "series"})
            ax.minorticks_off()
            names = any(not label.isdigit() for label in panel.get("xticklabels", []))
            ax.tick_params(axis="x", labelsize=8, labelrotation=20 if names else 0)  # so names do not overlap
        handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
        if handles and len(panels) == 1:
            axes[0].legend(handles.values(), handles.keys(), fontsize=8)
        elif handles:  # one legend for all panels, outside on the right
            fig.legend(handles.values(), handles.keys(), fontsize=8, loc="outside right upper",
                       handlelength=3)
        gpt2.atomic_write(os.path.join(self.figdir, name),
                          lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        return f"![{name[:-4].replace('_', ' ')}](figures/{name})"

    def figured(self, name, panel, caption, size=(6, 3.5)):
        """A one-panel figure and the caption under it, or nothing if the panel has no series."""
        return [self.figure(name, [panel], size=size), caption] if panel["series"] else []

    # --- the sections ---

    def header(self):
        config = self.config
        model = (f"GPT-2 weights from `{config['weights']}`" if config.get("weights") else
                 "the embedded IOI model (GPT-2's IOI circuit written by hand into a small GPT-2)")
        out = ["# Supervised dictionaries vs sparse autoencoders on IOI",
               "A reproduction of Makelov, Lange & Nanda, *Towards Principled Evaluations of Sparse "
               f"Autoencoders for Interpretability and Control* (arXiv 2405.08366). Model: {model}; "
               f"{config.get('n_train')} training and {config.get('n_eval')} evaluation prompts; task SAEs "
               f"with {config.get('d_sae')} latents trained for {config.get('epochs')} epochs. The README's "
               "§1-§9 define every quantity below."]
        if config.get("weights") is None or (config.get("epochs") or 0) < PAPER_SCALE["epochs"]:
            changes = [] if config.get("weights") else ["a small IOI model instead of GPT-2 Small"]
            changes += [f"{key} = {config[key]} instead of {paper}" for key, paper in PAPER_SCALE.items()
                        if config.get(key) is not None and config[key] != paper]
            out.append(f"Scaled down from the paper's settings to run on a CPU: {'; '.join(changes)}. "
                       "Expect the paper's qualitative picture, not its digits.")
        return out + [_table([(key, json.dumps(value)) for key, value in config.items()],
                             ["setting", "value"])]

    def summary(self):
        """The terminal summary (also "At a glance"): the model's LD and accuracy, then per headline site
        the k = 2 edit accuracy and sufficiency of the supervised dictionary and the task SAEs."""
        methods = ["supervised", "vanilla", "gated", "topk"]
        lines = [f"model: mean LD {_fmt(self.mean('logit_diff', site='model'))}, "
                 f"accuracy {_fmt(self.mean('accuracy', site='model'))}",
                 f"{'':22}{'edit accuracy @k=2':^28}{'sufficiency':^28}",
                 f"{'site':22}" + "".join(f"{m[:6]:>7}" for m in methods) * 2]
        for attribute, site in self.headline():
            values = ([self.edit("edit_accuracy", site, m, attribute) for m in methods]
                      + [self.at("sufficiency", site, m) for m in methods])
            lines.append(f"{attribute + '@' + site:22}" + "".join(f"{_fmt(v):>7}" for v in values))
        return "\n".join(lines)

    def model(self):
        stats = {test: self.mean(test, site="model") for test in ("logit_diff", "accuracy", "top1_accuracy")}
        bins, mean = sorted(self.find("logit_diff_histogram"), key=lambda r: r["low"]), stats["logit_diff"]
        histogram = [("bar", None, ([r["low"] for r in bins], [r["value"] for r in bins]),
                      {"width": [r["high"] - r["low"] for r in bins], "align": "edge", "edgecolor": "w"})]
        panel = {"title": "Logit difference on evaluation prompts", "xlabel": "LD = logit[IO] − logit[S]",
                 "ylabel": "prompts", "series": (histogram + _mark(None, "v", 0, **DASHED)
                                                 + _mark(f"mean {_fmt(mean)}", "v", mean, color="#d62728"))
                 if bins else []}  # no bins: no figure
        return [] if all(value is None for value in stats.values()) else [
            _table(stats.items(), ["metric", "value"]),
            "For reference, GPT-2 Small reaches a mean logit difference ≈ 3.3 and top-1 ≈ 91%.",
            *self.figured("ld_histogram.png", panel, "Look for almost all mass right of the dashed line: "
                          "LD > 0 means the model prefers IO.", size=(6, 3.3))]

    def circuit(self):
        sections, discovery = self.circuit_found.get("sections"), self.circuit_found.get("discovery") or {}
        if not sections:
            return []
        out = [_table([(s["name"], ", ".join(f"`{node}`" for node in s["nodes"]),
                        ", ".join(map(str, s["attributes"]))) for s in sections],
                      ["cross-section", "nodes", "attributes edited"])]
        if any(head["role"] for head in discovery.get("heads", [])):
            out += ["Heads found in the model itself (`ioi.discover`), each class by its own measure "
                    "(README, \"The embedded model\"), at ≥ 1/3 of the strongest head's value "
                    "and ≥ 2% of the LD:",
                    _table(_circuit_rows(discovery["heads"]), ["head", "position", "direct effect",
                                                               "LD drop via q", "LD drop", "of LD", "role"])]
        if discovery.get("sections"):
            skipped = self.circuit_found.get("skipped") or []
            verdicts = [(d["section"], d["ld_drop"], d["fraction"],
                         "not graded: in the run's skip_sections" if d["section"] in skipped else
                         "graded" if d["kept"] else "dropped: not causal here")
                        for d in discovery["sections"]]
            out += ["A cross-section is graded only if mean-ablating all its nodes at once moves the mean LD "
                    "by ≥ 5% (else sufficiency is near 1 whatever is patched in; necessity divides by ~0):",
                    _table(verdicts, ["cross-section", "LD drop", "fraction of LD", "verdict"])]
        return out

    def approximation(self):
        records = self.find("sufficiency") + self.find("necessity")
        if not records:
            return []
        sites, methods = _distinct(records, "site", SITES), _distinct(records)
        score = {(test, m): [self.at(test, site, m) for site in sites]
                 for test in APPROXIMATION for m in methods}
        panels = [_bars(sites, {m: score[test, m] for m in methods}, _mark(None, "h", 1, **DOTTED),
                        title=test, ylabel="score (1 = perfect)") for test in APPROXIMATION]
        cells = [[site] + [" / ".join(_fmt(score[test, m][i]) for test in APPROXIMATION) for m in methods]
                 for i, site in enumerate(sites)]
        return ["Each cell: *sufficiency / necessity* (README §5), 1 is best; task SAEs at their chosen "
                "setting.",
                _table(cells, ["cross-section"] + methods),
                self.figure("approximation.png", panels, ncols=2, size=(6, 3.6)),
                "Look for supervised bars near 1 and how close each SAE gets; mean ablation is the floor."]

    def edit_panels(self, methods, attribute, site):
        """Two panels for one headline site: edit accuracy against the weight removed at k = 2, and
        against the latents the edit changes (greedy solid, F1-guided dashed; supervised: exact)."""
        ks = sorted({r["k"] for r in self.find("edit_accuracy") if r.get("k") is not None})
        score = {m: [self.edit(test, site, m, attribute) for test in ("weight_removed", "edit_accuracy")]
                 for m in methods}  # (x, y) of the scatter
        baseline = self.edit("edit_accuracy_no_intervention", site, "none", attribute)
        by_weight = [("scatter", m, score[m], {"s": 60, "color": COLORS.get(m), "marker": MARKERS.get(m)})
                     for m in methods if None not in score[m]]
        by_weight += _mark("no intervention", "h", baseline, **DASHED)
        by_k = []
        for m in methods:
            if m.startswith("supervised"):  # one feature swapped whatever k: its accuracy, drawn across
                by_k += _mark(f"{m} (exact)", "h", score[m][1], color=COLORS[m], ls=":")
                continue
            for kind, style in (("greedy", {"marker": "o"}), ("f1", {"ls": "--", "marker": "s", "mfc": "w"})):
                points = [(self.edit("latents_changed", site, m, attribute, k, kind),
                           self.edit("edit_accuracy", site, m, attribute, k, kind)) for k in ks]
                by_k.append(_line(f"{m} {kind}", points, color=COLORS.get(m), **style))
        axes = {"title": f"edit {attribute} @ {site}", "ylabel": "edit accuracy", "ylim": (0, 1.05)}
        widest = max([1.05] + [1.05 * removed for removed, _ in score.values() if removed is not None])
        return ({**axes, "series": by_weight, "xlabel": "weight removed", "xlim": (0, widest)},
                {**axes, "series": by_k, "xlabel": "latents the edit changes", "xscale": "log", "xticks": ks,
                 "xticklabels": [str(k) for k in ks]})

    def edit_cell(self, site, attribute, method, kind="greedy"):
        """'edit accuracy / weight removed', and for SAEs '(latents changed of L0 there)'."""
        text = " / ".join(_fmt(self.edit(test, site, method, attribute, kind=kind)) for test in EDIT)
        changed = self.edit("latents_changed", site, method, attribute, kind=kind)
        l0 = self.at("l0_at_site", site, method, choose_for=attribute)
        return text if changed is None else f"{text} ({changed:.1f} of L0 {_fmt(l0)})"

    def control(self):
        records, chosen = self.find("edit_accuracy"), self.find("edit_distance_k2", chosen=True)
        if not records:
            return []
        methods, pairs = _distinct(records), dict.fromkeys((r["site"], r["attribute"]) for r in records)
        saes, chosen_methods = [m for m in methods if not m.startswith("supervised")], _distinct(chosen)
        panels = [self.edit_panels(methods, attribute, site) for attribute, site in self.headline()]
        setting = {(r["site"], r.get("attribute"), r["method"]):
                   f"{_setting(r['method'], r['setting'])} ({_fmt(r['value'])})" for r in chosen}
        out = [self.figure("control_headline.png", [by_weight for by_weight, _ in panels]),
               "Headline edits (README §6): k = 2 SAE latents changed greedily, or one supervised feature "
               "swapped. Look for markers high above the dashed no-intervention line, with little weight "
               "removed."] if panels else []
        out += ["Each cell: edit accuracy / weight removed at k = 2 (SAEs: latents actually changed, of "
                "their mean L0 there); `none`: accuracy without intervention (an edit informs only if low).",
                _table([[site, a, self.edit("edit_accuracy_no_intervention", site, "none", a)]
                        + [self.edit_cell(site, a, m) for m in methods] for site, a in pairs],
                       ["cross-section", "attribute", "none"] + methods),
                "The interpretation-aware edit: 1 latent out (best F1 for the old value), 1 in (the new):",
                _table([[site, a] + [self.edit_cell(site, a, m, "f1") for m in saes] for site, a in pairs],
                       ["cross-section", "attribute"] + saes)]
        if panels:
            out += [self.figure("control_vs_k.png", [by_k for _, by_k in panels]),
                    "Look for how fast accuracy climbs with the latents an edit changes: greedily towards "
                    "the counterfactual (solid), or swapping k/2 latents of the old value for k/2 of the new "
                    "(dashed)."]
        if chosen:
            out += ["The SAE setting chosen per site and attribute: the one whose k = 2 edits land closest "
                    "to the counterfactual activation (L2 distance in brackets).",
                    _table([[site, a] + [setting.get((site, a, m)) for m in chosen_methods]
                            for site, a in dict.fromkeys((r["site"], r.get("attribute")) for r in chosen)],
                           ["cross-section", "attribute"] + chosen_methods)]
        return out

    def interpretability(self):
        records = self.find("f1_coverage")
        sites, methods = _distinct(records, "site", SITES), _distinct(records)
        attributes = _distinct(records, "attribute", ())
        coverage = {(site, a, m): self.at("f1_coverage", site, m, attribute=a)
                    for site in sites for a in attributes for m in methods}
        panels = [_bars(sites, {m: [coverage[site, a, m] for site in sites] for m in methods},
                        title=f"F1 coverage of {a}", ylabel="values with F1 ≥ 0.8", ylim=(0, 1.05))
                  for a in attributes]
        out = ["F1 coverage (README §7): the share of an attribute's values that some latent detects "
               "with F1 ≥ 0.8, averaged over its nodes. Look for bars near 1: a latent for every value.",
               _table([[site, a] + [coverage[site, a, m] for m in methods] for site in sites
                       for a in attributes], ["cross-section", "attribute"] + methods),
               self.figure("f1_coverage.png", panels)] if records else []
        tests = {"causal_keep_sufficiency": "keep latents with F1 ≥ t: sufficiency",
                 "causal_remove_necessity": "remove latents with F1 ≥ t: necessity"}
        if any(self.find(test) for test in tests):
            panels = [self.causal_panel(test, title) for test, title in tests.items()]
            out += [self.figure("causal_f1.png", panels, ncols=2, size=(5, 3.5)),
                    "Look at t = 0.6 (dotted): if the interpretable latents carry the computation, keeping "
                    "only them preserves the logit difference and removing them destroys it."]
        return out

    def causal_panel(self, test, title):
        """Keep or remove the latents of F1 ≥ t (README §7): the score, averaged over sites, against t."""
        records = self.find(test)
        sites, thresholds = _distinct(records, "site", SITES), sorted({r["threshold"] for r in records})
        lines = [_line(m, [(t, _mean([self.at(test, site, m, threshold=t) for site in sites]))
                           for t in thresholds], marker="o", color=COLORS.get(m)) for m in _distinct(records)]
        return {"series": lines + _mark(None, "v", 0.6, **DOTTED), "title": title,
                "xlabel": "F1 threshold t", "ylabel": "score (mean over sites)"}

    def evidence(self, phenomenon, attributes):
        """The gate of a phenomenon (README §9): where it is tested and why, or why it is not testable."""
        gate = self.find("phenomenon_testable", phenomenon=phenomenon)
        if not gate:
            return []
        names = [a.upper() if a != "pos" else "Pos" for a in attributes]
        criterion = (f"needs {' and '.join(names)} present (supervised feature norm ≥ {metrics.PRESENT} of "
                     "the activations' spread) and causal (patching its counterfactual into the node alone "
                     f"changes ≥ {metrics.CAUSAL:.0%} of the answers or moves the mean LD by as much)")
        headers = ["node"] + [f"{name}: norm / answers changed / LD moved" for name in names]

        def row(node):
            return [node] + [f"{_fmt(self.mean('evidence_norm', site=node, attribute=a))} / "
                             f"{_percent(self.mean('evidence_answers_changed', site=node, attribute=a))} / "
                             f"{_percent(self.mean('evidence_ld_moved', site=node, attribute=a))}"
                             for a in attributes]
        if gate[0]["value"]:
            node = gate[0]["site"]
            return [f"The test {criterion}; it runs at `{node}`:", _table([row(node)], headers)]
        nodes = dict.fromkeys(r["site"] for r in self.find("evidence_norm"))
        closest = sorted(nodes, key=lambda node: -min(self.mean("evidence_norm", site=node, attribute=a) or 0
                                                      for a in attributes))
        return [f"**Not testable here.** The test {criterion}, and no node has that. The closest nodes:",
                _table([row(node) for node in closest[:4]], headers)]

    def occlusion(self):
        """README §9: names with a latent of their own, the α sweep, and the toy model."""
        out = self.evidence("occlusion", ("io", "s"))
        keys = dict.fromkeys((r["site"], r["method"], r.get("setting"))
                             for r in self.find("occlusion_io_names"))
        rows = [(node, m, _setting(m, s), *(_count(self.mean(test, site=node, method=m, setting=s))
                                            for test in ("occlusion_io_names", "occlusion_s_names")))
                for node, m, s in keys]
        if rows:
            bars = _bars([f"{node}\n{m} {setting}" for node, m, setting, _, _ in rows],
                         {"IO names": [row[3] for row in rows], "S names": [row[4] for row in rows]},
                         title="Names with a latent of F1 ≥ 0.5", ylabel="names")
            norms = self.find("supervised_feature_norm")
            out += [_table(rows, ["node", "method", "setting", "IO names", "S names"]),
                    self.figure("occlusion.png", [bars], size=(7, 3.5)),
                    "Look for many IO names but few S names: S is present and causal at this node, yet the "
                    "SAE gives it almost no latents of its own."]
            if norms:
                out.append("Mean norm of the supervised features there: " + ", ".join(
                    f"{r['attribute'].upper()} {r['value']:.2f}" for r in norms)
                    + " — the larger feature wins.")
        settings = sorted({r.get("setting") for r in self.find("alpha_sweep_io_names")}, key=lambda v: v or 0)
        lines = []
        for i, setting in enumerate(settings):
            for name, ls in (("IO", "-"), ("S", "--")):
                records = self.find(f"alpha_sweep_{name.lower()}_names", setting=setting)
                label = f"{name} {_setting(records[0]['method'], setting)}" if records else None
                points = sorted((r["alpha"], r["value"]) for r in records)
                lines.append(_line(label, points, ls=ls, marker="o", color=f"C{i}"))
        sweep = {"series": lines, "title": "SAEs trained on a − α·u_IO", "xlabel": "α",
                 "ylabel": "names with a latent (F1 ≥ 0.5)"}
        out += self.figured("alpha_sweep.png", sweep, "Look for the crossing: as α shrinks the IO features, "
                            "IO latents (solid) vanish and S latents (dashed) appear.")
        toy = self.find("occlusion_toy_recovered")
        return out if not toy else out + [
            "Toy model a = u_IO + v_S (216 values each, 64 dimensions, as in the paper) with the feature "
            "norms measured at the occlusion node (where not testable, a stated 2:1 ratio): the share of "
            "features with a vanilla-SAE latent of F1 > 0.9. Look for the high-norm features found and the "
            "low-norm ones missed.",
            _table([(r["attribute"].upper(), r.get("norm"), _setting("vanilla", r.get("setting")), r["value"])
                    for r in toy], ["feature", "norm", "setting", "share recovered"])]

    def oversplitting(self):
        """README §9: latents per Pos value in the model, and the toy where 1000 random latents win."""
        rows = [(r["site"], r["method"], _setting(r["method"], r.get("setting")), _count(r["value"]))
                for r in self.find("pos_latents", phenomenon="oversplitting")]
        out = self.evidence("oversplitting", ("pos",)) + ([
            "Latents whose best interpretation is a Pos value there (the paper: ≥ 10 for this binary "
            "attribute in GPT-2 Small's name-mover queries):",
            _table(rows, ["node", "method", "setting", "Pos latents"])] if rows else [])
        if not self.find("oversplit_toy_loss"):
            return out
        paper_grid = {m: self.find("oversplit_toy_loss", method=m, grid="paper")
                      for m in ("ideal_2_latent", "random_1000_latent")}
        fired = [r["l1"] for r in paper_grid["ideal_2_latent"] if r["firing"] >= 0.02]
        panel = {"title": "Toy ±µ + noise: best SAE loss (the paper's grid)", "xlabel": "λ",
                 "ylabel": "loss",
                 "series": [_line(label, sorted((r["l1"], r["value"]) for r in paper_grid[m]), color=color)
                            for m, label, color in (("ideal_2_latent", "ideal 2-latent SAE", "#2ca02c"), (
                                "random_1000_latent", "random 1000-latent SAE", "#d62728"))]
                 + _mark("ideal SAE fires on < 2% beyond", "v", max(fired, default=None), **DOTTED)}
        counts = ("counted", "random_wins", "ideal_wins", "ties", "not_counted")
        return out + [
            self.figure("oversplit_toy.png", [panel], size=(6, 3.5)),
            "Look for the red curve under the green one: 1000 meaningless latents beat the two true "
            "features on the SAE's own loss. Past the dotted line the ideal SAE (almost) never fires and "
            "both losses tend to E‖x‖², so wins count only where it fires on at least 2% of inputs:",
            _table([(grid, *(_count(self.mean(f"oversplit_toy_{c}", grid=grid)) for c in counts),
                     self.mean("oversplit_toy_share_random_wins", grid=grid)) for grid in ("paper", "ours")],
                   ["grid", "λ counted", "random wins", "ideal wins", "ties", "λ not counted",
                    "share random"])]

    def core(self):
        tests = ["l0", "mse", "fve", "dead_fraction", "ld_recovered", "train_steps", "train_converged"]
        keys = dict.fromkeys((r["method"], r.get("setting"))
                             for test in tests for r in self.by_test.get(test, []))
        order = sorted(keys, key=lambda key: (METHODS.index(key[0]) if key[0] in METHODS else len(METHODS),
                                              key[1] or 0))
        return [] if not keys else [
            _table([[m, _setting(m, setting)] + [self.mean(test, method=m, setting=setting) for test in tests]
                    for m, setting in order], ["method", "setting"] + tests),
            "README §8; dead fraction on the training activations, the rest on the evaluation ones; "
            "train_steps: Adam steps run; train_converged: the share of SAEs that met the plateau criterion "
            "(loss improving < 1% over the last 10% of epochs) before the cap. LD recovered skips nodes "
            f"whose mean ablation alone moves the LD by < {metrics.MIN_NODE_EFFECT:.1%} "
            "(it divides by that)."]

    def paper(self):
        """Our numbers beside the paper's, each with its verdict and the criterion behind it."""
        rows = self.paper_edit_rows() + self.occlusion_verdict()
        for phenomenon in ("occlusion", "oversplitting"):
            gate = self.find("phenomenon_testable", phenomenon=phenomenon)
            if gate and not gate[0]["value"]:
                rows.append((f"{phenomenon}: in the model", "seen in GPT-2 Small", "—",
                             "not testable here (section 6 shows the measurement)"))
        # the trained SAEs only: the frozen random decoder is a floor, its latents are not learned
        pos = [r["value"] for r in self.find("pos_latents", phenomenon="oversplitting")
               if r["method"] in ARCHS]
        if pos:
            rows.append(("over-splitting: latents interpreted as a Pos value", "≥ 10",
                         f"{min(pos):g}–{max(pos):g}",
                         "reproduced (criterion: ≥ 10 in every setting)" if min(pos) >= 10 else
                         "in some settings (criterion: ≥ 10)" if max(pos) >= 10 else
                         "not reproduced (criterion: ≥ 10)"))
        wins, counted = (self.mean(f"oversplit_toy_{c}", grid="paper")
                         for c in ("share_random_wins", "counted"))
        if wins is not None:
            rows.append((f"toy (paper's grid): share of the {_count(counted)} λ where the ideal SAE "
                         "fires on ≥ 2% of inputs that the random SAE wins", "1.00", f"{wins:.2f}",
                         ("reproduced" if wins >= 0.95 else "not reproduced") + " (criterion ≥ 0.95)"))
        return [] if not rows else [
            "Ours: min–max over the headline sites (task SAEs at their chosen setting, greedy edits) where "
            "an edit must change the model's answer (no-intervention edit accuracy below 0.5). Higher edit "
            "accuracy is better; less weight removed means a more surgical edit.",
            _table(rows, ["quantity", "paper", "this run", "verdict"])]

    def paper_edit_rows(self):
        """k = 2 edits against the paper's ranges (README §6), at the headline sites where an edit informs:
        without any intervention the model's answer mostly differs from the counterfactual's."""
        sites = [(a, s) for a, s in self.headline()
                 if (self.edit("edit_accuracy_no_intervention", s, "none", a) or 0) < 0.5]
        rows = []
        for m, ranges in PAPER_EDITS.items():
            for test, paper in zip(EDIT, ranges):
                ours = [value for a, s in sites if (value := self.edit(test, s, m, a)) is not None]
                if paper and ours:
                    low, high = min(ours), max(ours)
                    rows.append((f"{m}: {test.replace('_', ' ')} at k = 2", "{:.2f}–{:.2f}".format(*paper),
                                 f"{low:.2f}–{high:.2f}",
                                 "within the paper's range" if paper[0] <= low and high <= paper[1] else
                                 "higher" if low > paper[1] else "lower" if high < paper[0] else
                                 "overlaps the paper's range"))
        return rows

    def occlusion_verdict(self):
        """Occlusion is reproduced if every setting has more IO than S names, and the α sweep crosses."""
        io_records = self.find("occlusion_io_names")
        if not io_records:
            return []
        io = [r["value"] for r in io_records]
        s = [self.mean("occlusion_s_names", site=r["site"], method=r["method"], setting=r.get("setting")) or 0
             for r in io_records]
        more_io = sum(i > j for i, j in zip(io, s))
        sweep = {a: [value for _, value in sorted((r["alpha"], r["value"])  # names with a latent, by α
                                                  for r in self.find(f"alpha_sweep_{a}_names"))]
                 for a in ("io", "s")}
        crossing = all(sweep.values()) and sweep["s"][-1] > sweep["s"][0] and sweep["io"][-1] < sweep["io"][0]
        verdict = ("reproduced (criterion: more IO than S names in every setting, and the crossing)"
                   if more_io == len(io) and crossing else f"not reproduced (more IO than S names in "
                   f"{more_io} of {len(io)} settings; crossing {'seen' if crossing else 'not seen'})")
        ours = (f"IO {min(io):g}–{max(io):g}, S ≤ {max(s):g}; α sweep: "
                + ("S latents appear, IO latents vanish" if crossing else "no such crossing"))
        return [("occlusion: names with a latent (F1 ≥ 0.5)", "almost every IO name, ≤ 22 S names; S "
                 "latents appear as α removes the IO features", ours, verdict)]

    def other_saes(self):
        """Each SAE graded by `grade-sae`, at the sites it reads, beside the yardstick at the same nodes."""
        rows = []
        for graded in self.find("graded_sae"):
            site, head = graded["site"], "" if graded.get("head") is None else f" head {graded['head']}"
            attributes = list(dict.fromkeys(r["attribute"] for r in self.find("edit_accuracy", site=site)))
            for m in _distinct(self.find("sufficiency", site=site)):
                if m != "mean_ablation":
                    edits = ", ".join(f"{a} {_fmt(self.edit('edit_accuracy', site, m, a))}"
                                      for a in attributes)
                    coverage = "" if m.startswith("supervised") else ", ".join(
                        f"{a} {_fmt(self.at('f1_coverage', site, m, attribute=a))}" for a in attributes)
                    rows.append([graded["method"], graded.get("reads", "") + head, site, m,
                                 " / ".join(_fmt(self.at(test, site, m)) for test in APPROXIMATION),
                                 edits, coverage])
        return [] if not rows else [
            "Each SAE at the cross-sections it reads, beside the supervised dictionaries fitted at the very "
            "same nodes and, where it reads single heads, our task SAEs: sufficiency / necessity (1 is "
            "best), edit accuracy at k = 2 (SAEs: greedy), F1 coverage (values with a latent of F1 ≥ 0.8).",
            _table(rows, ["SAE", "reads", "cross-section", "method", "sufficiency / necessity",
                          "edit accuracy", "F1 coverage"])]

    def markdown(self):
        sections = {"## 1. The model solves IOI": self.model(),
                    "## 2. The circuit: cross-sections we patch and edit": self.circuit(),
                    "## 3. Test 1 — approximation: sufficiency and necessity": self.approximation(),
                    "## 4. Test 2 — control: editing an attribute with a few latents": self.control(),
                    "## 5. Test 3 — interpretability": self.interpretability(),
                    "## 6. Two SAE failure modes": ["Where SAEs fail even though they approximate well "
                                                    "(README §9)."],
                    "### Feature occlusion": self.occlusion(),
                    "### Feature over-splitting": self.oversplitting(),
                    "## 7. Core SAE metrics (mean over nodes)": self.core(),
                    "## 8. Comparison with the paper": self.paper()}
        if self.find("graded_sae"):  # only a run that graded an SAE from elsewhere has this section
            sections["## 9. SAEs from elsewhere (`grade-sae`)"] = self.other_saes()
        blocks = self.header() + ["## At a glance", f"```\n{self.summary()}\n```"]
        for heading, body in sections.items():
            blocks += [heading] + (body or ["_Nothing in metrics.json for this section; section skipped._"])
        return "\n\n".join(blocks) + "\n"


def write_report(run_dir) -> str:
    """Write <run_dir>/report.md and figures/*.png from its metrics.json; return the terminal summary."""
    report = Report.load(run_dir)
    os.makedirs(report.figdir, exist_ok=True)
    markdown = report.markdown()
    gpt2.atomic_write(os.path.join(run_dir, "report.md"), lambda tmp: Path(tmp).write_text(markdown))
    return report.summary()


@cli.command()
@click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder holding metrics.json.")
def report(run_dir):
    """Write report.md and figures/ from RUN_DIR/metrics.json and print a summary."""
    click.echo(write_report(run_dir))
    click.echo(f"Wrote {os.path.join(run_dir, 'report.md')}")
# === end report ===


if __name__ == "__main__":
    cli()
