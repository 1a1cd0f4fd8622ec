"""Specification of dictionaries.py: supervised dictionaries and SAEs (README §4 and §8)."""
import json

import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import benchmarks
import dictionaries as D
import main


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny SAEs gain nothing from a second thread, and on a busy machine waiting for it
    costs up to 50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(n=4096, d=32, n_features=48, active=3, seed=1234):
    """Sparse sums of known unit features, at an arbitrary raw scale and offset."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n_features, d, generator=g), dim=1)  # [n_features, d]
    chosen = torch.rand(n, n_features, generator=g).argsort(1)[:, :active]
    coefficients = torch.zeros(n, n_features).scatter(1, chosen, 0.5 + torch.rand(n, active, generator=g))
    return 3.0 * coefficients @ features + 1.0, features


def recovered(sae, features, threshold=0.9):
    """Fraction of true features with a decoder row at cosine >= threshold."""
    cosine = F.normalize(sae.W_dec, dim=1) @ features.T  # [d_sae, n_features]
    return (cosine.max(0).values >= threshold).float().mean().item()


# --- supervised dictionaries --------------------------------------------------------------

def attribute_data(n=4000, d=16, sizes=(("io", 8), ("s", 8), ("pos", 2)), noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    bias = torch.randn(d, generator=g)
    true = {name: torch.randn(k, d, generator=g) for name, k in sizes}
    true = {name: u - u.mean(0) for name, u in true.items()}  # centred, like mean codes
    ids = {name: torch.randint(k, (n,), generator=g) for name, k in sizes}
    acts = bias + sum(true[name][ids[name]] for name in true) + noise * torch.randn(n, d, generator=g)
    return acts, ids, true


@pytest.mark.parametrize("method", ["mean", "lstsq"])
def test_supervised_codes_recover_features(method):
    acts, ids, true = attribute_data()
    dictionary = D.SupervisedDictionary.fit(acts, ids, method=method)
    for name, u in true.items():
        cosine = F.cosine_similarity(dictionary.features[name], u, dim=1)
        assert cosine.min() >= 0.99, (name, cosine)
    assert torch.allclose(dictionary.bias, acts.mean(0), atol=1e-4)


@pytest.mark.parametrize("method, tolerance", [("lstsq", 1e-4), ("mean", 0.25)])
def test_supervised_edit_lands_on_counterfactual_and_weights_sum_to_one(method, tolerance):
    acts, ids, true = attribute_data(noise=0.0)
    dictionary = D.SupervisedDictionary.fit(acts, ids, method=method)
    new_io = (ids["io"] + 1) % 8
    counterfactual = acts - true["io"][ids["io"]] + true["io"][new_io]
    assert (dictionary.edit(acts, "io", ids["io"], new_io) - counterfactual).abs().max() < tolerance
    assert (dictionary.reconstruct(ids) - acts).abs().max() < tolerance  # noiseless: (nearly) exact
    weights = dictionary.feature_weights(ids)
    assert torch.allclose(sum(weights.values()), torch.ones(len(acts)), atol=1e-5)
    assert all(w.shape == (len(acts),) for w in weights.values())


def test_lstsq_equals_mean_codes_on_balanced_data_and_unseen_values_are_zero():
    g = torch.Generator().manual_seed(0)
    grid = torch.cartesian_prod(torch.arange(8), torch.arange(8), torch.arange(2)).repeat(3, 1)  # balanced
    ids = {"io": grid[:, 0], "s": grid[:, 1], "pos": grid[:, 2]}
    acts = torch.randn(len(grid), 16, generator=g) + 3 * F.one_hot(grid[:, 0], 16)  # any data will do
    mean = D.SupervisedDictionary.fit(acts, ids, n_values={"io": 10})
    lstsq = D.SupervisedDictionary.fit(acts, ids, n_values={"io": 10}, method="lstsq")
    for name in ids:
        assert torch.allclose(mean.features[name], lstsq.features[name], atol=1e-5)
    assert torch.allclose(mean.bias, lstsq.bias, atol=1e-5)
    assert mean.features["io"].shape == (10, 16)
    assert mean.features["io"][8:].abs().max() == 0 and lstsq.features["io"][8:].abs().max() == 0
    with pytest.raises(ValueError, match="attribute 'io'"):
        D.SupervisedDictionary.fit(acts, {**ids, "io": ids["io"][:10]})
    with pytest.raises(ValueError, match="ids must lie in"):
        D.SupervisedDictionary.fit(acts, ids, n_values={"pos": 1})


def test_supervised_save_load_round_trip(tmp_path):
    acts, ids, _ = attribute_data()
    dictionary = D.SupervisedDictionary.fit(acts, ids, method="lstsq")
    dictionary.save(tmp_path / "dict")
    loaded = D.SupervisedDictionary.load(tmp_path / "dict")
    assert loaded.method == "lstsq" and torch.equal(loaded.bias, dictionary.bias)
    assert all(torch.equal(loaded.features[k], v) for k, v in dictionary.features.items())


# --- SAE math ---------------------------------------------------------------------------

def hand_sae(arch, **fields):
    """d_in 2, d_sae 3: encoder columns e1, e2, e1 + e2; decoder rows e1, e2, (0.6, 0.8); b_dec
    (1, 0); λ 0.5. On x = (3, 1): x − b_dec = (2, 1), so (x − b_dec) W_enc = (2, 1, 3)."""
    return D.SAE(arch, W_enc=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]),
                 W_dec=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), b_dec=torch.tensor([1.0, 0.0]),
                 l1_coefficient=0.5, **fields)


X = torch.tensor([[3.0, 1.0]])


def test_vanilla_loss_by_hand():
    sae = hand_sae("vanilla", b_enc=torch.tensor([0.0, -1.0, -1.0]))
    # f = ReLU((2, 1, 3) + (0, -1, -1)) = (2, 0, 2); x̂ = 2 e1 + 2 (0.6, 0.8) + b_dec = (4.2, 1.6)
    assert torch.equal(sae.latents(X), torch.tensor([[2.0, 0.0, 2.0]]))
    # ‖x − x̂‖² = 1.2² + 0.6² = 1.8; λ‖f‖₁ = 0.5 · 4
    torch.testing.assert_close(sae.loss(X), torch.tensor([1.8 + 2.0]))


def test_gated_loss_by_hand():
    sae = hand_sae("gated", b_gate=torch.tensor([0.0, -1.5, -2.0]), b_mag=torch.tensor([-1.0, 0.0, -5.0]),
                   r_mag=torch.tensor([0.0, 0.0, math.log(2)]))
    # π_gate = (2, 1, 3) + b_gate = (2, -0.5, 1): gates (1, 0, 1), ReLU(π_gate) = (2, 0, 1)
    # magnitude = ReLU((2, 1, 3) ⊙ (1, 1, 2) + b_mag) = (1, 1, 1); f = (1, 0, 1)
    f = sae.latents(X)
    assert torch.allclose(f, torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.equal(sae.active(X), torch.tensor([[True, False, True]]))
    # x̂ = e1 + (0.6, 0.8) + b_dec = (2.6, 0.8): 0.4² + 0.2² = 0.2; λ‖ReLU(π_gate)‖₁ = 0.5 · 3;
    # x̂_frozen = 2 e1 + (0.6, 0.8) + b_dec = (3.6, 0.8): 0.6² + 0.2² = 0.4
    torch.testing.assert_close(sae.loss(X), torch.tensor([0.2 + 1.5 + 0.4]))
    # the auxiliary term's decoder is frozen: W_dec's gradient is that of the first term alone
    sae.W_dec.requires_grad_()
    sae.loss(X).sum().backward()
    W_dec_grad = sae.W_dec.grad.clone()
    sae.W_dec.grad = None
    (X - sae.reconstruct(sae.latents(X))).pow(2).sum().backward()
    torch.testing.assert_close(W_dec_grad, sae.W_dec.grad)


@pytest.mark.parametrize("k, f, loss", [(1, [0.0, 0.0, 2.5], 0.5 ** 2 + 1.0),
                                        (2, [2.0, 0.0, 2.5], 1.5 ** 2 + 1.0)])
def test_topk_loss_by_hand(k, f, loss):
    """pre = (2, 1, 3) + (0, -1, -0.5) = (2, 0, 2.5); x̂ = (2.5, 2.0) for k = 1, (4.5, 2.0) for k = 2;
    no penalty, whatever λ."""
    sae = hand_sae("topk", b_enc=torch.tensor([0.0, -1.0, -0.5]), k=k)
    assert torch.equal(sae.latents(X), torch.tensor([f]))
    torch.testing.assert_close(sae.loss(X), torch.tensor([loss]))


def test_a_stack_computes_what_its_saes_compute_alone():
    g = torch.Generator().manual_seed(0)
    saes = [D.SAE("topk", **tiny_params("topk", seed=s), k=k, l1_coefficient=0.1 * s, input_scale=1.0 + s)
            for s, k in enumerate((1, 3, 10))]
    stack = D.stack_saes(saes)
    assert stack.b_enc.shape == (3, 1, 10) and stack.k.shape == (3, 1, 1)
    x = torch.randn(3, 5, 6, generator=g)  # one batch per SAE
    for s, sae in enumerate(saes):  # equal up to float rounding: a batched matmul may sum in another order
        torch.testing.assert_close(stack.encode(x)[s], sae.encode(x[s]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stack.loss(x)[s], sae.loss(x[s]), rtol=1e-6, atol=1e-6)
        again = stack.unstack()[s]
        assert all(torch.equal(again.params[n], t) for n, t in sae.params.items())
        assert (again.k, again.input_scale) == (sae.k, sae.input_scale)
        assert again.l1_coefficient == pytest.approx(sae.l1_coefficient)


def test_an_sae_lacking_a_parameter_is_refused_in_one_line():
    with pytest.raises(ValueError, match="a gated SAE needs b_gate, r_mag, b_mag"):
        D.SAE("gated", **tiny_params("vanilla"))
    with pytest.raises(ValueError, match="a topk SAE needs k"):
        D.SAE("topk", **tiny_params("topk"))


def test_gated_math_matches_hand_computed_case():
    p = {"W_enc": torch.tensor([[1.0, -1.0], [0.5, 2.0]]), "b_gate": torch.tensor([0.0, -5.0]),
         "r_mag": torch.tensor([0.0, 0.0]), "b_mag": torch.tensor([-4.0, 1.0]),
         "W_dec": torch.eye(2), "b_dec": torch.tensor([1.0, 0.0])}
    sae = D.SAE("gated", **p, input_scale=2.0)
    x = torch.tensor([[1.5, 1.0]])  # normalised: [3, 2]; centred: [2, 2]
    # projection [2*1 + 2*0.5, -2 + 4] = [3, 2]; gate [3 > 0, 2 - 5 > 0] = [1, 0]
    # magnitude ReLU([3 - 4, 2 + 1]) = [0, 3]  (the ReLU matters: latent 0 has an open gate)
    assert torch.equal(sae.encode(x), torch.tensor([[0.0, 0.0]]))
    assert not sae.active(x).any()  # active means f ≠ 0: latent 0's open gate adds nothing
    x = torch.tensor([[2.5, 1.0]])  # normalised [5, 2]; centred [4, 2]; projection [5, 0]
    assert torch.equal(sae.encode(x), torch.tensor([[1.0, 0.0]]))  # gate [1, 0], magnitude [1, 1]
    x_hat, f = sae(x)
    assert torch.allclose(x_hat, (f @ p["W_dec"] + p["b_dec"]) / 2.0)
    p["r_mag"] = torch.tensor([0.6931472, 0.0])  # magnitude weights of latent 0 doubled: ReLU(2*5 - 4)
    assert torch.allclose(D.SAE("gated", **p, input_scale=2.0).encode(x), torch.tensor([[6.0, 0.0]]))


def test_training_logs_count_a_gated_latent_active_only_where_it_is_non_zero(monkeypatch):
    """L0 and the dead fraction count latents with f ≠ 0 (SAELens / SAEBench), in the training logs as
    in the grading: latent 1's gate is open on every input, but its magnitude is 0, so f_1 = 0."""
    hand = D.SAE("gated", W_enc=torch.eye(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
                 b_gate=torch.zeros(2), r_mag=torch.zeros(2), b_mag=torch.tensor([0.0, -5.0]))
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # norms √2 = √d_in: normalised as they are
    # π_gate = x: gates open where x > 0 (both, then latent 0); magnitude = ReLU(x + b_mag) = (1, 0)
    assert torch.equal(hand.encode(x), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    monkeypatch.setattr(D, "init_sae", lambda *args: hand)  # train from the hand-set weights ...
    monkeypatch.setattr(D, "_train_epoch", lambda stack, *args: torch.zeros(1))  # ... without a step
    _, logs = D.train_sae(x, D.SAESpec("gated"), D.TrainConfig(d_sae=2, epochs=1, resample_at=()))
    assert (logs[-1]["l0"], logs[-1]["dead_fraction"]) == (1.0, 0.5)  # the gate alone: 1.5 and 0


def test_topk_keeps_exactly_k():
    g = torch.Generator().manual_seed(0)
    p = {"W_enc": torch.randn(8, 64, generator=g), "b_enc": torch.full((64,), 100.0),
         "W_dec": F.normalize(torch.randn(64, 8, generator=g), dim=1), "b_dec": torch.zeros(8)}
    x = torch.randn(5, 7, 8, generator=g)
    for k in (1, 3, 10):
        sae = D.SAE("topk", **p, k=k)
        f = sae.encode(x)
        assert f.shape == (5, 7, 64) and (sae.active(x).sum(-1) == k).all()
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        assert torch.equal(f[f > 0], pre[f > 0]) and (f.min() >= 0)
    p["b_enc"] = torch.full((64,), -1e4)  # nothing positive: selected but ReLU'd to zero
    assert not D.SAE("topk", **p, k=3).active(x).any()


# --- training --------------------------------------------------------------------------

SMALL = D.TrainConfig(d_sae=128, batch_size=256, epochs=40, lr=3e-3)  # 640 steps: a fast schedule


@pytest.mark.parametrize("arch, l1, k", [("vanilla", 1.0, 3), ("gated", 2.5, 3), ("topk", 1.0, 3)])
def test_each_architecture_recovers_planted_features(arch, l1, k):
    x, features = planted()
    sae, logs = D.train_sae(x, D.SAESpec(arch, l1_coefficient=l1, k=k), SMALL)
    assert recovered(sae, features) >= 0.9, (arch, logs[-1])
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    assert [log["epoch"] for log in logs] == [1, 2, 4, 8, 16, 32, 40]
    assert logs[-1]["fve"] > 0.7 and 0 <= logs[-1]["dead_fraction"] <= 1
    x_hat, f = sae(x[:10])  # raw in, raw out: the SAE applies its input scale itself
    assert x_hat.shape == (10, 32) and (x_hat - x[:10]).norm() < 0.6 * (x[:10] - x.mean(0)).norm()


def test_frozen_random_decoder_stays_put():
    x, _ = planted(n=1024)
    config = D.TrainConfig(d_sae=64, batch_size=256, epochs=3)
    spec = D.SAESpec("vanilla", frozen_decoder=True, seed=3)
    frozen, _ = D.train_sae(x, spec, config)
    init = D.init_sae(spec, 32, 64, torch.Generator().manual_seed(3), torch.zeros(32), 1.0)
    assert torch.allclose(frozen.W_dec, init.W_dec, atol=1e-6)


@pytest.mark.parametrize("arch", ["vanilla", "gated", "topk"])
def test_batched_stack_trains_bit_for_bit_like_separate_runs(arch):
    """Each SAE of a stack (its own dataset, λ or k, and seed; resampling half-way) ends exactly
    where it ends trained alone, and so does a smaller stack of some of them."""
    x0, _ = planted(n=512, seed=1)
    x1, _ = planted(n=512, seed=2)
    datasets = torch.stack([x0, 2 * x1])
    config = D.TrainConfig(d_sae=64, batch_size=128, epochs=4, resample_at=(0.5,))
    specs = [D.SAESpec(arch, dataset_index=i % 2, l1_coefficient=0.5 + i, k=2 + i, seed=10 + i)
             for i in range(3)]
    stack, stack_logs = D.train_sae_stack(datasets, specs, config)
    grouped = [sae for group in (specs[:2], specs[2:])
               for sae in D.train_sae_stack(datasets, group, config)[0]]
    assert sorted({log["sae"] for log in stack_logs}) == [0, 1, 2]
    for s, spec in enumerate(specs):
        alone, alone_logs = D.train_sae_stack(datasets, [spec], config)
        for name, t in alone[0].params.items():
            assert torch.equal(stack[s].params[name], t), (s, name)
            assert torch.equal(grouped[s].params[name], t), (s, name)
        assert stack[s].input_scale == alone[0].input_scale
        assert [log["loss"] for log in stack_logs if log["sae"] == s] == [log["loss"] for log in alone_logs]


def test_bench_sae_training_reports_consistent_figures():
    r = benchmarks.bench_sae_training(n_sae=3, d_in=8, d_sae=16, n=256, epochs=1, batch_size=64, repeats=1)
    assert all(r[key] > 0 for key in ("stack_s", "grouped_s", "loop_s", "gflops", "matmul_ms_one"))
    assert r["stack_size"] == 3  # the default stack of 4 holds all three
    assert r["speedup"] == pytest.approx(r["loop_s"] / min(r["stack_s"], r["grouped_s"]))
    steps = 3 * 1 * (256 // 64)
    assert r["loop_ms_per_sae_step"] == pytest.approx(1e3 * r["loop_s"] / steps)
    # the ceiling compares the loop's step with the stacked step's five matmuls alone
    assert r["speedup_ceiling"] == pytest.approx(r["loop_ms_per_sae_step"] / r["matmul_ms_stacked"])
    assert r["matmul_gflops_stacked"] == pytest.approx(5 * 2 * 64 * 8 * 16 / (r["matmul_ms_stacked"] * 1e6))
    # the paper's grid: 660 SAEs x 40 steps an epoch, 2,000 epochs or a converged length
    ms = min(r["stack_s"], r["grouped_s"]) * 1e3 / steps
    assert r["paper_grid_hours"] == pytest.approx(660 * 40 * 2000 * ms / 3.6e6)
    converged = r["paper_grid_hours"] * r["converged_epochs"] / 2000
    assert r["paper_grid_converged_hours"] == pytest.approx(converged)


def test_step_matmuls_have_the_shapes_of_a_vanilla_step():
    import benchmarks  # tests/benchmarks.py, the speed script: its FLOP count rests on these shapes
    shapes = [tuple(t.shape) for t in benchmarks._step_matmuls(2, 5, 3, 7)()]
    assert shapes == [(2, 5, 7), (2, 5, 3), (2, 7, 3), (2, 5, 7), (2, 3, 7)]  # pre, x̂, dW_dec, df, dW_enc


def test_training_logs_at_geometric_checkpoints_and_the_last_epoch():
    _, logs = D.train_sae(torch.randn(64, 4), D.SAESpec("topk", k=1), D.TrainConfig(d_sae=4, epochs=20))
    assert [log["epoch"] for log in logs] == [1, 2, 4, 8, 16, 20]


def test_training_is_deterministic_for_a_seed():
    x, _ = planted(n=512)
    config = D.TrainConfig(d_sae=32, batch_size=128, epochs=2)
    a, _ = D.train_sae(x, D.SAESpec("gated", seed=5), config)
    b, _ = D.train_sae(x, D.SAESpec("gated", seed=5), config)
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)


def test_resampling_revives_dead_latents():
    x, _ = planted(n=2048)
    spec, g = D.SAESpec("vanilla", l1_coefficient=1.0), torch.Generator().manual_seed(0)
    inputs = x[None] * 0.1  # [S=1, N, d]
    stack = D.stack_saes([D.init_sae(spec, 32, 64, g, inputs[0].mean(0), 0.1)])
    stack.b_enc[0, 0, :20] = -1e3  # 20 dead latents
    adam = torch.optim.Adam([t.requires_grad_() for t in stack.params.values()], lr=1e-3)
    stack.loss(inputs[:, :256]).sum().backward()
    adam.step()
    reconstructions, errors, fires = D._statistics(stack, inputs, [spec], 256, 1)
    dead = fires == 0
    assert dead[0, :20].all() and torch.equal(errors, (inputs - reconstructions).pow(2).sum(-1))
    alive_norm = stack.W_enc[0][:, ~dead[0]].norm(dim=0).mean()
    D._resample_dead_latents(stack, adam, dead, errors, inputs, [g])
    *_, fires = D._statistics(stack, inputs, [spec], 256, 1)
    assert (fires[0, :20] > 0).all()
    assert torch.allclose(stack.W_enc[0][:, dead[0]].norm(dim=0), 0.2 * alive_norm)
    assert torch.allclose(stack.W_dec[0][dead[0]].norm(dim=1), torch.ones(20))
    assert (stack.b_enc[0, 0, dead[0]] == 0).all()
    # Adam forgets the dead latents (each parameter along its own latent axis), and only them
    moments = {name: adam.state[t]["exp_avg"][0] for name, t in stack.params.items()}
    assert (moments["W_enc"][:, dead[0]] == 0).all() and (moments["W_enc"][:, ~dead[0]] != 0).any()
    assert (moments["W_dec"][dead[0]] == 0).all() and (moments["W_dec"][~dead[0]] != 0).any()
    assert (moments["b_enc"][0, dead[0]] == 0).all() and (moments["b_dec"] != 0).any()


def test_lr_schedule_warms_up_and_decays_linearly_to_zero():
    config = D.TrainConfig(epochs=10, warmup_fraction=0.1, decay_fraction=0.25)
    schedule = D.Schedule(config, steps_per_epoch=10, can_resample=True)  # fixed: 100 steps
    factors = [schedule.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9:75] == [1.0] * 66
    assert factors[99] == pytest.approx(1 / 25) and factors[87] == pytest.approx(13 / 25)
    assert schedule.after_epoch(5, None, None) == "resample"  # at the fractions of resample_at
    schedule.restarted(5)
    assert schedule.lr_factor(52) == pytest.approx(0.3)  # warm-up again after a resample (at step 50)
    assert schedule.after_epoch(10, None, None) == "stop"
    topk = D.Schedule(config, steps_per_epoch=10, can_resample=False)  # top-k never resamples
    assert [topk.after_epoch(e, None, None) for e in range(1, 11)] == [None] * 9 + ["stop"]


def test_converging_schedule_stops_on_a_synthetic_plateau():
    """Loss 1/epoch falls fast, then flattens: improved by < 1% over the last 10% (at least 5
    epochs) of the run first at epoch 100+; with no dead latents it decays for a third as many
    steps again, then stops: the decay is the last quarter of training."""
    config = D.TrainConfig(epochs=1000, plateau=0.01, warmup_fraction=0.001)
    schedule = D.Schedule(config, steps_per_epoch=2, can_resample=True)
    actions = {}
    for epoch in range(1, 1001):
        loss = torch.tensor([1.0 + 1 / epoch, 2.0])  # two SAEs: the first one sets the pace
        actions[epoch] = schedule.after_epoch(epoch, loss, has_dead=lambda: False)
        if actions[epoch] == "stop":
            break
    # 1/e drops by < 1% of ~1 over max(5, e/10) epochs once 1/(e - w) - 1/e < 0.01
    def improvement(e, w):  # relative drop of 1 + 1/e over the last w epochs
        return (1 / (e - w) - 1 / e) / (1 + 1 / (e - w))
    plateau = next(e for e in range(7, 1000) if improvement(e, max(5, round(0.1 * e))) < 0.01)
    assert schedule.end == round(plateau * 2 / 0.75) and schedule.converged
    assert epoch == math.ceil(schedule.end / 2) and actions[epoch] == "stop"
    assert schedule.lr_factor(plateau * 2) == 1.0  # the decay starts at the plateau ...
    assert schedule.lr_factor(schedule.end - 1) == pytest.approx(1 / round(0.25 * schedule.end))  # ... ends at 0
    # With dead latents, a plateau resamples first (at most len(resample_at) times) and restarts.
    schedule = D.Schedule(config, steps_per_epoch=2, can_resample=True)
    resampled = [e for e in range(1, 400) if schedule.after_epoch(e, torch.tensor([1.0]), lambda: True) == "resample"
                 and schedule.restarted(e) is None]
    assert len(resampled) == len(config.resample_at) and schedule.end is not None


def test_converging_schedule_that_hits_the_cap_is_not_converged():
    config = D.TrainConfig(epochs=20, plateau=0.01)
    schedule = D.Schedule(config, steps_per_epoch=1, can_resample=False)
    actions = [schedule.after_epoch(e, torch.tensor([1.0 / e]), lambda: False) for e in range(1, 21)]
    assert actions[-1] == "stop" and actions[:-1] == [None] * 19 and not schedule.converged


# --- formats: SAELens's layout, both ways ---------------------------------------------------

def tiny_params(arch, d_in=6, d_sae=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    params = {n: torch.randn(shapes.get(n, (d_sae,)), generator=g) for n in D.PARAMETERS[arch]}
    if arch == "jumprelu":
        params["threshold"] = params["threshold"].abs()  # thresholds are positive in practice
    return params


def saelens_forward(cfg, w, x):
    """SAELens 6's inference SAEs, written out from its documented math, for reference:
    sae_in = x - b_dec (if apply_b_dec_to_input); standard: ReLU(sae_in W_enc + b_enc); gated:
    1[sae_in W_enc + b_gate > 0] ReLU(sae_in (W_enc exp r_mag) + b_mag); topk: pre (times ‖W_dec[j]‖
    with rescale_acts_by_decoder_norm), top k, ReLU; jumprelu: ReLU(pre) 1[pre > threshold].
    Output f W_dec + b_dec (f / ‖W_dec[j]‖ with the rescale). Returns (latents, reconstruction)."""
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    arch, norms = cfg["architecture"], w["W_dec"].norm(dim=-1)
    if arch == "gated":
        magnitude = torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
        f = (sae_in @ w["W_enc"] + w["b_gate"] > 0) * magnitude
        return f, f @ w["W_dec"] + w["b_dec"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if arch == "topk":
        pre = pre * norms if rescale else pre
        top = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    elif arch == "jumprelu":
        f = torch.relu(pre) * (pre > w["threshold"])
    else:
        f = torch.relu(pre)
    return f, (f / norms if rescale else f) @ w["W_dec"] + w["b_dec"]


def write_saelens(directory, cfg, weights):
    directory.mkdir()
    save_file(weights, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))


def saelens6_cfg(architecture, **settings):
    return {"architecture": architecture, "d_in": 6, "d_sae": 10, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.1.attn.hook_z",
                         "hook_head_index": 3},
            **settings}


ARCHS = ["vanilla", "gated", "topk", "jumprelu"]


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_is_read_exactly_by_saelens_math_on_raw_activations(tmp_path, arch):
    """save_sae folds the input scale into the weights: SAELens's formulas on the saved folder,
    with raw activations, give our SAE's latents and reconstruction; load_sae gives the SAE back."""
    sae = D.SAE(arch, **tiny_params(arch), input_scale=1.7, k=4 if arch == "topk" else None,
                meta={"node": "z@L9H9@end"})
    D.save_sae(sae, tmp_path / arch)
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["architecture"] == D.SAELENS_ARCH[arch] and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["node"] == "z@L9H9@end" and cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == D.PLAIN_MODEL  # it read the unprocessed model
    weights = load_file(str(tmp_path / arch / "sae_weights.safetensors"))
    x = 5 * torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    f, x_hat = saelens_forward(cfg, weights, x)
    ours_hat, ours_f = sae(x)
    torch.testing.assert_close(f, ours_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, ours_hat, rtol=1e-5, atol=1e-5)
    loaded = D.load_sae(tmp_path / arch)
    assert loaded.arch == arch and loaded.input_scale == 1.0 and loaded.k == sae.k
    assert loaded.meta["node"] == "z@L9H9@end"
    torch.testing.assert_close(loaded(x)[0], ours_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal(loaded.active(x), sae.active(x))
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("arch", ARCHS)
def test_input_shift_and_centring_fold_into_the_sae(arch):
    """An SAE trained on shifted or centred inputs (TransformerLens's processed model), made to
    read the inputs as they are: same latents; reconstruction in the inputs' own space."""
    p, k = tiny_params(arch, seed=5), 3 if arch == "topk" else None
    sae = D.SAE(arch, **p, k=k)
    x = 2 * torch.randn(30, 6, generator=torch.Generator().manual_seed(6)) + 3.0  # far from mean 0
    centred = D.SAE(arch, **D.fold_input_centring(p), k=k)
    expected_hat, expected_f = sae(x - x.mean(-1, keepdim=True))
    torch.testing.assert_close(centred(x)[1], expected_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(centred(x)[0], expected_hat, rtol=1e-5, atol=1e-5)
    shift = torch.randn(6)
    shifted = D.SAE(arch, **D.fold_input_shift(p, shift), k=k)
    expected_hat, expected_f = sae(x - shift)
    torch.testing.assert_close(shifted(x)[1], expected_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted(x)[0], expected_hat + shift, rtol=1e-5, atol=1e-5)


def test_layer_level_hook_z_sae_is_saved_with_saelens_reshaping(tmp_path):
    meta = {"hook_name": "blocks.2.attn.hook_z", "hook_head_index": None}  # all heads concatenated
    sae = D.SAE("vanilla", **tiny_params("vanilla"), meta=meta)
    D.save_sae(sae, tmp_path / "z")
    assert json.loads((tmp_path / "z" / "cfg.json").read_text())["reshape_activations"] == "hook_z"


@pytest.mark.parametrize("arch,settings", [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("gated", {}),
    ("gated", {"apply_b_dec_to_input": False}), ("topk", {"k": 3}),
    ("topk", {"k": 3, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}), ("jumprelu", {"apply_b_dec_to_input": False})])
def test_loads_saelens_6_folders_exactly(tmp_path, arch, settings):
    ours = {"standard": "vanilla"}.get(arch, arch)
    w = tiny_params(ours, seed=3)
    w["W_dec"] = w["W_dec"] * torch.linspace(0.2, 3.0, 10)[:, None]  # decoder rows of unequal norms
    cfg = saelens6_cfg(arch, **settings)
    write_saelens(tmp_path / "sae", cfg, w)
    sae = D.load_sae(tmp_path / "sae")
    assert sae.arch == ours and sae.meta["hook_name"] == "blocks.1.attn.hook_z"
    assert sae.meta["hook_head_index"] == 3
    x = 3 * torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    f, x_hat = saelens_forward(cfg, w, x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x)[0], x_hat, rtol=1e-5, atol=1e-5)


def test_loads_pre_6_saelens_folders(tmp_path):
    """SAELens < 6: hook_point and the top-k's k at the top level, activation_fn_str."""
    w = tiny_params("topk")
    old = {"architecture": "standard", "d_in": 6, "d_sae": 10, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "hook_point": "blocks.4.hook_resid_pre", "hook_point_head_index": None}
    write_saelens(tmp_path / "topk", old, w)
    sae = D.load_sae(tmp_path / "topk")
    assert sae.arch == "topk" and sae.k == 2 and sae.meta["hook_name"] == "blocks.4.hook_resid_pre"
    x = torch.randn(4, 6)
    torch.testing.assert_close(sae.encode(x), saelens_forward({"architecture": "topk", "k": 2}, w, x)[0])


def test_fold_decoder_norm_by_hand():
    """Rows of norm 5 and 2: W_enc columns and b_enc scaled by them, W_dec rows divided."""
    p = {"W_enc": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b_enc": torch.tensor([0.5, -1.0]),
         "W_dec": torch.tensor([[3.0, 4.0], [0.0, 2.0]]), "b_dec": torch.tensor([1.0, 1.0])}
    folded = D.fold_decoder_norm(p)
    assert torch.equal(folded["W_enc"], torch.tensor([[5.0, 4.0], [15.0, 8.0]]))
    assert torch.equal(folded["b_enc"], torch.tensor([2.5, -2.0]))
    assert torch.equal(folded["W_dec"], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.equal(folded["b_dec"], p["b_dec"])
    # x = (2, 1): centred (1, 0); pre (1.5, 1.0) x norms (5, 2) = (7.5, 2.0); top-1 keeps 7.5,
    # which decodes as 7.5 / 5 * (3, 4) + (1, 1) = (5.5, 7.0)
    sae = D.SAE("topk", **folded, k=1)
    assert torch.equal(sae.encode(torch.tensor([[2.0, 1.0]])), torch.tensor([[7.5, 0.0]]))
    torch.testing.assert_close(sae(torch.tensor([[2.0, 1.0]]))[0], torch.tensor([[5.5, 7.0]]))


def test_fold_input_scale_by_hand():
    p = {"W_enc": torch.tensor([[1.0], [2.0]]), "b_enc": torch.tensor([0.5]),
         "W_dec": torch.tensor([[4.0, 2.0]]), "b_dec": torch.tensor([2.0, -2.0])}
    folded = D.fold_input_scale(p, 2.0)
    assert torch.equal(folded["W_enc"], torch.tensor([[2.0], [4.0]]))
    assert torch.equal(folded["b_enc"], p["b_enc"])
    assert torch.equal(folded["W_dec"], torch.tensor([[2.0, 1.0]]))
    assert torch.equal(folded["b_dec"], torch.tensor([1.0, -1.0]))
    # raw x = (3, 1): normalised (6, 2), centred (4, 4), f = ReLU(4 + 8 + 0.5) = 12.5,
    # x̂ = (12.5 (4, 2) + (2, -2)) / 2 = (26, 11.5)
    x = torch.tensor([[3.0, 1.0]])
    for sae in (D.SAE("vanilla", **p, input_scale=2.0), D.SAE("vanilla", **folded)):
        assert torch.equal(sae.encode(x), torch.tensor([[12.5]]))
        torch.testing.assert_close(sae(x)[0], torch.tensor([[26.0, 11.5]]))


def test_jumprelu_encode_by_hand():
    """A latent fires only above its threshold, with its full pre-activation (no shift by θ)."""
    p = {"W_enc": torch.eye(3), "b_enc": torch.tensor([0.0, 0.0, -1.0]), "W_dec": torch.eye(3),
         "b_dec": torch.zeros(3), "threshold": torch.tensor([1.5, 1.5, -2.0])}
    sae = D.SAE("jumprelu", **p)
    x = torch.tensor([[1.0, 2.0, 0.5]])  # pre = (1, 2, -0.5): below, above, above a negative θ but < 0
    assert torch.equal(sae.encode(x), torch.tensor([[0.0, 2.0, 0.0]]))
    assert torch.equal(sae.active(x), torch.tensor([[False, True, False]]))


@pytest.mark.parametrize("change,message", [
    ({"architecture": "matching_pursuit"}, "architecture='matching_pursuit' is not supported"),
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm' is not supported"),
    ({"normalize_activations": "expected_average_only_in"},
     "normalize_activations='expected_average_only_in' is not supported"),
    ({"reshape_activations": "hook_q"}, "reshape_activations='hook_q' is not supported"),
    ({"activation_fn": "tanh-relu"}, "activation_fn='tanh-relu' is not supported"),
    ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor=True is not supported"),
    ({"d_in": 7}, "W_enc has shape (6, 10), not (7, 10) (cfg.json has d_in=7, d_sae=10)"),
])
def test_refuses_what_it_cannot_compute_in_one_line(tmp_path, change, message):
    write_saelens(tmp_path / "sae", saelens6_cfg("standard") | change, tiny_params("vanilla"))
    with pytest.raises(ValueError) as error:
        D.load_sae(tmp_path / "sae")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_refuses_top_k_without_k(tmp_path):
    write_saelens(tmp_path / "sae", saelens6_cfg("topk"), tiny_params("topk"))
    with pytest.raises(ValueError, match="k=None is not supported"):
        D.load_sae(tmp_path / "sae")


def test_refuses_a_folder_lacking_a_weight_in_one_line(tmp_path):
    weights = tiny_params("gated")
    del weights["r_mag"]
    write_saelens(tmp_path / "sae", saelens6_cfg("gated"), weights)
    with pytest.raises(ValueError, match="sae_weights.safetensors: a gated SAE needs a tensor r_mag"):
        D.load_sae(tmp_path / "sae")


def test_reads_folders_saved_before_the_scale_was_folded(tmp_path):
    """Earlier save_sae wrote normalised-space weights with `input_scale` beside them."""
    w = tiny_params("gated")
    legacy = {"architecture": "gated", "d_in": 6, "d_sae": 10, "apply_b_dec_to_input": True,
              "normalize_activations": "expected_average_only_in", "input_scale": 1.7, "metadata": {}}
    write_saelens(tmp_path / "old", legacy, w)
    x = torch.randn(5, 6)
    torch.testing.assert_close(D.load_sae(tmp_path / "old")(x)[0], D.SAE("gated", **w, input_scale=1.7)(x)[0])


# --- CLI --------------------------------------------------------------------------------

def test_train_sae_cli_trains_and_saves(tmp_path):
    x, features = planted()
    save_file({"acts": x}, str(tmp_path / "acts.safetensors"))
    result = CliRunner().invoke(main.cli, ["train-sae", "--acts", str(tmp_path / "acts.safetensors"),
                                           "--arch", "topk", "--k", "3", "--latents", "96", "--epochs", "40",
                                           "--lr", "3e-3", "--no-progress", "--out", str(tmp_path / "sae")])
    assert result.exit_code == 0, result.output
    assert "fve" in result.output
    sae = D.load_sae(tmp_path / "sae")
    assert sae.d_sae == 96 and sae.k == 3 and recovered(sae, features) >= 0.9


@pytest.mark.parametrize("make, args, message", [
    (None, [], "no such file"),
    ({"x": torch.zeros(4, 3)}, [], "no tensor named 'acts' (found: x)"),
    ({"acts": torch.zeros(4, 3, 2)}, [], "expected a tensor of shape [N, d]"),
    ({"acts": torch.tensor([[0.0, float("nan")]])}, [], "NaN"),
    ({"acts": torch.zeros(4, 3)}, ["--arch", "topk", "--k", "20", "--latents", "8"], "k must lie in [1, d_sae=8]"),
    ({"acts": torch.zeros(4, 3)}, ["--arch", "sparse"], "sparse"),
    ({"acts": torch.zeros(4, 3)}, ["--epochs", "0"], "epochs"),
    ({"acts": torch.zeros(4, 3)}, ["--lr", "-1"], "lr"),
    ({"acts": torch.zeros(4, 3)}, ["--l1", "-1"], "l1"),
])
def test_train_sae_cli_rejects_bad_input(tmp_path, make, args, message):
    path = tmp_path / "acts.safetensors"
    if make is not None:
        save_file(make, str(path))
    args = ["train-sae", "--acts", str(path), "--out", str(tmp_path / "out"), "--no-progress"] + (
        args if "--arch" in args else ["--arch", "vanilla"] + args)
    result = CliRunner().invoke(main.cli, args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output


# --- full-distribution activations ------------------------------------------------------

def test_corpus_texts(tmp_path):
    default = list(D.iter_corpus_texts())
    assert len(default) > 50 and all(isinstance(t, str) and t for t in default)
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.txt").write_text("first para\nstill first\n\n\nsecond\n")
    assert list(D.iter_corpus_texts(tmp_path / "c.jsonl")) == ["one", "two"]
    assert list(D.iter_corpus_texts(tmp_path / "c.txt")) == ["first para\nstill first", "second"]


class ByteTokenizer:
    def encode_ordinary(self, text):
        return [b % 50 for b in text.encode()]


def test_collect_corpus_activations_matches_direct_run():
    gpt2 = pytest.importorskip("gpt2")
    torch.manual_seed(0)
    model = gpt2.GPT2(gpt2.GPT2Config(vocab_size=gpt2.BOS_TOKEN_ID + 1, n_layer=2, n_embd=32, n_head=2, n_positions=64))
    model.eval()
    nodes = [("blocks.1.attn.hook_z", 1), ("blocks.0.attn.hook_q", 0)]
    texts = ["hello world, " * 20, "a second document " * 30]
    acts = D.collect_corpus_activations(model, ByteTokenizer(), nodes, texts, max_tokens=100, context=16, batch_size=3)
    assert all(a.shape == (100, 16) for a in acts.values())
    first = [gpt2.BOS_TOKEN_ID] + ByteTokenizer().encode_ordinary(texts[0])[:15]
    _, cache = model.run_with_cache(torch.tensor([first]), ["blocks.1.attn.hook_z"])
    assert torch.allclose(acts[nodes[0]][:15], cache["blocks.1.attn.hook_z"][0, 1:, 1], atol=1e-5)
    everything = D.collect_corpus_activations(model, ByteTokenizer(), nodes, texts, max_tokens=10**6, context=16)
    assert len(everything[nodes[0]]) == 15 * ((len(texts[0]) + len(texts[1]) + 2) // 15)
    D.train_sae_stack(torch.stack(list(acts.values())), [D.SAESpec("vanilla", i) for i in range(2)],
                      D.TrainConfig(d_sae=8, epochs=1))  # the collected tensors are trainable data
