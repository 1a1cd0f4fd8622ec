"""Command-line interface: one subcommand per step of the pipeline, plus `demo` and `run`.

Follows the order of Makelov, Lange & Nanda (arXiv 2405.08366): a model solves IOI,
we collect activations at circuit nodes, fit supervised dictionaries and SAEs, grade
them on approximation, control and interpretability, and write a report.
"""
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
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


def device_problem(name):
    """Why torch cannot compute on device `name` here (None if it can)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"{name!r} is not a device (cpu, cuda, cuda:N or mps)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name}: CUDA is not available on this machine"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name}: MPS is not available on this machine"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"{name}: unsupported device type (cpu, cuda, cuda:N or mps)"
    return None


class Device(click.ParamType):
    """A device torch can compute on, on this machine."""
    name = "device"

    def convert(self, value, param, ctx):
        problem = device_problem(value)
        if problem:
            self.fail(problem, param, ctx)
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


# === gpt2 commands (download, generate, bench) ===

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
            hidden = not sys.stdout.isatty()
            with click.progressbar(length=size, label=os.path.basename(url), hidden=hidden) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise click.ClickException(f"{url}: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:  # unreachable, no such file, timeout, cut off
        raise click.ClickException(f"{url}: {getattr(error, 'reason', error)}") from None
    except ValueError as error:  # not a URL at all
        raise click.ClickException(f"{url}: {error}") from None
    if size and written != size:
        raise click.ClickException(f"{url}: connection closed after {written} of {size} bytes")
    return digest.hexdigest()


def _sha256_option(ctx, param, value):
    if value is not None and not (len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())):
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
            raise click.ClickException(f"{url.rstrip('/')}/model.safetensors: sha256 {digests['model.safetensors']} "
                                       f"does not match the expected {sha256}")
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
@click.option("--weights", default=None, help="GPT-2 checkpoint (dir or .safetensors); default: the embedded model.")
@click.option("--prompt", default="When Mary and John went to the store, John gave a drink to", show_default=True)
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
        raise click.ClickException(f"the model's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's")
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = gpt2.generate_tokens(model, prompt_tokens, n_tokens, temperature, generator)
    click.echo(prompt + tokenizer.decode(tokens[0, prompt_tokens.shape[1]:].tolist()))


def forward_flops(config, batch, n_pos, logits_at_last_only):
    """Matmul FLOPs (2 per multiply-add) of one forward pass over [batch, n_pos] tokens.

    Per token and layer: 2·3d² for q, k, v; 2·2·n_pos·d for attention scores and their
    weighted sum of values (the full square is computed, then masked); 2·9d² for the
    output projection (d²) and the MLP (8d²). With logits at the last position only,
    the last layer's output projection and MLP, and the unembedding (2·d·vocab), run
    at one position per prompt. LayerNorms, biases, GELU and softmax are not counted.
    """
    d, tokens = config.n_embd, batch * n_pos
    qkv_and_attention = tokens * (2 * 3 * d * d + 2 * 2 * n_pos * d)
    rows = batch if logits_at_last_only else tokens  # rows after the last attention
    return (config.n_layer * qkv_and_attention + (config.n_layer - 1) * tokens * 2 * 9 * d * d
            + rows * (2 * 9 * d * d + 2 * d * config.vocab_size))


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
    """Time our IOI-style forward against Hugging Face's and against a plain matmul.

    Ours: logits at the last position only, with hook_z of every head cached (what the
    pipeline runs). HF: its ordinary forward, logits at every position. Both have the same
    random weights (speed does not depend on their values) and see the same prompts, BOS
    first. The three are timed in turn within each repeat, so a busy machine slows all of
    them alike; we report medians, and the best matmul time as the machine's FLOP rate.
    """
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
        hf = None
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict()))
        hf.load_state_dict({f"transformer.{k}": v for k, v in ours.state_dict().items()}, strict=False)  # lm_head is tied
        hf = hf.to(device).eval()
        runs["hf"] = lambda: hf(tokens, use_cache=False).logits
    times = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: allocator, thread pool, kernel choice
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_seconds(run, device))
    ours_s = statistics.median(times["ours"])
    matmul_flops_per_s = 2 * matmul_size ** 3 / min(times["matmul"])
    ours_flops_per_s = forward_flops(config, batch, n_pos, logits_at_last_only=True) / ours_s
    result = {"batch": batch, "n_pos": n_pos, "repeats": repeats, "device": device, "matmul_size": matmul_size,
              "ours_s": ours_s, "ours_tokens_per_s": batch * n_pos / ours_s, "ours_gflops": ours_flops_per_s / 1e9,
              "matmul_gflops": matmul_flops_per_s / 1e9, "ours_fraction_of_matmul": ours_flops_per_s / matmul_flops_per_s,
              "hf_s": None, "hf_tokens_per_s": None, "hf_gflops": None, "ours_over_hf": None,
              "max_abs_logit_diff": None}
    if hf is not None:
        hf_s = statistics.median(times["hf"])
        difference = (runs["ours"]() - runs["hf"]()[:, -1]).abs().max().item()
        result.update(hf_s=hf_s, hf_tokens_per_s=batch * n_pos / hf_s, ours_over_hf=hf_s / ours_s,
                      hf_gflops=forward_flops(config, batch, n_pos, logits_at_last_only=False) / hf_s / 1e9,
                      max_abs_logit_diff=difference)
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
        click.echo(f"  ours / HF: {r['ours_over_hf']:.2f}x faster  (max |delta logit| {r['max_abs_logit_diff']:.1e})")
    bench_sae_command()


def bench_sae_command():
    """The SAE half of `bench`: batched stack vs per-SAE loop, FLOP rate, the paper's grid projected."""
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

# === end gpt2 commands ===


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
@click.option("--held-out", is_flag=True, help="Templates, objects and places the small model never trained on.")
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
    click.echo(f"{n} {'held-out' if held_out else 'evaluation'} prompts, {result['prompts_per_s']:.0f} prompts/s")
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
        click.echo("Heads found, each class by its own measure (>= 1/3 of the strongest head's, >= 2% of the LD):")
        click.echo("name movers by direct effect on the LD; S-inhibition by the LD drop through the name movers'")
        click.echo("queries when their z at end is mean-ablated; induction/duplicate token by the drop at s2.")
        click.echo(f"  {'head':>7} {'at':<4} {'direct':>7} {'via q':>7} {'LD drop':>8} {'(of LD)':>8}  role")
        for row in _circuit_rows(table["heads"]):
            click.echo(f"  {row[0]:>7} {row[1]:<4} {row[2]:>7} {row[3]:>7} {row[4]:>8} {row[5]:>8}  {row[6]}")
        click.echo("Cross-sections are kept if mean-ablating all their nodes at once moves the LD by >= 5%:")
        for row in table["sections"]:
            click.echo(f"  {row['section']:>12} LD drop {row['ld_drop']:>8.3f} ({row['fraction']:.1%})  "
                       f"{'kept' if row['kept'] else 'dropped: not causal in this model'}")
    else:
        click.echo("GPT-2 Small: head classes of Wang et al. (2022)")
        for role, heads in ioi.GPT2_SMALL_HEADS.items():
            click.echo(f"  {role:>20}: " + " ".join(f"{layer}.{head}" for layer, head in heads))
    for section in sections:
        click.echo(f"{section.name} (edits {', '.join(section.attributes)}): " + " ".join(map(str, section.nodes)))


def _circuit_rows(heads):
    """Rows (head, position, direct effect, effect via queries, LD drop, fraction, role) of the
    heads `ioi.discover` gave a role, strongest first; measures not taken are a dash."""
    def fmt(value, spec=".2f"):
        return "–" if value is None else format(value, spec)
    found = [row for row in heads if row["role"]]
    roles = ["name mover", "S-inhibition", "induction/duplicate token"]  # the circuit, from the logits back
    found.sort(key=lambda row: (roles.index(row["role"]) if row["role"] in roles else len(roles),
                                -abs(row["ld_drop"] or 0)))
    return [(row["head"], row["position"], fmt(row["direct_effect"]), fmt(row["query_effect"]),
             fmt(row["ld_drop"]), fmt(row["fraction"], ".1%"), row["role"]) for row in found]


# === end ioi commands ===


# === dictionaries commands (train-sae, supervised) ===

@cli.command("train-sae")
@click.option("--acts", "acts_path", required=True, help="safetensors file with an `acts` tensor [N, d].")
@click.option("--arch", type=click.Choice(["vanilla", "gated", "topk", "random_decoder"]), required=True,
              help="random_decoder: vanilla encoder over a frozen random unit decoder (the paper's floor).")
@click.option("--latents", type=click.IntRange(min=1), default=512, show_default=True,
              help="Dictionary size d_sae.")
@click.option("--l1", type=FiniteFloat(min=0),
              help="Sparsity coefficient λ on inputs scaled to mean norm √d  [default: 1 vanilla, 2.5 gated].")
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


# === end dictionaries commands ===


# === pipeline commands (evaluate, report, demo, run) ===

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
    vanilla_l1: tuple = (0.5, 1.0, 2.5, 5.0)
    gated_l1: tuple = (0.5, 1.0, 2.5, 5.0)
    topk_k: tuple = (3, 6, 12, 24)
    edit_k: tuple = (2, 4, 8, 16)     # latents an SAE edit may change
    corpus: Optional[str] = None      # .txt / .jsonl for full-distribution SAEs; None: pydoc prose
    corpus_tokens: int = 250_000
    corpus_d_sae: int = 2048
    corpus_epochs: int = 20
    corpus_l1: float = 1.0
    corpus_k: int = 6
    occlusion_alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    f1_thresholds: tuple = (0.0, 0.2, 0.4, 0.6, 0.8)
    batch_size: int = 256
    device: str = "cpu"

    @classmethod
    def load(cls, path):
        """The settings in a run folder's config.json, each checked by its option type: a
        corrupt file is a one-line error, and is never overwritten."""
        try:
            saved = _read_json(path)
        except ValueError as error:  # malformed JSON, or not text
            raise click.ClickException(f"{path}: not valid JSON ({error})") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(saved, dict):
            raise click.ClickException(f"{path}: expected a JSON object of settings, "
                                       f"got {type(saved).__name__}")
        if set(saved) != names:
            problems = [f"{label} {', '.join(sorted(keys))}" for label, keys in
                        (("unknown settings", set(saved) - names), ("missing settings", names - set(saved)))
                        if keys]
            raise click.ClickException(f"{path}: {'; '.join(problems)}")
        try:
            config = cls(**{f.name: _checked_setting(f, saved[f.name]) for f in fields(cls)})
        except click.BadParameter as error:
            raise click.ClickException(f"{path}: {error.message}") from None
        if max(config.topk_k) > config.d_sae or config.corpus_k > config.corpus_d_sae:
            raise click.ClickException(f"{path}: a top-k SAE's k exceeds its number of latents")
        return config


