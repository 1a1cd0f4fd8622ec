"""Specification of the gpt2 subcommands of main.py (download, generate) and of tests/benchmarks.py.

The benchmark's timings depend on the machine, so what is tested is what must hold anywhere:
HF and ours compute the same logits, and HF is optional (bad options: test_robustness.py).

No test touches the network: downloads come from file:// URLs or a local HTTP server.
"""
import functools
import hashlib
import http.server
import os
import socket
import sys
import threading

import pytest
import torch
from click.testing import CliRunner

import benchmarks
import gpt2
import main

# GPT-2's vocabulary, so its tokenizer fits
TINY = gpt2.GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=2)


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
    digest = sha256(source / "model.safetensors")
    result = invoke("download", "--url", source.as_uri(), "--out", out, "--sha256", digest)
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


def test_download_from_a_silent_server_times_out_and_leaves_nothing(tmp_path, monkeypatch):
    """A server that accepts the connection and never answers ends as a one-line error, not a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(main, "DOWNLOAD_TIMEOUT", 1)
    try:
        out = tmp_path / "gpt2"
        result = invoke("download", "--url", f"http://127.0.0.1:{listener.getsockname()[1]}", "--out", out)
    finally:
        listener.close()
    assert result.exit_code == 1 and "timed out" in result.output and len(result.output.splitlines()) == 1
    assert socket.getdefaulttimeout() is None  # the process's default is left as it was
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
    def run(seed):
        return invoke("generate", "--weights", source, "--temperature", 1.0, "--seed", seed, "--tokens", 8)
    first, again, other = run(1), run(1), run(2)
    assert first.exit_code == 0, first.output
    assert first.output == again.output != other.output


def test_generate_with_bad_weights_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nothing-here"
    result = invoke("generate", "--weights", missing)
    assert result.exit_code == 1
    assert str(missing) in result.output and len(result.output.strip().splitlines()) == 1


def test_bench_forward_runs_ours_and_hugging_face_on_the_same_weights():
    pytest.importorskip("transformers")
    result = benchmarks.bench_forward(TINY, batch=2, n_pos=5, repeats=1, matmul_size=64)
    assert (result["batch"], result["n_pos"], result["repeats"]) == (2, 5, 1)
    assert result["max_abs_logit_diff"] < 1e-4  # HF really ran the same model on the same prompts


def test_bench_forward_without_transformers_times_ours_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    result = benchmarks.bench_forward(TINY, batch=2, n_pos=5, repeats=1, matmul_size=64)
    assert [result[key] for key in ("hf_s", "ours_over_hf", "max_abs_logit_diff")] == [None, None, None]
