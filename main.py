"""Command-line interface: one subcommand per step of the pipeline, plus `demo` and `run`.

Follows the order of Makelov, Lange & Nanda (arXiv 2405.08366): a model solves IOI,
we collect activations at circuit nodes, fit supervised dictionaries and SAEs, grade
them on approximation, control and interpretability, and write a report.
"""
import click


@click.group()
def cli():
    """Grade sparse autoencoders against supervised dictionaries on IOI (arXiv 2405.08366)."""


# === gpt2 commands (download, generate, bench) ===

# === end gpt2 commands ===


# === ioi commands (train-toy, ioi-eval, nodes) ===

# === end ioi commands ===


# === dictionaries commands (train-sae, supervised) ===

# === end dictionaries commands ===


# === pipeline commands (evaluate, report, demo, run) ===

# === end pipeline commands ===


if __name__ == "__main__":
    cli()