# How config.json's numeric settings are checked, where not as positive integers.
SETTING_TYPES = {"n_train": click.IntRange(min=10), "n_eval": click.IntRange(min=10), "seed": SEED,
                 "sae_lr": FiniteFloat(min=0, min_open=True), "sae_plateau": FiniteFloat(min=0, max=1),
                 "occlusion_alphas": FiniteFloat(),
                 "f1_thresholds": FiniteFloat(),
                 **dict.fromkeys(("vanilla_l1", "gated_l1", "corpus_l1"), FiniteFloat(min=0))}


def _checked_setting(field, value):
    """`value` as the RunConfig setting `field`, or a click.BadParameter naming it: a path or
    null (weights, corpus), a string (device), else numbers of the type in SETTING_TYPES."""
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


# Converging 512-latent SAEs at all 18 nodes of the embedded model takes ~30 s to 75 s per stack of
# 4 on 2 CPU cores at lr 3e-3 (at 1e-3 most hit a 1,000-epoch cap), so the demo has one setting each.
DEMO = RunConfig(n_train=5_000, n_eval=500, epochs=1000, sae_lr=3e-3, vanilla_l1=(1.0,), gated_l1=(1.0,),
                 topk_k=(3,), corpus_tokens=20_000, corpus_d_sae=512, corpus_epochs=10)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


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
    splits = {"train": train, "eval": evaluation}
    for i, attribute in enumerate(ioi.ATTRIBUTES):
        splits[f"cf_{attribute}"] = ioi.counterfactuals(evaluation, attribute, seed=config.seed + 2 + i)
    return splits


