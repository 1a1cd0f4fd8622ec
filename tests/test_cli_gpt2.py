"""Specification of the gpt2 subcommands of main.py: download, generate, bench.

No test touches the network: downloads come from file:// URLs or a local HTTP server.
"""
import functools
import hashlib
import http.server
import os
import threading

import pytest
import torch
from click.testing import CliRunner

import dictionaries
import gpt2
import main

TINY = gpt2.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=2)  # GPT-2's vocabulary, so its tokenizer fits


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A folder holding a tiny saved model, as the hub would serve it."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hub")
    gpt2.GPT2(TINY).save_pretrained(directory)
    return directory


def invoke(*args):
    return CliRunner().invoke(main.cli, [str(arg) for arg in args])


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_nothing_at(out):
    """A failed download writes nothing: no --out folder, no temporary folder beside it."""
    assert not out.exists() and not list(out.parent.glob(out.name + ".*"))


def test_download_from_a_file_url(source, tmp_path):
    out = tmp_path / "gpt2"
    result = invoke("download", "--url", source.as_uri(), "--out", out, "--sha256", sha256(source / "model.safetensors"))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert "loads fine" in result.output


def test_download_with_a_wrong_hash_leaves_nothing(source, tmp_path):
    out = tmp_path / "gpt2"
    result = invoke("download", "--url", source.as_uri(), "--out", out, "--sha256", "0" * 64)
    assert result.exit_code == 1
    assert "sha256" in result.output and "0" * 64 in result.output
    assert_nothing_at(out)


def test_download_of_a_missing_file_leaves_nothing(source, tmp_path):
    partial = tmp_path / "partial"  # config.json is there, model.safetensors is not
    partial.mkdir()
    (partial / "config.json").write_bytes((source / "config.json").read_bytes())
    out = tmp_path / "gpt2"
    result = invoke("download", "--url", partial.as_uri(), "--out", out)
    assert result.exit_code == 1
    assert "model.safetensors" in result.output and len(result.output.strip().splitlines()) <= 3
    assert_nothing_at(out)


def test_download_http_404(source, tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "gpt2"
        result = invoke("download", "--url", f"http://127.0.0.1:{server.server_port}/nowhere", "--out", out)
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    assert "HTTP 404" in result.output
    assert_nothing_at(out)


def test_download_of_files_that_do_not_load_leaves_nothing(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((source / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"<html>not a model</html>")
    out = tmp_path / "gpt2"
    result = invoke("download", "--url", broken.as_uri(), "--out", out)
    assert result.exit_code == 1
    assert "do not load" in result.output
    assert_nothing_at(out)


def test_generate_greedy_is_generate_tokens(source):
    result = invoke("generate", "--weights", source, "--prompt", "Hello there", "--tokens", 6)
    assert result.exit_code == 0, result.output
    tokenizer = gpt2.load_tokenizer()
    prompt = torch.tensor([[gpt2.BOS_TOKEN_ID, *tokenizer.encode_ordinary("Hello there")]])
    expected = gpt2.generate_tokens(gpt2.GPT2.from_pretrained(source), prompt, 6)
    assert result.output == "Hello there" + tokenizer.decode(expected[0, prompt.shape[1]:].tolist()) + "\n"


def test_generate_sampling_is_seeded(source):
    run = lambda seed: invoke("generate", "--weights", source, "--temperature", 1.0, "--seed", seed, "--tokens", 8)  # noqa: E731
    first, again, other = run(1), run(1), run(2)
    assert first.exit_code == 0, first.output
    assert first.output == again.output != other.output


def test_generate_with_bad_weights_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nothing-here"
    result = invoke("generate", "--weights", missing)
    assert result.exit_code == 1
    assert str(missing) in result.output and len(result.output.strip().splitlines()) == 1


def test_bench_forward_reports_every_figure():
    result = main.bench_forward(TINY, batch=2, n_pos=5, repeats=1, matmul_size=64)
    for key in ("ours_tokens_per_s", "hf_tokens_per_s", "ours_over_hf", "matmul_gflops", "ours_gflops",
                "ours_fraction_of_matmul", "hf_gflops"):
        assert result[key] > 0, key
    assert result["max_abs_logit_diff"] < 1e-4  # HF really ran with the same weights


def test_forward_flops_counts_the_work_skipped():
    c = gpt2.GPT2Config()
    body = 2 * 12 * 12 * c.n_embd ** 2  # 2 FLOPs per weight per token, 12·d² matmul weights per layer
    attention = 12 * 2 * 2 * 19 * c.n_embd
    unembed = 2 * c.n_embd * c.vocab_size
    assert main.forward_flops(c, 1, 19, False) == 19 * (body + attention + unembed)
    skipped = 18 * (2 * 9 * c.n_embd ** 2 + unembed)  # last layer's c_proj + MLP, and the unembedding
    assert main.forward_flops(c, 1, 19, True) == 19 * (body + attention + unembed) - skipped


def test_bench_command_prints_forward_and_sae_figures(monkeypatch):
    figures = {"n_pos": 19, "hf_s": 2.0, "hf_tokens_per_s": 950.0, "hf_gflops": 200.0, "ours_tokens_per_s": 1900.0,
               "ours_gflops": 300.0, "ours_fraction_of_matmul": 0.85, "matmul_size": 2048, "matmul_gflops": 350.0,
               "ours_over_hf": 2.0, "max_abs_logit_diff": 1e-6}
    monkeypatch.setattr(main, "bench_forward", lambda **kwargs: figures)
    sae_figures = {"arch": "vanilla", "n_sae": 24, "d_in": 64, "d_sae": 512, "n": 8192, "epochs": 8, "stack_size": 4,
                   "stack_s": 3.0, "grouped_s": 2.0, "loop_s": 4.5, "speedup": 2.25, "ms_per_sae_step": 0.5,
                   "loop_ms_per_sae_step": 1.125, "gflops": 300.0, "matmul_ms_one": 0.6, "matmul_ms_stacked": 0.45,
                   "matmul_gflops_stacked": 320.0, "speedup_ceiling": 2.5, "paper_grid_hours": 14.3,
                   "paper_grid_converged_hours": 5.4, "converged_epochs": 750}
    monkeypatch.setattr(dictionaries, "bench_sae_training", lambda: sae_figures)
    result = invoke("bench", "--repeats", 1)
    assert result.exit_code == 0, result.output
    for text in ("1,900 tokens/s", "950 tokens/s", "85% of the matmul rate", "350.0 GFLOP/s", "2.00x",
                 "24 vanilla SAEs 64 -> 512", "8 epochs of 8192 inputs", "4.50 s",
                 "0.60 ms for one SAE, 0.45 ms per SAE in a stack of 4", "2.25x faster; at most 2.50x",
                 "300 GFLOP/s", "14.3 h at its 2,000 epochs", "5.4 h stopped at convergence, assuming 750 epochs"):
        assert text in result.output
