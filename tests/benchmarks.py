"""Benchmarks, a script (not collected by pytest): `python tests/benchmarks.py [--batch N] [--repeats N]`.

Our GPT-2 forward (logits at the last position, hook_z cached: what the pipeline runs) against
Hugging Face's and a plain matmul; then SAE training as one batched stack, in stacks of
main.SAES_PER_PROGRAM, and in a loop one SAE at a time, with the paper's grid projected. Timings
depend on the machine; what must hold anywhere (the same logits as Hugging Face) is tested in
test_cli_gpt2.py.
"""
import math
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import dictionaries  # noqa: E402
import gpt2  # noqa: E402
import main  # noqa: E402


MATMULS_PER_STEP = {"vanilla": 5, "gated": 7, "topk": 5}  # forward + backward, each 2·B·d_in·d_sae FLOPs
# The paper's SAE grid (arXiv 2405.08366, appendix on SAE training): 55 nodes × 12 settings,
# 20,000 training prompts in batches of 512, 2,000 epochs.
PAPER_GRID_SAES, PAPER_GRID_STEPS_PER_EPOCH, PAPER_EPOCHS = 55 * 12, math.ceil(20_000 / 512), 2000
# A convergence-stopped run is shorter (dictionaries.TrainConfig.plateau): the slowest convergence we measured
# took 747 epochs (a stack of 4 gated SAEs with four resamplings).
CONVERGED_EPOCHS = 750


def _step_matmuls(n_sae, batch_size, d_in, d_sae):
    """The five matmuls of a vanilla step for a stack of n_sae SAEs, on random tensors:
    encode x W_enc and decode f W_dec; backward: f^T g (W_dec), g W_dec^T (f), x^T g_pre (W_enc)."""
    x, g = torch.randn(n_sae, batch_size, d_in), torch.randn(n_sae, batch_size, d_in)  # inputs, dL/dx̂
    f = torch.randn(n_sae, batch_size, d_sae)  # latents (and dL/dpre: the same shape)
    W_enc, W_dec = torch.randn(n_sae, d_in, d_sae), torch.randn(n_sae, d_sae, d_in)
    return lambda: (x @ W_enc, f @ W_dec, f.mT @ g, g @ W_dec.mT, x.mT @ f)


def _best_seconds(run, times: int) -> float:
    """The fastest of `times` runs: the machine is shared, so the minimum is the least noisy."""
    return min(main.seconds(run) for _ in range(times))


def bench_sae_training(n_sae: int = 24, d_in: int = 64, d_sae: int = 512, n: int = 8192, epochs: int = 8,
                       arch: str = "vanilla", batch_size: int = 512, repeats: int = 2, seed: int = 0) -> dict:
    """Seconds to train n_sae SAEs (best of `repeats`): as one stack, in groups of main.SAES_PER_PROGRAM,
    and in a loop one by one (the same code on stacks of one). No resampling: a real run resamples 4
    times in 2,000 epochs, here it would dominate (the statistics at checkpoints 1, 2, 4, 8 are
    included, so per-step times are a little high). Next to them, the time of a vanilla step's five
    matmuls alone (whatever `arch`), for one SAE and per SAE in a stack of SAES_PER_PROGRAM: what batching
    could at best save. And the paper's grid projected from the best time per SAE step, at its 2,000
    epochs and at CONVERGED_EPOCHS."""
    data = torch.randn(1, n, d_in, generator=torch.Generator().manual_seed(seed))
    specs = [dictionaries.SAESpec(arch, l1_coefficient=1.0, k=8, seed=i) for i in range(n_sae)]
    config = dictionaries.TrainConfig(d_sae=d_sae, batch_size=batch_size, epochs=epochs, resample_at=())
    stack_size = min(n_sae, main.SAES_PER_PROGRAM)
    runs = {"stack_s": lambda: dictionaries.train_sae_stack(data, specs, config),
            "grouped_s": lambda: [dictionaries.train_sae_stack(data, specs[i:i + stack_size], config)
                                  for i in range(0, n_sae, stack_size)],
            "loop_s": lambda: [dictionaries.train_sae_stack(data, [spec], config) for spec in specs]}
    seconds = {name: _best_seconds(run, repeats) for name, run in runs.items()}
    matmul_ms = {size: 1e3 * _best_seconds(_step_matmuls(size, batch_size, d_in, d_sae), 10 * repeats) / size
                 for size in (1, stack_size)}  # per SAE step
    sae_steps = n_sae * epochs * math.ceil(n / batch_size)
    per_sae_step = min(seconds["stack_s"], seconds["grouped_s"]) / sae_steps
    loop_per_sae_step = seconds["loop_s"] / sae_steps

    def paper_grid_hours(epochs):
        return PAPER_GRID_SAES * epochs * PAPER_GRID_STEPS_PER_EPOCH * per_sae_step / 3600
    flops = 2 * batch_size * d_in * d_sae  # one matmul of a step
    return {"arch": arch, "n_sae": n_sae, "d_in": d_in, "d_sae": d_sae, "n": n, "epochs": epochs,
            "stack_size": stack_size, **seconds,
            "speedup": seconds["loop_s"] / min(seconds["stack_s"], seconds["grouped_s"]),
            "ms_per_sae_step": 1e3 * per_sae_step, "loop_ms_per_sae_step": 1e3 * loop_per_sae_step,
            "gflops": MATMULS_PER_STEP[arch] * flops / per_sae_step / 1e9,
            "matmul_ms_one": matmul_ms[1], "matmul_ms_stacked": matmul_ms[stack_size],
            "matmul_gflops_stacked": MATMULS_PER_STEP["vanilla"] * flops / matmul_ms[stack_size] / 1e6,
            # the loop's step against a stacked step that would be nothing but its matmuls
            "speedup_ceiling": 1e3 * loop_per_sae_step / matmul_ms[stack_size],
            "paper_grid_hours": paper_grid_hours(PAPER_EPOCHS), "converged_epochs": CONVERGED_EPOCHS,
            "paper_grid_converged_hours": paper_grid_hours(CONVERGED_EPOCHS)}


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
            times[name].append(main.seconds(run, device))
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


class OneLineErrors(click.Command):
    """Bad options end as one line `Error: ...` and exit 2, as in main.py's commands."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            one_line = click.ClickException(error.format_message())
            one_line.exit_code = error.exit_code
            raise one_line from None


@click.command(cls=OneLineErrors)
@click.option("--batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="Prompts per forward pass.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed passes of each contender (median).")
@main.DEVICE_OPTION
def bench(batch, repeats, device):
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
    s = bench_sae_training()
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
               f"{s['converged_epochs']} epochs (our slowest measured convergence)")


if __name__ == "__main__":
    bench()