class Run:
    """One run folder: the model, prompts, circuit and activations, built step by step.

    Each step caches its result under the folder (activations, dictionaries, SAEs), keyed
    by what produced it, so an interrupted run resumes and a changed setting recomputes.
    """

    def __init__(self, out, config):
        self.out, self.config = out, config
        self.model = load_model(config.weights, config.device)
        self.splits = make_splits(config)
        found_with = discovery_prompts()  # not the evaluation prompts: see DISCOVERY_N
        check_reads_prompts(self.model, [p for split in [found_with, *self.splits.values()] for p in split])
        self.attributes = {split: ioi.attribute_ids(prompts) for split, prompts in self.splits.items()}
        click.echo("Finding the circuit ...")
        self.sections, self.discovery = ioi.circuit_cross_sections(self.model, found_with, config.batch_size)
        if not self.sections:
            raise click.ClickException("no cross-section found: the model does not seem to solve IOI")
        self.nodes = list(dict.fromkeys(node for section in self.sections for node in section.nodes))
        self.training = {}  # (method, setting, node) -> how its SAE's training ended (steps, loss, converged)
        click.echo(f"{len(self.sections)} cross-sections, {len(self.nodes)} nodes")
        self.acts = {split: ioi.collect_activations(self.model, prompts, self.nodes, config.batch_size,
                                                    cache_dir=os.path.join(out, "activations"))
                     for split, prompts in self.splits.items()}
        # Last: the folder is bound to these settings only once they have produced its
        # activations, so a run that fails to start neither leaves nor changes config.json.
        os.makedirs(out, exist_ok=True)
        gpt2.write_json(os.path.join(out, "config.json"), asdict(config))

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def add_nodes(self, nodes):
        """Collect (or load from the cache) activations at more nodes, in every split: the nodes
        an SAE from elsewhere reads (`grade-sae`)."""
        new = [node for node in nodes if node not in self.acts["train"]]
        for split, prompts in self.splits.items() if new else ():
            self.acts[split].update(ioi.collect_activations(self.model, prompts, new, self.config.batch_size,
                                                            cache_dir=self.path("activations")))

    def fit_supervised(self, nodes=None):
        """Mean and least-squares supervised dictionaries at every node (README §4), or at `nodes`."""
        n_values = {"io": len(ioi.NAMES), "s": len(ioi.NAMES), "pos": len(ioi.PATTERNS)}
        dictionaries_by_method = {}
        for method, name in (("mean", "supervised"), ("lstsq", "supervised_lstsq")):
            fitted = {node: dictionaries.SupervisedDictionary.fit(self.acts["train"][node], self.attributes["train"],
                                                                  n_values, method)
                      for node in nodes or self.nodes}

            def write(folder, fitted=fitted):
                for node, dictionary in fitted.items():
                    dictionary.save(os.path.join(folder, str(node)))
            if nodes is None:  # the run's own dictionaries; ones fitted for another SAE's nodes are not kept
                gpt2.atomic_folder(self.path("dictionaries", name), write)
            dictionaries_by_method[name] = fitted
        return dictionaries_by_method

    def _train_stack(self, label, datasets, specs, train_config):
        """Train (or load, when the same stack was saved before) SAEs one per spec."""
        key = {"datasets": hashlib.sha256(datasets.numpy().tobytes()).hexdigest()[:16],
               "specs": [asdict(spec) for spec in specs], "train": asdict(train_config)}
        folder = self.path("saes", label)
        stamp = os.path.join(folder, "stack.json")
        if os.path.exists(stamp) and _read_json(stamp) == json.loads(json.dumps(key)):  # (tuples -> lists)
            return ([dictionaries.load_sae(os.path.join(folder, spec.name)) for spec in specs],
                    _read_json(os.path.join(folder, "logs.json")))
        saes, logs = dictionaries.train_sae_stack(datasets, specs, train_config, progress=True)

        def write(tmp):  # the whole stack in one rename: a killed save never mixes old and new SAEs
            for spec, sae in zip(specs, saes):
                dictionaries.save_sae(sae, os.path.join(tmp, spec.name))
            gpt2.write_json(os.path.join(tmp, "logs.json"), logs)
            gpt2.write_json(os.path.join(tmp, "stack.json"), key)  # last: marks a complete stack
        gpt2.atomic_folder(folder, write)
        return saes, logs

    def train_task_saes(self):
        """{method: {setting: {node: SAE}}} for every architecture and hyper-parameter (README §8),
        plus the frozen-random-decoder floor; all nodes x settings of one architecture train
        as one batched stack."""
        c = self.config
        datasets = torch.stack([self.acts["train"][node] for node in self.nodes])  # [node, N, d_head]
        l1 = "l1_coefficient"  # (SAESpec field, value); folders: l1<value>/<node>, k<value>/<node>
        grids = {"vanilla": [(l1, v) for v in c.vanilla_l1], "gated": [(l1, v) for v in c.gated_l1],
                 "topk": [("k", k) for k in c.topk_k],
                 "random_decoder": [(l1, c.vanilla_l1[len(c.vanilla_l1) // 2])]}
        saes = {}
        for method, grid in grids.items():
            arch = "vanilla" if method == "random_decoder" else method
            specs = [dictionaries.SAESpec(arch, i, seed=c.seed + j, frozen_decoder=method == "random_decoder",
                                          name=f"{name.removesuffix('_coefficient')}{value}/{node}",
                                          **{name: value})
                     for j, (name, value) in enumerate(grid) for i, node in enumerate(self.nodes)]
            trained, logs = self._train_stack(method, datasets, specs, self.sae_train_config())
            saes[method] = {value: dict(zip(self.nodes, trained[j * len(self.nodes):(j + 1) * len(self.nodes)]))
                            for j, (_, value) in enumerate(grid)}
            final = {log["sae"]: log for log in logs}  # the last log of each SAE: how its training ended
            for j, (_, value) in enumerate(grid):
                for i, node in enumerate(self.nodes):
                    self.training[method, value, node] = final[j * len(self.nodes) + i]
        return saes

    def sae_train_config(self):
        """Task SAEs (and the phenomena's SAEs) train until they converge, capped at `epochs`."""
        c = self.config
        return dictionaries.TrainConfig(d_sae=c.d_sae, epochs=c.epochs, lr=c.sae_lr,
                                        plateau=c.sae_plateau or None)

    def train_corpus_saes(self):
        """{f"{arch}_fulldist": {node: SAE}}: SAEs trained on every token position of generic text."""
        c = self.config
        heads = list(dict.fromkeys((node.hook_name, node.head) for node in self.nodes))
        click.echo(f"Collecting {c.corpus_tokens} corpus activations at {len(heads)} (hook, head) pairs ...")
        corpus = dictionaries.collect_corpus_activations(self.model, gpt2.load_tokenizer(), heads,
                                                         dictionaries.iter_corpus_texts(c.corpus), c.corpus_tokens,
                                                         context=min(128, self.model.config.n_positions))
        datasets = torch.stack([corpus[head] for head in heads]).cpu()  # [head, tokens, d_head]
        saes = {}
        for arch in ARCHS:
            specs = [dictionaries.SAESpec(arch, i, l1_coefficient=c.corpus_l1, k=c.corpus_k, seed=c.seed,
                                          name=f"{name}.{head}") for i, (name, head) in enumerate(heads)]
            trained, _ = self._train_stack(f"{arch}_fulldist", datasets, specs,
                                           dictionaries.TrainConfig(d_sae=c.corpus_d_sae, epochs=c.corpus_epochs, lr=c.sae_lr))
            by_head = dict(zip(heads, trained))
            saes[f"{arch}_fulldist"] = {node: by_head[(node.hook_name, node.head)] for node in self.nodes}
        return saes


class Grader:
    """Scores every method at every cross-section on the paper's three tests and records
    the results as flat rows {test, site, method, value, ...} (README §5-9)."""
    MIN_NODE_EFFECT = 0.005  # per-node LD recovered only where ablating the node alone moves the LD by >= 0.5%
    MIN_SECTION_EFFECT = 0.05  # as ioi.discover: grade a site if mean-ablating it moves the mean LD by >= 5%

    def __init__(self, run):
        self.run, self.records = run, []
        self.prompts = run.splits["eval"]
        self.clean_run = self.patched({})
        self._interpretations = {}

    def record(self, test, site, method, value, **params):
        self.records.append({"test": test, "site": site, "method": method, "value": float(value), **params})

    def patched(self, patches):
        return metrics.patched_run(self.run.model, self.prompts, patches, self.run.config.batch_size)

    def interpretations(self, sae, node):
        """F1 of each latent for every candidate property, on the training prompts (where every
        name occurs as IO and as S, unlike the evaluation prompts: README §6's fix)."""
        key = (id(sae), node)  # one SAE may read several nodes (a head at several positions)
        if key not in self._interpretations:
            active = sae.active(self.run.acts["train"][node])
            self._interpretations[key] = metrics.interpret_latents(active, self.run.attributes["train"],
                                                                   ioi.NAMES)
        return self._interpretations[key]

    # ---------------------------------------------------------------- the model itself

    def grade_model(self):
        diffs = self.clean_run.logit_diff
        io_token = torch.tensor([ioi.name_token(p.io) for p in self.prompts])
        self.record("logit_diff", "model", "clean", diffs.mean())
        self.record("accuracy", "model", "clean", (diffs > 0).float().mean())
        self.record("top1_accuracy", "model", "clean", (self.clean_run.top_token == io_token).float().mean())
        counts, edges = np.histogram(diffs.numpy(), bins=30)
        for count, low, high in zip(counts, edges[:-1], edges[1:]):
            self.record("logit_diff_histogram", "model", "clean", count, low=float(low), high=float(high))

    # ---------------------------------------------------------------- one cross-section

    def grade_section(self, section, supervised, task_saes, corpus_saes):
        site, nodes, acts = section.name, section.nodes, self.run.acts
        clean = {node: acts["eval"][node] for node in nodes}
        self.mean_ablated_run = self.patched({node: clean[node].mean(0).expand_as(clean[node]) for node in nodes})
        self.counterfactual = {attribute: {node: acts[f"cf_{attribute}"][node] for node in nodes}
                               for attribute in section.attributes}
        self.truth = {attribute: self.patched(cf) for attribute, cf in self.counterfactual.items()}
        for attribute in section.attributes:
            self.record("edit_accuracy_no_intervention", site, "none",
                        metrics.edit_accuracy(self.clean_run.top_token, self.truth[attribute].top_token), attribute=attribute)

        def approximation(method, reconstruction, **params):
            scores = metrics.approximation(self.run.model, self.prompts, clean, reconstruction, self.clean_run,
                                           self.mean_ablated_run, self.run.config.batch_size)
            for test, value in scores.items():
                self.record(test, site, method, value, **params)

        approximation("mean_ablation", {node: clean[node].mean(0).expand_as(clean[node]) for node in nodes})
        attributes = self.run.attributes
        for method, fitted in supervised.items():
            approximation(method, {node: fitted[node].reconstruct(attributes["eval"]) for node in nodes})
            for attribute in section.attributes:
                old, new = attributes["eval"][attribute], attributes[f"cf_{attribute}"][attribute]
                edited = {node: fitted[node].edit(clean[node], attribute, old, new) for node in nodes}
                weights = [fitted[node].feature_weights(attributes["eval"])[attribute].mean() for node in nodes]
                self.record_edit(site, method, attribute, edited, sum(weights) / len(weights))

        for method, settings in task_saes.items():
            chosen = self.choose_settings(site, method, settings, clean)
            for setting in dict.fromkeys(chosen.values()):
                edited = [attribute for attribute, s in chosen.items() if s == setting]
                self.grade_sae(section, method, settings[setting], clean, approximation, edited,
                               setting=setting)
        for method, saes in corpus_saes.items():
            self.grade_sae(section, method, saes, clean, approximation, section.attributes)

    def record_edit(self, site, method, attribute, edited, weight_removed, latents_changed=None, **params):
        accuracy = metrics.edit_accuracy(self.patched(edited).top_token, self.truth[attribute].top_token)
        self.record("edit_accuracy", site, method, accuracy, attribute=attribute, **params)
        self.record("weight_removed", site, method, weight_removed, attribute=attribute, **params)
        if latents_changed is not None:
            self.record("latents_changed", site, method, latents_changed, attribute=attribute, **params)

    def choose_settings(self, site, method, settings, clean):
        """The revised paper's choice, per attribute: the setting whose k=2 greedy edits of that
        attribute land closest (L2) to the counterfactual activations (mean over nodes and
        prompts). Returns {attribute: setting}."""
        chosen = {}
        for attribute, cf in self.counterfactual.items():
            distances = {}
            for setting, saes in settings.items():
                gaps = [(metrics.greedy_sae_edit(saes[node], clean[node], cf[node], 2)[0] - cf[node]).norm(dim=-1)
                        .mean() for node in clean]
                distances[setting] = float(sum(gaps) / len(gaps))
            chosen[attribute] = min(distances, key=distances.get)
            for setting, distance in distances.items():
                self.record("edit_distance_k2", site, method, distance, setting=setting, attribute=attribute,
                            chosen=setting == chosen[attribute])
        return chosen

    def grade_sae(self, section, method, saes, clean, approximation, edited_attributes, **params):
        site, nodes, attributes = section.name, section.nodes, self.run.attributes
        approximation(method, {node: saes[node](clean[node])[0] for node in nodes}, **params)
        features = {node: saes[node].encode(clean[node]) for node in nodes}
        directions = {node: metrics.raw_decoder_directions(saes[node]) for node in nodes}
        interpretations = {node: self.interpretations(saes[node], node) for node in nodes}

        def record_sae_edit(attribute, edits, **edit_params):
            """edits: {node: (edited activations, mask of the latents the edit changed)}."""
            weights = [metrics.sae_weight_removed(features[n], directions[n], changed).mean()
                       for n, (_, changed) in edits.items()]
            counts = [changed.sum(-1).float().mean() for _, changed in edits.values()]
            self.record_edit(site, method, attribute, {n: edited for n, (edited, _) in edits.items()},
                             sum(weights) / len(weights), float(sum(counts) / len(counts)), **edit_params, **params)

        for attribute in edited_attributes:
            cf = self.counterfactual[attribute]
            old, new = attributes["eval"][attribute], attributes[f"cf_{attribute}"][attribute]
            rankings = {node: metrics.latents_by_f1(interpretations[node].f1, interpretations[node].labels, attribute)
                        for node in nodes}
            # Both edits may change at most k latents: greedy picks k, F1-guided takes k/2 out and
            # k/2 in (k = 2: the paper's headline interpretation-aware edit, 1 out + 1 in).
            for k in self.run.config.edit_k:
                record_sae_edit(attribute, {node: metrics.greedy_sae_edit(saes[node], clean[node], cf[node], k)
                                            for node in nodes}, k=k, edit="greedy")
                record_sae_edit(attribute, {node: metrics.f1_guided_edit(saes[node], clean[node], cf[node],
                                                                         rankings[node][old], rankings[node][new],
                                                                         k // 2) for node in nodes}, k=k, edit="f1")

        mean_l0 = sum(metrics.l0(f) for f in features.values()) / len(nodes)
        self.record("l0_at_site", site, method, mean_l0, **params)
        for node in nodes:
            coverage = metrics.coverage(interpretations[node].f1, interpretations[node].labels, 0.8)
            for attribute in section.attributes:
                self.record("f1_coverage", site, method, coverage[attribute], attribute=attribute, node=str(node), **params)
            self.record("pos_latents", site, method, metrics.pos_latents(interpretations[node].best_labels),
                        node=str(node), **params)
        self.causal_curves(site, method, saes, clean, features, directions, interpretations, **params)

    def causal_curves(self, site, method, saes, clean, features, directions, interpretations, **params):
        """README §7: keep only latents with F1 >= t (sufficiency); mean-ablate the part the
        latents with F1 >= t explain (necessity), for each threshold t."""
        for threshold in self.run.config.f1_thresholds:
            kept, removed = {}, {}
            for node in clean:
                interpretable = interpretations[node].best_f1 >= threshold  # [d_sae]
                explained = (features[node] * interpretable) @ directions[node]  # [N, d]
                others = (features[node] * ~interpretable) @ directions[node]
                kept[node] = clean[node] - others
                removed[node] = clean[node] - explained + explained.mean(0)
            self.record("causal_keep_sufficiency", site, method,
                        metrics.sufficiency(self.patched(kept).logit_diff, self.clean_run.logit_diff),
                        threshold=threshold, **params)
            self.record("causal_remove_necessity", site, method,
                        metrics.necessity(self.mean_ablated_run.logit_diff, self.patched(removed).logit_diff,
                                          self.clean_run.logit_diff), threshold=threshold, **params)

    # ---------------------------------------------------------------- SAE core metrics

    def grade_core(self, task_saes, corpus_saes, sections=None):
        """L0, MSE, variance explained, dead fraction on the eval activations, for every SAE;
        LD recovered with one node patched, for every SAE of the chosen settings, at the nodes
        of `sections` (default: the run's cross-sections)."""
        everything = [(method, setting, saes) for method, settings in task_saes.items()
                      for setting, saes in settings.items()] + [(m, None, s) for m, s in corpus_saes.items()]
        for method, setting, saes in everything:
            params = {} if setting is None else {"setting": setting}
            for node, sae in saes.items():
                x = self.run.acts["eval"][node]
                x_hat, f = sae(x)
                for test, value in (("l0", metrics.l0(f)), ("mse", metrics.mse(x, x_hat)),
                                    ("fve", metrics.fraction_variance_explained(x, x_hat)),
                                    ("dead_fraction", metrics.dead_fraction(sae.active(self.run.acts["train"][node])))):
                    self.record(test, str(node), method, value, **params)
                trained = self.run.training.get((method, setting, node))
                if trained:  # how training ended: steps run, final loss, whether it converged before the cap
                    for key in ("steps", "loss", "converged"):
                        if trained.get(key) is not None:
                            self.record(f"train_{key}", str(node), method, float(trained[key]), **params)
        chosen = {}  # (site, method) -> the settings chosen there (one per attribute, often the same)
        for r in self.records:
            if r["test"] == "edit_distance_k2" and r["chosen"]:
                chosen.setdefault((r["site"], r["method"]), []).append(r["setting"])
        ablated, done = {}, set()
        for section in sections or self.run.sections:
            for method, settings in [*task_saes.items(), *((m, {None: s}) for m, s in corpus_saes.items())]:
                for node, setting in ((n, s) for s in dict.fromkeys(chosen.get((section.name, method), [None]))
                                      for n in section.nodes):
                    if (node, method, setting) in done:
                        continue
                    done.add((node, method, setting))
                    x = self.run.acts["eval"][node]
                    if node not in ablated:
                        ablated[node] = self.patched({node: x.mean(0).expand_as(x)})
                    effect = ablated[node].logit_diff.mean() - self.clean_run.logit_diff.mean()
                    if abs(effect) < self.MIN_NODE_EFFECT * abs(self.clean_run.logit_diff.mean()):
                        continue  # LD recovered divides by this effect: undefined for a node that does nothing alone
                    patched = self.patched({node: settings[setting][node](x)[0]})
                    self.record("ld_recovered", str(node), method,
                                metrics.ld_recovered(patched.logit_diff, ablated[node].logit_diff, self.clean_run.logit_diff),
                                **({} if setting is None else {"setting": setting}))

    # ---------------------------------------------------------------- the two phenomena (README §9)

    def attribute_evidence(self, supervised):
        """Per node and attribute: the supervised feature's mean norm relative to the spread of
        the activations (mean ‖a - ā‖), and its causal effect alone -- the share of answers that
        change, and how far the mean LD moves, when only this node takes the counterfactual
        activation. A phenomenon is tested only where this evidence says it can be."""
        evidence, ld_clean = {}, self.clean_run.logit_diff.mean()
        for node in self.run.nodes:
            x = self.run.acts["eval"][node]
            spread = (x - x.mean(0)).norm(dim=-1).mean()
            features = supervised["supervised"][node].features
            for attribute in ioi.ATTRIBUTES:
                patched = self.patched({node: self.run.acts[f"cf_{attribute}"][node]})
                evidence[node, attribute] = row = {
                    "norm": float(features[attribute].norm(dim=-1).mean() / spread),
                    "answers_changed": 1 - metrics.edit_accuracy(self.clean_run.top_token, patched.top_token),
                    "ld_moved": float(abs(patched.logit_diff.mean() - ld_clean) / abs(ld_clean))}
                for key, value in row.items():
                    self.record(f"evidence_{key}", str(node), "supervised", value, attribute=attribute)
        return evidence

    def phenomenon_node(self, evidence, attributes):
        """`metrics.phenomenon_node`; for GPT-2 Small only the paper's node, q@L10H0@end, is a candidate."""
        paper_node = ioi.Node("q", 10, 0, "end")
        if ioi.is_gpt2_small(self.run.model.config) and paper_node in self.run.nodes:
            evidence = {key: row for key, row in evidence.items() if key[0] == paper_node}
        return metrics.phenomenon_node(evidence, attributes)

    def grade_phenomena(self, supervised, task_saes):
        """Occlusion needs IO and S both present and causal at a node; over-splitting needs Pos
        present and causal. Where no node qualifies, the records say "not testable" and the
        evidence records above say why."""
        evidence = self.attribute_evidence(supervised)
        occlusion_node = self.phenomenon_node(evidence, ("io", "s"))
        split_node = self.phenomenon_node(evidence, ("pos",))
        self.record("phenomenon_testable", str(occlusion_node), "supervised", occlusion_node is not None,
                    phenomenon="occlusion")
        self.record("phenomenon_testable", str(split_node), "supervised", split_node is not None,
                    phenomenon="oversplitting")
        for method, settings in task_saes.items():
            for setting, saes in settings.items():
                if occlusion_node is not None:
                    interpretation = self.interpretations(saes[occlusion_node], occlusion_node)
                    for attribute in ("io", "s"):
                        self.record(f"occlusion_{attribute}_names", str(occlusion_node), method,
                                    metrics.names_with_latent(interpretation.f1, interpretation.labels, attribute,
                                                              0.5), setting=setting)
                if split_node is not None:
                    interpretation = self.interpretations(saes[split_node], split_node)
                    self.record("pos_latents", str(split_node), method,
                                metrics.pos_latents(interpretation.best_labels),
                                node=str(split_node), setting=setting, phenomenon="oversplitting")
        if occlusion_node is not None:
            features = supervised["supervised"][occlusion_node].features
            norms = {attribute: float(features[attribute].norm(dim=-1).mean()) for attribute in ("io", "s")}
            for attribute, norm in norms.items():
                self.record("supervised_feature_norm", str(occlusion_node), "supervised", norm,
                            attribute=attribute)
            self.alpha_sweep(occlusion_node, features["io"])
        else:
            norms = {"io": 1.0, "s": 0.5}  # the toy still shows the mechanism, at a stated 2:1 ratio
        self.occlusion_toy(norms)

    def alpha_sweep(self, node, io_features):
        """Train SAEs on a - α u_IO: as the IO features shrink, S latents should appear."""
        c, site = self.run.config, str(node)
        acts, io_ids = self.run.acts["train"][node], self.run.attributes["train"]["io"]
        datasets = torch.stack([acts - alpha * io_features[io_ids] for alpha in c.occlusion_alphas])
        k = c.topk_k[0]  # top-k: the architecture that learns name latents most readily
        specs = [dictionaries.SAESpec("topk", i, k=k, seed=c.seed, name=f"alpha{alpha}")
                 for i, alpha in enumerate(c.occlusion_alphas)]
        saes, _ = self.run._train_stack("occlusion_alpha_sweep", datasets, specs, self.run.sae_train_config())
        for alpha, sae, data in zip(c.occlusion_alphas, saes, datasets):
            interpretation = metrics.interpret_latents(sae.active(data), self.run.attributes["train"], ioi.NAMES)
            for attribute in ("io", "s"):
                self.record(f"alpha_sweep_{attribute}_names", site, "topk",
                            metrics.names_with_latent(interpretation.f1, interpretation.labels, attribute, 0.5),
                            alpha=alpha, setting=k)

    def occlusion_toy(self, norms):
        """a = u_i + v_j with the measured IO and S feature norms: which features do SAEs find?
        The paper's toy sizes (216 values, 64 dimensions: nearly orthogonal features), so
        that the norms decide what is recovered, not crowding in a small head."""
        c = self.run.config
        results = metrics.occlusion_toy_experiment(
            norms["io"], norms["s"], c.vanilla_l1, n_values=216, d=64, n_samples=20_000,
            config=self.run.sae_train_config(), seed=c.seed)
        for result in results:
            for attribute in ("io", "s"):
                self.record("occlusion_toy_recovered", "toy", "vanilla", result[attribute], attribute=attribute,
                            norm=norms[attribute], setting=result["l1"])

    def grade_oversplitting_toy(self):
        """Both grids (ours, finer in k and γ; the paper's, γ = 2.35): losses per λ, and who wins
        over the λ where the ideal SAE still fires (`metrics.oversplitting_verdict`)."""
        for grid, settings in (("ours", {}), ("paper", metrics.PAPER_OVERSPLITTING_GRID)):
            toy = metrics.oversplitting_toy(seed=self.run.config.seed, **settings)
            for lam, ideal, random, firing in zip(toy["lambdas"], toy["ideal_best_loss"], toy["random_best_loss"],
                                                  toy["ideal_firing"]):
                self.record("oversplit_toy_loss", "toy", "ideal_2_latent", ideal, l1=float(lam), grid=grid,
                            firing=float(firing))
                self.record("oversplit_toy_loss", "toy", "random_1000_latent", random, l1=float(lam),
                            grid=grid)
            for count, value in metrics.oversplitting_verdict(toy).items():
                self.record(f"oversplit_toy_{count}", "toy", "random_1000_latent", value, grid=grid)


def evaluate_run(run):
    """Every test of the paper on one run -> flat records (and the SAEs/dictionaries on disk)."""
    def timed(label, step, *args):
        started = time.time()
        result = step(*args)
        click.echo(f"{label}: {time.time() - started:.0f} s")
        return result

    supervised = timed("Supervised dictionaries", run.fit_supervised)
    task_saes = timed("Task SAEs", run.train_task_saes)
    corpus_saes = timed("Full-distribution SAEs", run.train_corpus_saes)
    grader = Grader(run)
    grader.grade_model()

    def grade_sections():
        with click.progressbar(run.sections, label="Grading cross-sections",
                               item_show_func=lambda s: s.name if s else "") as sections:
            for section in sections:
                grader.grade_section(section, supervised, task_saes, corpus_saes)
    timed("Tests 1-3 at every cross-section", grade_sections)
    timed("Core SAE metrics", grader.grade_core, task_saes, corpus_saes)
    timed("Feature occlusion and over-splitting", grader.grade_phenomena, supervised, task_saes)
    timed("Over-splitting toy", grader.grade_oversplitting_toy)
    return grader.records


def write_metrics(run, records):
    """metrics.json: the config, the circuit that was graded, and one flat row per result."""
    circuit = {"sections": [{"name": s.name, "nodes": [str(n) for n in s.nodes], "attributes": list(s.attributes)}
                            for s in run.sections], "discovery": run.discovery}
    gpt2.write_json(run.path("metrics.json"), {"config": asdict(run.config), "circuit": circuit, "results": records})


def recover_interrupted_saves(out):
    """Undo every save a killed run left unfinished in its folder `out`: gpt2.atomic_write and
    gpt2.atomic_folder leave NAME.tmp (and NAME.old) behind only when killed midway. Only what
    a run writes is looked at, since `out` may hold other files too."""
    saved = [os.path.join(out, name) for name in ("config.json", "metrics.json", "report.md")]
    for folder in ("activations", "dictionaries", "saes", "figures"):
        for root, dirs, files in os.walk(os.path.join(out, folder)):
            saved += [os.path.join(root, os.path.splitext(name)[0]) for name in dirs + files
                      if name.endswith((".tmp", ".old"))]
    for path in saved:  # parents first: a leftover inside a removed one is gone already
        gpt2.recover_interrupted_save(path)


def open_run(out, weights=None, preset=None, device="cpu", force=False, **overrides):
    """The run in folder `out`, bound to the settings in its config.json.

    Without settings given, the saved ones; with settings that differ from them, a one-line
    error unless `force`. A new folder, or `preset`, starts from a preset: "demo" (scaled
    down) for the embedded model, "paper" for real GPT-2 weights; the settings given
    override it. The device only decides where the run computes, so it is not bound.
    """
    recover_interrupted_saves(out)
    path, saved = os.path.join(out, "config.json"), None
    try:
        saved = RunConfig.load(path) if os.path.exists(path) else None
    except click.ClickException as error:
        if not force:
            raise click.ClickException(f"{error.message} (--force replaces it)") from None
    given = {name: value for name, value in dict(overrides, weights=weights).items() if value is not None}
    if saved is not None and preset is None:
        base = saved
    else:
        base = DEMO if (preset or ("demo" if weights is None else "paper")) == "demo" else RunConfig()
    config = replace(base, **given, device=device)
    changed = [] if saved is None else [
        f"{f.name} {getattr(saved, f.name)!r} -> {getattr(config, f.name)!r}" for f in fields(RunConfig)
        if f.name != "device" and getattr(saved, f.name) != getattr(config, f.name)]
    if changed and not force:
        more = f"; {len(changed) - 3} more" if len(changed) > 3 else ""
        raise click.ClickException(f"{path} holds other settings ({'; '.join(changed[:3])}{more}): "
                                   "add --force to rebind the folder to these, or choose a new --out")
    return Run(out, config)


FORCE_OPTION = click.option("--force", is_flag=True,
                            help="Rebind a run folder made with other settings to these (caches are kept).")


def run_options(function):
    """Options shared by every pipeline step: the run folder and what it runs on."""
    options = [
        click.option("--out", "out", default="runs/demo", show_default=True, callback=output_folder(),
                     help="Run folder (created if needed)."),
        click.option("--weights", default=None, help="GPT-2 checkpoint (dir or .safetensors); default: the embedded model."),
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


def _run_from_options(out, weights, preset, device, n_train, n_eval, epochs, force):
    return open_run(out, weights, preset, device, force, n_train=n_train, n_eval=n_eval, epochs=epochs)


@cli.command()
@run_options
def collect(**options):
    """Step 1: find the circuit and cache activations at its nodes."""
    run = _run_from_options(**options)
    for section in run.sections:
        click.echo(f"{section.name:12s} {', '.join(section.attributes):12s} {' '.join(str(n) for n in section.nodes)}")
    click.echo(f"Activations cached in {run.path('activations')}")


@cli.command()
@run_options
def supervised(**options):
    """Step 2: fit mean and least-squares supervised dictionaries at every node (README §4)."""
    run = _run_from_options(**options)
    run.fit_supervised()
    click.echo(f"Supervised dictionaries saved in {run.path('dictionaries')}")


@cli.command("train-saes")
@run_options
@click.option("--source", type=click.Choice(["ioi", "corpus", "both"]), default="both", show_default=True,
              help="Task SAEs on IOI activations, full-distribution SAEs on corpus text, or both.")
def train_saes(source, **options):
    """Step 3: train every SAE of the run (all nodes x settings, one batched stack per architecture)."""
    run = _run_from_options(**options)
    if source in ("ioi", "both"):
        run.train_task_saes()
    if source in ("corpus", "both"):
        run.train_corpus_saes()
    click.echo(f"SAEs saved in {run.path('saes')} (SAELens layout)")


def _evaluate_and_report(run, started):
    records = evaluate_run(run)
    write_metrics(run, records)
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')} in {time.time() - started:.0f} s")


@cli.command()
@run_options
def evaluate(**options):
    """Step 4: grade dictionaries and SAEs on all tests (steps 1-3 run or load as needed)."""
    _evaluate_and_report(_run_from_options(**options), time.time())


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, callback=output_folder(), help="Run folder.")
@FORCE_OPTION
def demo(out, force):
    """The whole paper on the embedded small IOI model, scaled to minutes on a CPU."""
    started = time.time()
    _evaluate_and_report(open_run(out, preset="demo", force=force), started)


@cli.command("run")
@run_options
def run_command(**options):
    """The whole paper with its settings (GPT-2 Small via --weights); resumes from the folder's caches."""
    started = time.time()
    _evaluate_and_report(_run_from_options(**options), started)


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
    model: `HookedTransformer.from_pretrained`'s defaults, unless cfg.json's
    metadata.model_from_pretrained_kwargs says otherwise (ours say: no processing). Two of its
    settings change what an SAE reads: fold_value_biases (hook_v and hook_z lack the value bias
    b_V, and ln1's bias times W_V when fold_ln is on) and center_writing_weights (the residual
    stream has mean 0 over d_model). Both fold into the SAE (dictionaries.fold_input_shift,
    fold_input_centring)."""
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


def grade_other_sae(run, label, sae, sections):
    """The paper's three tests (and the core SAE metrics) for one SAE from elsewhere at the sites
    it reads, beside the supervised dictionaries fitted at the same nodes (and our task SAEs,
    where it reads single heads, as ours do). Sites whose mean ablation barely moves the LD are
    skipped (sufficiency and necessity would divide by ~0). Returns the Grader's records."""
    grader = Grader(run)
    clean_ld = grader.clean_run.logit_diff.mean()
    graded = []
    for section in sections:
        clean = {node: run.acts["eval"][node] for node in section.nodes}
        mean_ablated = grader.patched({node: a.mean(0).expand_as(a) for node, a in clean.items()})
        ablated_ld = mean_ablated.logit_diff.mean()
        if abs(ablated_ld - clean_ld) >= Grader.MIN_SECTION_EFFECT * abs(clean_ld):
            graded.append(section)
        else:
            click.echo(f"{section.name}: skipped, mean-ablating it moves the mean LD by less than "
                       f"{Grader.MIN_SECTION_EFFECT:.0%}")
    nodes = list(dict.fromkeys(node for section in graded for node in section.nodes))
    if not graded:
        raise click.ClickException(f"{label}: none of the sites it reads is causal for IOI in this model")
    supervised = run.fit_supervised(nodes)
    ours = run.train_task_saes() if all(node in run.nodes for node in nodes) else {}
    sae = sae.to(run.config.device)
    theirs = {label: {node: sae for node in nodes}}
    for section in graded:
        click.echo(f"Grading {label} at {section.name} ...")
        grader.grade_section(section, supervised, ours, theirs)
        grader.record("graded_sae", section.name, label, len(section.nodes), reads=sae.meta.get("hook_name"),
                      head=sae.meta.get("hook_head_index"))
    grader.grade_core(ours, theirs, graded)
    grader.grade_model()
    return grader.records


def add_records(run, label, records):
    """metrics.json with the records of SAE `label` replaced by `records` (created if needed); the
    model's own records are added only where the file has none yet."""
    path = run.path("metrics.json")
    previous = _read_json(path)["results"] if os.path.exists(path) else []
    kept = [r for r in previous if r.get("graded_sae") != label]
    has_model = any(r["site"] == "model" for r in kept)
    new = [{**r, "graded_sae": label} for r in records if not (has_model and r["site"] == "model")]
    write_metrics(run, kept + new)


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
    label = name or f"sae:{Path(sae_dir).resolve().name}"
    run = _run_from_options(**options)
    act, layer, head = sae_reads(sae.meta, sae.d_in, run.model.config)
    sae = as_plain_model_sae(sae, run.model, act, layer, head)
    sections = sae_sections(run.sections, act, layer, head)
    if not sections:
        raise click.ClickException(f"{sae.meta['hook_name']} reads none of the circuit's cross-sections "
                                   f"({', '.join(s.name for s in run.sections)})")
    run.add_nodes([node for section in sections for node in section.nodes])
    add_records(run, label, grade_other_sae(run, label, sae, sections))
    click.echo(write_report(run.out))
    click.echo(f"Wrote {run.path('metrics.json')} and {run.path('report.md')}")

# === end pipeline commands ===


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


# --- looking records up ---

def _index(records):
    """Group the flat records by test, so each lookup scans one test only."""
    by_test = {}
    for r in records:
        by_test.setdefault(r["test"], []).append(r)
    return by_test


def _recs(results, test, **match):
    """The records of one test whose fields equal `match` (a missing field counts as None)."""
    return [r for r in results.get(test, []) if all(r.get(k) == v for k, v in match.items())]


def _avg(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _value(results, test, **match):
    """Mean value of the matching records; None when there are none."""
    return _avg([r["value"] for r in _recs(results, test, **match)])


def _present(recs, key="method", order=METHODS):
    """The distinct values of `key` in recs, in `order` first, then as they come."""
    seen = list(dict.fromkeys(r.get(key) for r in recs))
    return sorted(seen, key=lambda v: order.index(v) if v in order else len(order) + seen.index(v))


def _at_chosen(results, test, site, method, choose_for=None, **match):
    """Mean value of a test at a site. Task SAEs come in several settings (λ or k): use the one
    chosen in Test 2 for the attribute `choose_for` (default: the record's own attribute; its
    edits land closest to the counterfactual), else the one chosen most often, else the first."""
    settings = sorted({r["setting"] for r in _recs(results, test, site=site, method=method)
                       if r.get("setting") is not None})
    chosen = [r for r in _recs(results, "edit_distance_k2", site=site, method=method, chosen=True)
              if r["setting"] in settings]
    attribute = choose_for or match.get("attribute")
    for_attribute = [r["setting"] for r in chosen if r.get("attribute") == attribute]
    counts = Counter(for_attribute or [r["setting"] for r in chosen])
    setting = counts.most_common(1)[0][0] if counts else (settings or [None])[0]
    return _value(results, test, site=site, method=method, setting=setting, **match)


def _edit(results, test, site, method, attribute, k=2, edit="greedy"):
    """Edit accuracy or weight removed; supervised edits are exact and have no k."""
    if method.startswith("supervised") or method == "none":
        return _value(results, test, site=site, method=method, attribute=attribute)
    return _at_chosen(results, test, site, method, attribute=attribute, k=k, edit=edit)


def _headline(results):
    sites = {r["site"] for t in ("edit_accuracy", "sufficiency") for r in results.get(t, [])}
    return [(a, s) for a, s in HEADLINE if s in sites]


# --- formatting ---

def _fmt(x):
    return "–" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def _count(x):
    return None if x is None else int(round(x))


def _setting(method, setting):
    return "" if setting is None else f"k={setting:g}" if method.startswith("topk") else f"λ={setting:g}"


def _table(rows, headers):
    """A markdown table; None cells print as a dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows])


# --- figures ---

def _panels(n, ncols=3, size=(4.2, 3.3)):
    """A Figure with n panels. matplotlib.figure.Figure keeps no pyplot state, so nothing leaks."""
    from matplotlib.figure import Figure
    ncols = min(n, ncols)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig, figdir, name, alt):
    """Write a PNG atomically and return its markdown image link."""
    gpt2.atomic_write(os.path.join(figdir, name), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return f"![{alt}](figures/{name})"


def _bars(ax, groups, series, value, colors):
    """Grouped bars: one group per entry of `groups`, one coloured bar per entry of `series`."""
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        heights = [np.nan if value(g, s) is None else value(g, s) for g in groups]
        ax.bar(np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width, heights, width,
               label=s, color=colors.get(s))
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)


def _legend_right(fig, axes, **kwargs):
    """One legend for all panels, outside on the right."""
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, **kwargs)


# --- 0. what was run ---

def _header(config):
    model = (f"GPT-2 weights from `{config['weights']}`" if config.get("weights") else
             "the embedded small IOI model (a GPT-2-architecture transformer this project trains on IOI)")
    out = ["# Supervised dictionaries vs sparse autoencoders on IOI",
           "A reproduction of Makelov, Lange & Nanda, *Towards Principled Evaluations of Sparse Autoencoders "
           f"for Interpretability and Control* (arXiv 2405.08366). Model: {model}; {config.get('n_train')} "
           f"training and {config.get('n_eval')} evaluation prompts; task SAEs with {config.get('d_sae')} "
           f"latents trained for {config.get('epochs')} epochs."]
    if config.get("weights") is None or (config.get("epochs") or 0) < PAPER_SCALE["epochs"]:
        changes = [] if config.get("weights") else ["a small IOI model instead of GPT-2 Small"]
        changes += [f"{k} = {config[k]} instead of {v}" for k, v in PAPER_SCALE.items()
                    if config.get(k) is not None and config[k] != v]
        out.append("These settings are scaled down from the paper's so that the whole pipeline runs on a "
                   f"CPU: {'; '.join(changes)}. Expect the paper's qualitative picture, not its digits.")
    return out + [_table([(k, json.dumps(v)) for k, v in config.items()], ["setting", "value"])]


# --- 1. the model ---

def _model_section(results, figdir):
    out = ["## 1. The model solves IOI"]
    stats = {t: _value(results, t, site="model") for t in ("logit_diff", "accuracy", "top1_accuracy")}
    if all(v is None for v in stats.values()):
        return out + ["_No model metrics in metrics.json; section skipped._"]
    out += [_table(stats.items(), ["metric", "value"]),
            "For reference, GPT-2 Small reaches a mean logit difference ≈ 3.3 and top-1 ≈ 91%."]
    hist = sorted(_recs(results, "logit_diff_histogram"), key=lambda r: r["low"])
    if hist:
        fig, (ax,) = _panels(1, size=(6, 3.3))
        ax.bar([r["low"] for r in hist], [r["value"] for r in hist], [r["high"] - r["low"] for r in hist],
               align="edge", edgecolor="white")
        ax.axvline(0, color="k", lw=1, ls="--")
        if stats["logit_diff"] is not None:
            ax.axvline(stats["logit_diff"], color="#d62728", label=f"mean {stats['logit_diff']:.2f}")
            ax.legend()
        ax.set(title="Logit difference on evaluation prompts", ylabel="prompts",
               xlabel="LD = logit[IO] − logit[S]")
        out += [_save(fig, figdir, "ld_histogram.png", "LD histogram"),
                "Look for almost all mass right of the dashed line: LD > 0 means the model prefers IO."]
    return out


# --- 2. the circuit ---

def _circuit_section(circuit):
    out = ["## 2. The circuit: cross-sections we patch and edit"]
    if not circuit.get("sections"):
        return out + ["_No cross-sections in metrics.json._"]
    out.append(_table([(s["name"], ", ".join(f"`{n}`" for n in s["nodes"]), ", ".join(s["attributes"]))
                       for s in circuit["sections"]], ["cross-section", "nodes", "attributes edited"]))
    discovery = circuit.get("discovery") or {}
    if any(row["role"] for row in discovery.get("heads", [])):
        out += ["Heads found in the model itself (`ioi.discover`), each class by the measure Wang et al. (2022) "
                "use for it, at >= 1/3 of the strongest head's value and >= 2% of the clean LD: name movers by "
                "their direct effect on the LD; S-inhibition heads by the LD drop when only the name movers' "
                "queries see their output at `end` mean-ablated (\"via q\"); induction / duplicate-token heads "
                "by the LD drop when their output at `s2` is mean-ablated:",
                _table(_circuit_rows(discovery["heads"]),
                       ["head", "position", "direct effect", "LD drop via q", "LD drop", "of LD", "role"])]
    if discovery.get("sections"):
        out += ["A cross-section is graded only if mean-ablating all its nodes at once moves the mean LD by at "
                "least 5%; otherwise sufficiency is near 1 whatever is patched in and necessity divides by ~0:",
                _table([(d["section"], d["ld_drop"], d["fraction"], "graded" if d["kept"] else "dropped: not causal here")
                        for d in discovery["sections"]], ["cross-section", "LD drop", "fraction of LD", "verdict"])]
    return out


# --- 3. Test 1: approximation ---

def _approx_section(results, figdir):
    out = ["## 3. Test 1 — approximation: sufficiency and necessity"]
    recs = _recs(results, "sufficiency") + _recs(results, "necessity")
    if not recs:
        return out + ["_No sufficiency/necessity records; section skipped._"]
    sites, methods = _present(recs, "site", SITES), _present(recs)
    score = {(t, s, m): _at_chosen(results, t, s, m)
             for t in ("sufficiency", "necessity") for s in sites for m in methods}
    fig, axes = _panels(2, ncols=2, size=(6, 3.6))
    for ax, test in zip(axes, ("sufficiency", "necessity")):
        _bars(ax, sites, methods, lambda s, m: score[test, s, m], COLORS)
        ax.axhline(1, color="k", lw=0.8, ls=":")
        ax.set(title=test, ylabel="score (1 = perfect)")
    _legend_right(fig, axes)
    return out + [
        "Sufficiency: mean LD with the reconstruction patched in, over the clean mean LD. Necessity: how "
        "much of the effect of mean-ablating the cross-section we get by removing only the reconstruction. "
        "Each cell is *sufficiency / necessity*; 1 is best; task SAEs at their chosen setting (Test 2).",
        _table([[s] + [f"{_fmt(score['sufficiency', s, m])} / {_fmt(score['necessity', s, m])}"
                       for m in methods] for s in sites], ["cross-section"] + methods),
        _save(fig, figdir, "approximation.png", "sufficiency and necessity"),
        "Look for supervised bars near 1 and how close each SAE gets; mean ablation is the floor."]


# --- 4. Test 2: control ---

def _headline_figure(results, figdir, headline, methods):
    fig, axes = _panels(len(headline))
    for ax, (attr, site) in zip(axes, headline):
        for m in methods:
            acc, removed = (_edit(results, t, site, m, attr) for t in ("edit_accuracy", "weight_removed"))
            if acc is not None and removed is not None:
                ax.scatter(removed, acc, s=60, label=m, color=COLORS.get(m), marker=MARKERS.get(m, "o"))
        base = _edit(results, "edit_accuracy_no_intervention", site, "none", attr)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=1, label="no intervention")
        ax.set(title=f"edit {attr} @ {site}", xlabel="weight removed", ylabel="edit accuracy",
               ylim=(0, 1.05), xlim=(0, max(1.05, ax.get_xlim()[1])))
    _legend_right(fig, axes)
    return _save(fig, figdir, "control_headline.png", "edit accuracy vs weight removed")


def _k_figure(results, figdir, headline, methods):
    ks = sorted({r["k"] for r in _recs(results, "edit_accuracy") if r.get("k") is not None})
    fig, axes = _panels(len(headline))
    for ax, (attr, site) in zip(axes, headline):
        for m in methods:
            if m.startswith("supervised"):
                acc = _edit(results, "edit_accuracy", site, m, attr)
                if acc is not None:
                    ax.axhline(acc, color=COLORS[m], ls=":", label=f"{m} (exact)")
                continue
            for edit, ls, marker in (("greedy", "-", "o"), ("f1", "--", "s")):
                points = [(_edit(results, "latents_changed", site, m, attr, k, edit),
                           _edit(results, "edit_accuracy", site, m, attr, k, edit)) for k in ks]
                points = [(x, y) for x, y in points if x is not None and y is not None]
                if points:
                    ax.plot(*zip(*points), ls=ls, marker=marker, mfc="white" if edit == "f1" else None,
                            color=COLORS.get(m), label=f"{m} {edit}")
        ax.set(title=f"edit {attr} @ {site}", xlabel="latents the edit changes", ylabel="edit accuracy",
               ylim=(0, 1.05))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    _legend_right(fig, axes, handlelength=3)
    return _save(fig, figdir, "control_vs_k.png", "edit accuracy vs latents changed")


def _control_section(results, figdir):
    out = ["## 4. Test 2 — control: editing an attribute with a few latents"]
    recs, headline = _recs(results, "edit_accuracy"), _headline(results)
    if not recs:
        return out + ["_No edit records; section skipped._"]
    methods = _present(recs)
    out.append("The paper's headline: change one attribute of the prompt (the IO name, or Pos = ABB↔BAB) "
               "by swapping k = 2 SAE latents (greedy, interpretation-agnostic) or one supervised feature, "
               "and check that the model's next-token argmax matches that of a run with the real "
               "counterfactual activations patched in. Good edits sit top-left: high accuracy, little "
               "weight removed.")
    if headline:
        out += [_headline_figure(results, figdir, headline, methods),
                "Look for supervised and task-SAE markers far above the dashed no-intervention line, and "
                "for how much of the activation's weight each edit has to remove to get there."]
    def cell(site, attribute, method, edit="greedy"):
        text = " / ".join(_fmt(_edit(results, t, site, method, attribute, edit=edit))
                          for t in ("edit_accuracy", "weight_removed"))
        changed = _edit(results, "latents_changed", site, method, attribute, edit=edit)
        l0 = _at_chosen(results, "l0_at_site", site, method, choose_for=attribute)
        return text if changed is None else f"{text} ({changed:.1f} of L0 {_fmt(l0)})"
    pairs = list(dict.fromkeys((r["site"], r["attribute"]) for r in recs))
    saes = [m for m in methods if not m.startswith("supervised")]
    out += ["Edit accuracy / weight removed at k = 2 for every site and attribute: supervised edits swap "
            "one feature, SAE edits change at most 2 latents greedily (in brackets: latents actually "
            "changed, of the SAE's mean L0 there); `none` is the accuracy without any intervention:",
            _table([[s, a, _edit(results, "edit_accuracy_no_intervention", s, "none", a)]
                    + [cell(s, a, m) for m in methods] for s, a in pairs],
                   ["cross-section", "attribute", "none"] + methods),
            "The paper's headline interpretation-aware edit, 1 latent out (the best F1 for the old value) "
            "and 1 in (the best F1 for the new value), with the same columns:",
            _table([[s, a] + [cell(s, a, m, "f1") for m in saes] for s, a in pairs],
                   ["cross-section", "attribute"] + saes)]
    if headline:
        out += [_k_figure(results, figdir, headline, methods),
                "Look for how fast accuracy climbs with the number of latents an edit changes: solid lines "
                "edit greedily towards the counterfactual, dashed ones swap k/2 latents with the best F1 for "
                "the old value for k/2 with the best F1 for the new one."]
    chosen = _recs(results, "edit_distance_k2", chosen=True)
    if chosen:
        saes = _present(chosen)
        by_cell = {(r["site"], r.get("attribute"), r["method"]):
                   f"{_setting(r['method'], r['setting'])} ({_fmt(r['value'])})" for r in chosen}
        rows = list(dict.fromkeys((r["site"], r.get("attribute")) for r in chosen))
        out += ["The SAE setting chosen per site and attribute, as in the revised paper: the one whose k = 2 "
                "edits of that attribute land closest to the counterfactual activation (L2 distance in brackets).",
                _table([[s, a] + [by_cell.get((s, a, m)) for m in saes] for s, a in rows],
                       ["cross-section", "attribute"] + saes)]
    return out


# --- 5. Test 3: interpretability ---

def _f1_coverage(results, figdir):
    recs = _recs(results, "f1_coverage")
    if not recs:
        return []
    sites, methods, attrs = _present(recs, "site", SITES), _present(recs), _present(recs, "attribute")
    cov = {(s, a, m): _at_chosen(results, "f1_coverage", s, m, attribute=a)
           for s in sites for a in attrs for m in methods}
    fig, axes = _panels(len(attrs))
    for ax, a in zip(axes, attrs):
        _bars(ax, sites, methods, lambda s, m: cov[s, a, m], COLORS)
        ax.set(title=f"F1 coverage of {a}", ylabel="mean best F1 per value", ylim=(0, 1.05))
    _legend_right(fig, axes)
    return ["F1 coverage: for each value of an attribute, the best F1 of any latent for "
            "\"attribute = value\", averaged over values and over the cross-section's nodes.",
            _table([[s, a] + [cov[s, a, m] for m in methods] for s in sites for a in attrs],
                   ["cross-section", "attribute"] + methods),
            _save(fig, figdir, "f1_coverage.png", "F1 coverage"),
            "Look for attributes whose every value has a dedicated latent (bars near 1)."]


def _causal_figure(results, figdir):
    tests = ("causal_keep_sufficiency", "causal_remove_necessity")
    if not any(results.get(t) for t in tests):
        return []
    fig, axes = _panels(2, ncols=2, size=(5, 3.5))
    for ax, test, title in zip(axes, tests, ("keep latents with F1 ≥ t: sufficiency",
                                             "remove latents with F1 ≥ t: necessity")):
        recs = _recs(results, test)
        sites, ts = _present(recs, "site", SITES), sorted({r["threshold"] for r in recs})
        for m in _present(recs):
            ys = [_avg([_at_chosen(results, test, s, m, threshold=t) for s in sites]) for t in ts]
            ax.plot(ts, [np.nan if y is None else y for y in ys], marker="o", color=COLORS.get(m), label=m)
        ax.axvline(0.6, color="k", lw=0.8, ls=":")
        ax.set(title=title, xlabel="F1 threshold t", ylabel="score (mean over sites)")
    _legend_right(fig, axes)
    return [_save(fig, figdir, "causal_f1.png", "keep/remove latents by F1"),
            "Look at t = 0.6 (dotted): if the interpretable latents carry the computation, keeping only "
            "them preserves the logit difference and removing them destroys it."]


# --- 6. the two phenomena ---

def _evidence(results, phenomenon, attributes):
    """The gate of a phenomenon: where it was tested and why, or why it is not testable here."""
    testable = _recs(results, "phenomenon_testable", phenomenon=phenomenon)
    if not testable:
        return []
    nodes = list(dict.fromkeys(r["site"] for r in _recs(results, "evidence_norm")))

    def row(node):
        return [node] + [f"{_fmt(_value(results, 'evidence_norm', site=node, attribute=a))} / "
                         f"{_value(results, 'evidence_answers_changed', site=node, attribute=a):.0%} / "
                         f"{_value(results, 'evidence_ld_moved', site=node, attribute=a):.0%}" for a in attributes]
    need = " and ".join(a.upper() if a != "pos" else "Pos" for a in attributes)
    criterion = (f"needs {need} present (supervised feature norm ≥ {metrics.PRESENT} of the activations' spread) "
                 f"and causal (patching its counterfactual into the node alone changes ≥ {metrics.CAUSAL:.0%} of "
                 "the answers or moves the mean LD by as much)")
    headers = ["node"] + [f"{a.upper() if a != 'pos' else 'Pos'}: norm / answers changed / LD moved"
                          for a in attributes]
    if testable[0]["value"]:
        node = testable[0]["site"]
        return [f"The test {criterion}; it runs at `{node}`:", _table([row(node)], headers)]
    def weakest_norm(node):
        return min(_value(results, "evidence_norm", site=node, attribute=a) for a in attributes)
    ranked = sorted(nodes, key=lambda node: -weakest_norm(node))
    return [f"**Not testable here.** The test {criterion}, and no node has that. The nodes closest to it:",
            _table([row(n) for n in ranked[:4]], headers)]


def _occlusion(results, figdir):
    out = ["### Feature occlusion"] + _evidence(results, "occlusion", ("io", "s"))
    keys = list(dict.fromkeys((r["site"], r["method"], r.get("setting"))
                              for r in _recs(results, "occlusion_io_names")))
    if not keys:
        return out if len(out) > 1 else out + ["_No occlusion counts; skipped._"]
    rows = [(n, m, _setting(m, st)) + tuple(_count(_value(results, t, site=n, method=m, setting=st))
                                            for t in ("occlusion_io_names", "occlusion_s_names"))
            for n, m, st in keys]
    counts = {}
    for n, m, st, io, s in rows:
        counts[f"{n}\n{m} {st}", "IO names"], counts[f"{n}\n{m} {st}", "S names"] = io, s
    fig, (ax,) = _panels(1, size=(7, 3.5))
    _bars(ax, list(dict.fromkeys(g for g, _ in counts)), ["IO names", "S names"], lambda g, c: counts[g, c],
          {"IO names": "#2ca02c", "S names": "#d62728"})
    ax.set(title="Names with a latent of F1 ≥ 0.5", ylabel="names")
    ax.legend()
    out += [_table(rows, ["node", "method", "setting", "IO names", "S names"]),
            _save(fig, figdir, "occlusion.png", "occlusion counts"),
            "Look for many IO names but few S names: S is present and causal at this node, yet the SAE "
            "gives it almost no latents of its own."]
    norms = _recs(results, "supervised_feature_norm")
    if norms:
        out.append("Mean norm of the supervised features there: " + ", ".join(
            f"{r['attribute'].upper()} {r['value']:.2f}" for r in norms) + " — the larger feature wins.")
    return out


def _alpha_figure(results, figdir):
    io = _recs(results, "alpha_sweep_io_names")
    if not io:
        return []
    fig, (ax,) = _panels(1, size=(6, 3.5))
    for i, st in enumerate(sorted({r.get("setting") for r in io}, key=lambda v: v or 0)):
        for name, ls in (("IO", "-"), ("S", "--")):
            recs = _recs(results, f"alpha_sweep_{name.lower()}_names", setting=st)
            if recs:
                ax.plot(*zip(*sorted((r["alpha"], r["value"]) for r in recs)), ls=ls, marker="o",
                        color=f"C{i}", label=f"{name} {_setting(recs[0]['method'], st)}")
    ax.set(title="SAEs trained on a − α·u_IO", xlabel="α", ylabel="names with a latent (F1 ≥ 0.5)")
    ax.legend(fontsize=8)
    return [_save(fig, figdir, "alpha_sweep.png", "alpha sweep"),
            "Look for the crossing: as α shrinks the IO features, IO latents (solid) vanish and S latents "
            "(dashed) appear."]


def _occlusion_toy(results):
    toy = _recs(results, "occlusion_toy_recovered")
    if not toy:
        return []
    return ["Toy model a = u_IO + v_S (216 values each, 64 dimensions, as in the paper) with the feature norms "
            "measured at the occlusion node (where occlusion is not testable, at a stated 2:1 ratio): share of "
            "features that get a vanilla-SAE latent with F1 > 0.9. Look for the high-norm features recovered and "
            "the low-norm ones not.",
            _table([(r["attribute"].upper(), r.get("norm"), _setting("vanilla", r.get("setting")), r["value"])
                    for r in toy], ["feature", "norm", "setting", "share recovered"])]


def _oversplitting(results, figdir):
    out = ["### Feature over-splitting"] + _evidence(results, "oversplitting", ("pos",))
    pos = [r for r in _recs(results, "pos_latents") if r.get("phenomenon") == "oversplitting"]
    if pos:
        out += ["Latents whose best interpretation is a Pos value there (the paper finds ≥ 10 for this binary "
                "attribute in GPT-2 Small's name-mover queries):",
                _table([(r["site"], r["method"], _setting(r["method"], r.get("setting")), _count(r["value"]))
                        for r in pos], ["node", "method", "setting", "Pos latents"])]
    if results.get("oversplit_toy_loss"):
        fig, (ax,) = _panels(1, size=(6, 3.5))
        for m, color, label in (("ideal_2_latent", "#2ca02c", "ideal 2-latent SAE"),
                                ("random_1000_latent", "#d62728", "random 1000-latent SAE")):
            pts = sorted((r["l1"], r["value"])
                         for r in _recs(results, "oversplit_toy_loss", method=m, grid="paper"))
            if pts:
                ax.plot(*zip(*pts), color=color, label=label)
        fired = [r["l1"] for r in _recs(results, "oversplit_toy_loss", method="ideal_2_latent", grid="paper")
                 if r["firing"] >= 0.02]
        if fired:
            ax.axvline(max(fired), color="k", ls=":", lw=1, label="ideal SAE fires on < 2% beyond")
        ax.set(title="Toy ±µ + noise: best SAE loss (the paper's grid)", xlabel="λ", ylabel="loss")
        ax.legend()
        out += [_save(fig, figdir, "oversplit_toy.png", "over-splitting toy"),
                "Look for the red curve under the green one: 1000 meaningless latents beat the two true "
                "features on the SAE's own loss. Past the dotted line the ideal SAE (almost) never fires and both "
                "losses tend to E‖x‖², so wins are counted only where it fires on at least 2% of inputs:",
                _table([(grid, *(_count(_value(results, f"oversplit_toy_{c}", grid=grid))
                                 for c in ("counted", "random_wins", "ideal_wins", "ties", "not_counted")),
                         _value(results, "oversplit_toy_share_random_wins", grid=grid)) for grid in ("paper", "ours")],
                       ["grid", "λ counted", "random wins", "ideal wins", "ties", "λ not counted", "share random"])]
    return out if len(out) > 1 else out + ["_No over-splitting records; skipped._"]


# --- 7. core SAE metrics ---

def _core_section(results):
    tests = ["l0", "mse", "fve", "dead_fraction", "ld_recovered", "train_steps", "train_converged"]
    keys = dict.fromkeys((r["method"], r.get("setting")) for t in tests for r in results.get(t, []))
    if not keys:
        return ["## 7. Core SAE metrics", "_No core SAE metrics; section skipped._"]
    order = sorted(keys, key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else len(METHODS), k[1] or 0))
    rows = [[m, _setting(m, st)] + [_value(results, t, method=m, setting=st) for t in tests]
            for m, st in order]
    return ["## 7. Core SAE metrics (mean over nodes)", _table(rows, ["method", "setting"] + tests),
            "L0, MSE, FVE and dead fraction on the evaluation activations (dead: on the training ones); "
            "train_steps is the Adam steps run and train_converged the share of SAEs that met the plateau "
            "criterion (loss improving < 1% over the last 10% of epochs) before the cap. "
            "LD recovered patches one node at a time, so it skips nodes whose mean ablation alone moves "
            f"the LD by less than {Grader.MIN_NODE_EFFECT:.1%} (it would divide by that effect)."]


# --- 8. comparison with the paper ---

def _verdict(lo, hi, paper_lo, paper_hi):
    if paper_lo <= lo and hi <= paper_hi:
        return "within the paper's range"
    return "higher" if lo > paper_hi else "lower" if hi < paper_lo else "overlaps the paper's range"


def _informative(results, site, attribute):
    """An edit tells us something only if it must change the model's answer: without any
    intervention, the argmax must mostly differ from the counterfactual run's."""
    baseline = _edit(results, "edit_accuracy_no_intervention", site, "none", attribute)
    return baseline is None or baseline < 0.5


def _paper_rows(results):
    rows = []
    sites = [(a, s) for a, s in _headline(results) if _informative(results, s, a)]
    for m, ranges in PAPER_EDITS.items():
        for test, paper in zip(("edit_accuracy", "weight_removed"), ranges):
            ours = [v for a, s in sites if (v := _edit(results, test, s, m, a)) is not None]
            if paper and ours:
                rows.append((f"{m}: {test.replace('_', ' ')} at k = 2", "{:.2f}–{:.2f}".format(*paper),
                             f"{min(ours):.2f}–{max(ours):.2f}", _verdict(min(ours), max(ours), *paper)))
    io = [r["value"] for r in _recs(results, "occlusion_io_names")]
    s = [_value(results, "occlusion_s_names", site=r["site"], method=r["method"], setting=r.get("setting"))
         or 0 for r in _recs(results, "occlusion_io_names")]
    if io:
        more_io = sum(i > j for i, j in zip(io, s))
        sweep = {a: [value for _, value in sorted((r["alpha"], r["value"])
                                                  for r in _recs(results, f"alpha_sweep_{a}_names"))]
                 for a in ("io", "s")}  # names with a latent, by increasing α
        appear = bool(sweep["s"]) and sweep["s"][-1] > sweep["s"][0] and sweep["io"][-1] < sweep["io"][0]
        rows.append(("occlusion: names with a latent (F1 ≥ 0.5)", "almost every IO name, ≤ 22 S names; S latents "
                     "appear as α removes the IO features", f"IO {min(io):g}–{max(io):g}, S ≤ {max(s):g}; α sweep: "
                     + ("S latents appear, IO latents vanish" if appear else "no such crossing"),
                     "reproduced (criterion: more IO than S names in every setting, and the crossing)"
                     if more_io == len(io) and appear else
                     f"not reproduced (more IO than S names in {more_io} of {len(io)} settings; "
                     f"crossing {'seen' if appear else 'not seen'})"))
    for phenomenon in ("occlusion", "oversplitting"):
        gate = _recs(results, "phenomenon_testable", phenomenon=phenomenon)
        if gate and not gate[0]["value"]:
            rows.append((f"{phenomenon}: in the model", "seen in GPT-2 Small", "—",
                         "not testable here (section 6 shows the measurement)"))
    pos = [r["value"] for r in _recs(results, "pos_latents") if r.get("phenomenon") == "oversplitting"]
    if pos:
        verdict = ("reproduced (criterion: ≥ 10 in every setting)" if min(pos) >= 10 else
                   "in some settings (criterion: ≥ 10)" if max(pos) >= 10 else "not reproduced (criterion: ≥ 10)")
        rows.append(("over-splitting: latents interpreted as a Pos value", "≥ 10", f"{min(pos):g}–{max(pos):g}",
                     verdict))
    wins = _value(results, "oversplit_toy_share_random_wins", grid="paper")
    if wins is not None:
        counted = _count(_value(results, "oversplit_toy_counted", grid="paper"))
        rows.append((f"toy (paper's grid): share of the {counted} λ where the ideal SAE fires on ≥ 2% of inputs "
                     "that the random SAE wins", "1.00", f"{wins:.2f}",
                     "reproduced (criterion ≥ 0.95)" if wins >= 0.95 else "not reproduced (criterion ≥ 0.95)"))
    return rows


def _paper_section(results):
    rows = _paper_rows(results)
    return ["## 8. Comparison with the paper",
            "Ours are min–max over the headline sites (task SAEs at their chosen setting, greedy edits) "
            "where an edit must change the model's answer (no-intervention edit accuracy below 0.5). "
            "Higher edit accuracy is better; less weight removed means a more surgical edit.",
            _table(rows, ["quantity", "paper", "this run", "verdict"]) if rows else "_Nothing to compare._"]


# --- 9. SAEs from elsewhere ---

def _other_saes_section(results):
    """Each SAE graded by `grade-sae`, at the sites it reads, beside the yardstick at the same nodes."""
    graded = _recs(results, "graded_sae")
    if not graded:
        return []
    rows = []
    for r in graded:
        site = r["site"]
        reads = r.get("reads", "") + ("" if r.get("head") is None else f" head {r['head']}")
        attrs = list(dict.fromkeys(e["attribute"] for e in _recs(results, "edit_accuracy", site=site)))
        for m in _present(_recs(results, "sufficiency", site=site)):
            if m == "mean_ablation":
                continue
            approximation = " / ".join(_fmt(_at_chosen(results, test, site, m))
                                       for test in ("sufficiency", "necessity"))
            edits = ", ".join(f"{a} {_fmt(_edit(results, 'edit_accuracy', site, m, a))}" for a in attrs)
            coverage = ", ".join(f"{a} {_fmt(_at_chosen(results, 'f1_coverage', site, m, attribute=a))}"
                                 for a in attrs) if not m.startswith("supervised") else ""
            rows.append([r["method"], reads, site, m, approximation, edits, coverage])
    return ["## 9. SAEs from elsewhere (`grade-sae`)",
            "Each SAE at the cross-sections it reads (in brackets: what it reads), next to the supervised "
            "dictionaries fitted at the very same nodes and, where it reads single heads, our task SAEs. "
            "Sufficiency / necessity (1 is best); edit accuracy at k = 2 (greedy for SAEs) per attribute; "
            "F1 coverage: the share of each attribute's values with a latent of F1 ≥ 0.8.",
            _table(rows, ["SAE", "reads", "cross-section", "method", "sufficiency / necessity",
                          "edit accuracy", "F1 coverage"])]


# --- putting it together ---

def _load_metrics(run_dir):
    """(config, circuit, results indexed by test) from metrics.json, or a one-line ClickException."""
    path = os.path.join(run_dir, "metrics.json")
    try:
        with open(path) as f:
            data = json.load(f)
        results = _index(data["results"])
        bad = [r for records in results.values() for r in records if not {"site", "method", "value"} <= set(r)]
    except FileNotFoundError:
        raise click.ClickException(f"{path}: not found (run the pipeline first)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{path}: not valid JSON ({e})")
    except (KeyError, TypeError, AttributeError) as e:
        raise click.ClickException(f"{path}: malformed, expected {{'results': [records with a 'test']}} "
                                   f"({type(e).__name__}: {e})")
    if bad:
        raise click.ClickException(f"{path}: malformed record {bad[0]} (needs test, site, method, value)")
    return data.get("config") or {}, data.get("circuit") or {}, results


def summary_table(records) -> str:
    """Compact terminal table: model LD and accuracy, then per headline site the k = 2 edit
    accuracy and the sufficiency of the supervised dictionary and the task SAEs."""
    results = records if isinstance(records, dict) else _index(records)
    methods = ["supervised", "vanilla", "gated", "topk"]
    ld, acc = (_value(results, t, site="model") for t in ("logit_diff", "accuracy"))
    lines = [f"model: mean LD {_fmt(ld)}, accuracy {_fmt(acc)}",
             f"{'':22}{'edit accuracy @k=2':^28}{'sufficiency':^28}",
             f"{'site':22}" + "".join(f"{m[:6]:>7}" for m in methods) * 2]
    for attr, site in _headline(results):
        values = ([_edit(results, "edit_accuracy", site, m, attr) for m in methods]
                  + [_at_chosen(results, "sufficiency", site, m) for m in methods])
        lines.append(f"{attr + '@' + site:22}" + "".join(f"{_fmt(v):>7}" for v in values))
    return "\n".join(lines)


def write_report(run_dir) -> str:
    """Write <run_dir>/report.md and <run_dir>/figures/*.png from <run_dir>/metrics.json;
    return the terminal summary."""
    import matplotlib
    matplotlib.use("Agg")
    config, circuit, results = _load_metrics(run_dir)
    figdir = os.path.join(run_dir, "figures")
    os.makedirs(figdir, exist_ok=True)
    summary = summary_table(results)
    interp = _f1_coverage(results, figdir) + _causal_figure(results, figdir)
    blocks = (_header(config) + ["## At a glance", f"```\n{summary}\n```"]
              + _model_section(results, figdir) + _circuit_section(circuit)
              + _approx_section(results, figdir) + _control_section(results, figdir)
              + ["## 5. Test 3 — interpretability"] + (interp or ["_No F1 records; section skipped._"])
              + ["## 6. Two SAE failure modes"] + _occlusion(results, figdir) + _alpha_figure(results, figdir)
              + _occlusion_toy(results) + _oversplitting(results, figdir)
              + _core_section(results) + _paper_section(results) + _other_saes_section(results))
    report_md = "\n\n".join(blocks) + "\n"
    gpt2.atomic_write(os.path.join(run_dir, "report.md"), lambda tmp: Path(tmp).write_text(report_md))
    return summary


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
