"""Every metric of the evaluation (Makelov, Lange & Nanda, arXiv 2405.08366) in the order of the paper's
tests: approximation (README §5), control (§6), interpretability (§7), SAE core metrics (§8), the two
phenomena and their toys (§9), then the graders that turn every test at every cross-section into flat
`Record`s, and ground truth beyond the paper. SAEs (dictionaries.py) decode in their own normalised space:
latent j adds f_j W_dec[j] / input_scale (`SAE.raw_directions`). Start with `sufficiency`, `grade_section`."""
import functools
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import dictionaries
import ioi

NAME_ATTRIBUTES = ("io", "s")


def _mean(values) -> float:
    """Mean of a tensor of per-prompt values (or of a number that already is a mean)."""
    return float(torch.as_tensor(values, dtype=torch.float64).mean())


# --- Test 1: approximation (README §5); arguments are per-prompt LDs [B] or their means ---
def sufficiency(ld_patched, ld_clean) -> float:
    """mean LD(a -> â) / mean LD(clean): 1 means the reconstruction carries the whole task."""
    clean = _mean(ld_clean)
    if clean == 0:
        raise ValueError("sufficiency: the mean clean logit difference is 0")
    return _mean(ld_patched) / clean


def ld_recovered(ld_sae, ld_mean_ablated, ld_clean) -> float:
    """|LD_sae - LD_meanabl| / |LD_clean - LD_meanabl|: 1 = as good as clean, 0 = as bad as mean ablation."""
    mean_ablated = _mean(ld_mean_ablated)
    total_effect = abs(_mean(ld_clean) - mean_ablated)
    if total_effect == 0:
        raise ValueError("necessity, LD recovered: mean ablation does not change the mean logit difference")
    return abs(_mean(ld_sae) - mean_ablated) / total_effect


def necessity(ld_mean_ablated, ld_patched, ld_clean) -> float:
    """1 - LD recovered by a -> ā + (a - â) (mean LDs): a dictionary that explains everything gives mean
    ablation (1), nothing clean (0)."""
    return 1 - ld_recovered(ld_patched, ld_mean_ablated, ld_clean)


# --- Test 2: control (README §6) ---
def edit_accuracy(edited_top: torch.Tensor, ground_truth_top: torch.Tensor) -> float:
    """Share of prompts whose argmax token [B] after the edit is the ground-truth run's."""
    if edited_top.shape != ground_truth_top.shape or edited_top.dtype != torch.long:
        raise ValueError(f"edit_accuracy: expected two LongTensors [B] of argmax tokens, got "
                         f"{edited_top.dtype} {tuple(edited_top.shape)} and {tuple(ground_truth_top.shape)}")
    return float((edited_top == ground_truth_top).float().mean())


def sae_latent_weights(f: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """w_j = f_j d_j·(â - b_dec) / ‖â - b_dec‖² -> [B, d_sae]: as â - b_dec = Σ_j f_j d_j, they sum
    to 1 (0 if nothing fires). An edit removes the weight of the latents it changes (README §6)."""
    centred_reconstruction = f @ directions  # [B, d] = â - b_dec
    projections = (centred_reconstruction @ directions.T) * f  # [B, d_sae]
    squared_norm = centred_reconstruction.pow(2).sum(-1, keepdim=True)  # [B, 1]
    return torch.where(squared_norm > 0, projections / squared_norm, torch.zeros_like(projections))


@torch.no_grad()
def greedy_sae_edit(sae, a_clean: torch.Tensor, a_counterfactual: torch.Tensor, k: int):
    """README §6's agnostic edit: k times, or until none helps, add the move Δ_j = (f_j(p') - f_j(p)) d_j
    that brings their sum S closest to a(p') - a(p) -> (a(p) + S [B, d], changed [B, d_sae])."""
    directions = sae.raw_directions  # [d_sae, d]
    coefficient_change = sae.encode(a_counterfactual) - sae.encode(a_clean)  # [B, d_sae]
    direction_sq_norms = directions.pow(2).sum(-1)  # [d_sae]
    rows = torch.arange(len(a_clean))
    remaining = a_clean - a_counterfactual  # [B, d] = S - δ
    changed = torch.zeros_like(coefficient_change, dtype=torch.bool)  # [B, d_sae]
    for _ in range(min(k, directions.shape[0])):
        # ‖S - δ + c_j d_j‖² - ‖S - δ‖² = 2 c_j d_j·(S - δ) + c_j² ‖d_j‖², without
        # materialising the [B, d_sae, d] tensor of candidate moves.
        distance_change = (2 * coefficient_change * (remaining @ directions.T)
                           + coefficient_change.pow(2) * direction_sq_norms)  # [B, d_sae]
        distance_change[changed] = float("inf")
        best_change, best = distance_change.min(-1)  # [B]
        helps = best_change < 0  # [B]
        if not helps.any():
            break
        changed[rows[helps], best[helps]] = True
        move = coefficient_change[rows, best, None] * directions[best]  # [B, d]
        remaining = remaining + helps[:, None] * move
    return a_clean + (changed * coefficient_change) @ directions, changed


def first_active_in_ranking(ranking: torch.Tensor, active: torch.Tensor, k: int) -> torch.Tensor:
    """Per prompt, the first k latents of `ranking` [B, R] that are active [B, d_sae] -> mask [B, d_sae]."""
    active_in_rank_order = active.gather(1, ranking)  # [B, R]
    picked = active_in_rank_order & (active_in_rank_order.cumsum(1) <= k)  # [B, R]
    return torch.zeros_like(active).scatter(1, ranking, picked)  # [B, d_sae]


@torch.no_grad()
def f1_guided_edit(sae, a_clean: torch.Tensor, a_counterfactual: torch.Tensor,
                   ranking_old: torch.Tensor, ranking_new: torch.Tensor, k: int):
    """README §6's interpretation-aware edit of v into v' (rankings [B, R] by F1, `latents_by_f1`):
    remove the first k latents ranked for v active on p, add the first k for v' active on p'."""
    directions = sae.raw_directions  # [d_sae, d]
    removed = first_active_in_ranking(ranking_old, sae.active(a_clean), k)  # [B, d_sae]
    added = first_active_in_ranking(ranking_new, sae.active(a_counterfactual), k)  # [B, d_sae]
    change = added * sae.encode(a_counterfactual) - removed * sae.encode(a_clean)  # [B, d_sae]
    return a_clean + change @ directions, removed | added


# --- Test 3: interpretability (README §7) ---
def _f1_from_counts(intersection, n_active, n_property):
    """F1 = 2PR/(P+R) = 2|A∩F| / (|A| + |F|); 0 where both sets are empty (P and R undefined)."""
    denominator = n_active + n_property
    return torch.where(denominator > 0, 2 * intersection / denominator.clamp(min=1), 0.0)


def f1_scores(active: torch.Tensor, properties: torch.Tensor) -> torch.Tensor:
    """F1 of every latent (F: where it fires, active [N, L]) for every property A [N, P] -> [L, P]."""
    if active.ndim != 2 or properties.ndim != 2 or len(active) != len(properties):
        raise ValueError(f"F1: expected active [N, L] and properties [N, P], got "
                         f"{tuple(active.shape)} and {tuple(properties.shape)}")
    active, properties = active.float(), properties.float()
    return _f1_from_counts(active.T @ properties, active.sum(0)[:, None], properties.sum(0)[None, :])


def _name_properties(attributes: dict, n_names: int) -> dict:
    """One-hot single-name properties [N, n_names]: "io", "s", "has" (in the prompt), "first", "second"."""
    io, s = (F.one_hot(attributes[name], n_names).bool() for name in NAME_ATTRIBUTES)  # [N, n_names] each
    io_first = (attributes["pos"] == ioi.PATTERNS.index("ABB"))[:, None]  # [N, 1]
    return {"io": io, "s": s, "has": io | s,
            "first": torch.where(io_first, io, s), "second": torch.where(io_first, s, io)}


def candidate_properties(attributes: dict, names: Sequence[str]):
    """README §7's candidates io=v, s=v, has=v, first=v, second=v, pos=p, io=v&pos=p, s=v&pos=p ->
    (bool [N, P], labels [P]), from ids {"io", "s", "pos"} [N]."""
    dictionaries.attribute_sizes(attributes, len(attributes["io"]),
                                 {"io": len(names), "s": len(names), "pos": len(ioi.PATTERNS)})
    singles = _name_properties(attributes, len(names))
    pos = F.one_hot(attributes["pos"], len(ioi.PATTERNS)).bool()  # [N, 2]
    blocks = [(matrix, [f"{family}={name}" for name in names]) for family, matrix in singles.items()]
    blocks.append((pos, [f"pos={value}" for value in ioi.PATTERNS]))
    blocks += [(singles[family] & pos[:, p:p + 1], [f"{family}={name}&pos={value}" for name in names])
               for family in NAME_ATTRIBUTES for p, value in enumerate(ioi.PATTERNS)]
    return torch.cat([matrix for matrix, _ in blocks], 1), [label for _, group in blocks for label in group]


def name_unions(active: torch.Tensor, name_properties: torch.Tensor, max_names: int = 10):
    """Each latent's best union ("IO is Mary or John") of its top 1, 2, ..., max_names names by F1 -> (f1 [L],
    members [L, max_names], padded with -1)."""
    ranked = f1_scores(active, name_properties).argsort(dim=1, descending=True, stable=True)  # ties: lower id
    top_names = ranked[:, :max_names]  # [L, m]
    active = active.bool()
    if (name_properties.sum(1) <= 1).all():  # one name a prompt (io, s, first, second): counts add up
        both = (active.float().T @ name_properties.float()).gather(1, top_names).cumsum(1)  # [L, m]: |A∩F|
        sizes = name_properties.sum(0)[top_names].cumsum(1)  # [L, m]
        union_f1 = _f1_from_counts(both, active.sum(0)[:, None], sizes).T  # [m, L]
    else:  # "has": a prompt holds two names, so the union is counted prompt by prompt
        union, union_f1 = torch.zeros_like(active), []  # [N, L]; F1 of each latent's top 1, 2, ... names
        for next_names in top_names.T:  # [L]
            union = union | name_properties[:, next_names]  # [N, L]
            union_f1.append(_f1_from_counts((active & union).sum(0), active.sum(0), union.sum(0)).float())
        union_f1 = torch.stack(union_f1)
    best_f1, best = union_f1.max(dim=0)  # [L]; ties: the smaller union
    best_size = torch.where(best_f1 > 0, best + 1, 0)  # [L]
    in_union = torch.arange(top_names.shape[1]) < best_size[:, None]  # [L, m]
    members = torch.full((active.shape[1], max_names), -1, dtype=torch.long)
    members[:, :top_names.shape[1]] = torch.where(in_union, top_names, -1)
    return best_f1, members


@dataclass
class LatentInterpretations:
    f1: torch.Tensor  # [L, P] F1 of every latent for every candidate property
    labels: list  # [P] names of the candidate properties
    best_f1: torch.Tensor  # [L] F1 of each latent's interpretation (name unions included)
    best_labels: list  # [L] each latent's interpretation, e.g. "io=Mary", "s=Ann|Bob"


def interpret_latents(active: torch.Tensor, attributes: dict, names: Sequence[str],
                      max_union: int = 10) -> LatentInterpretations:
    """Each latent's best-F1 property among README §7's candidates and, for the single-name families,
    unions of up to `max_union` names (a union wins only if strictly better)."""
    properties, labels = candidate_properties(attributes, names)
    f1 = f1_scores(active, properties)  # [L, P]
    best_f1, best_index = f1.max(dim=1)
    best_labels = [labels[i] for i in best_index.tolist()]
    for family, family_properties in _name_properties(attributes, len(names)).items():
        union_f1, members = name_unions(active, family_properties, max_union)
        for latent in torch.nonzero(union_f1 > best_f1).flatten().tolist():
            chosen = [names[i] for i in members[latent].tolist() if i >= 0]
            best_labels[latent] = f"{family}={'|'.join(chosen)}"
            best_f1[latent] = union_f1[latent]
    return LatentInterpretations(f1, labels, best_f1, best_labels)


def _attribute_columns(labels: Sequence[str], attribute: str) -> torch.Tensor:
    """Columns of the single-value properties "attribute=v", in attribute-id order."""
    columns = [i for i, label in enumerate(labels) if label.startswith(f"{attribute}=") and "&" not in label]
    if not columns:
        raise ValueError(f"no property labelled {attribute}=... among the labels")
    return torch.tensor(columns)


def latents_by_f1(f1: torch.Tensor, labels: Sequence[str], attribute: str) -> torch.Tensor:
    """Latents by decreasing F1 per value of an attribute -> [n_values, L]: `f1_guided_edit`'s rankings."""
    return f1[:, _attribute_columns(labels, attribute)].T.argsort(dim=1, descending=True, stable=True)


def names_with_latent(f1: torch.Tensor, labels: Sequence[str], attribute: str, threshold: float = 0.5) -> int:
    """Number of values of `attribute` with a latent of F1 >= threshold for "attribute=v"."""
    return int((f1[:, _attribute_columns(labels, attribute)].max(dim=0).values >= threshold).sum())


def coverage(f1: torch.Tensor, labels: Sequence[str], threshold: float = 0.8) -> dict:
    """Share of the values of io, s and pos that some latent explains with F1 >= threshold."""
    return {attribute: names_with_latent(f1, labels, attribute, threshold)
            / len(_attribute_columns(labels, attribute))
            for attribute in ("io", "s", "pos")}


# --- Phenomenon 1: feature occlusion, the toy model (README §9) ---
def occlusion_toy_data(io_norm: float, s_norm: float, n_samples: int, n_values: int = 216,
                       d: int = 64, seed: int = 0):
    """a = u_i + v_j, i ("IO") and j ("S") uniform over n_values, u, v ~ N(0, I_d) rescaled to norms
    io_norm and s_norm -> (acts [N, d], {"io": i [N], "s": j [N]})."""
    generator = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(n_values, d, generator=generator) for _ in range(2))
    u, v = io_norm * u / u.norm(dim=1, keepdim=True), s_norm * v / v.norm(dim=1, keepdim=True)  # [n, d]
    io, s = (torch.randint(n_values, (n_samples,), generator=generator) for _ in range(2))
    return u[io] + v[s], {"io": io, "s": s}


def occlusion_toy_recovery(active: torch.Tensor, values: dict, n_values: int, threshold: float = 0.9) -> dict:
    """Per attribute, the share of its values with a latent of F1 > threshold (active [N, d_sae])."""
    return {attribute: float((f1_scores(active, F.one_hot(ids, n_values)).max(dim=0).values > threshold)
                             .float().mean()) for attribute, ids in values.items()}


# Tuned so both feature sets are recovered (F1 > 0.9) at 1:1: the paper's 216 values, but d = 128 (at 64
# features interfere too much) and a λ where the weaker set fades as the ratio grows; ~20 s on 2 CPUs.
OCCLUSION_TOY_RATIOS = (1.0, 1.2, 1.5, 2.0)
OCCLUSION_TOY_TRAINING = dictionaries.TrainConfig(d_sae=512, lr=1e-2, batch_size=256, epochs=30,
                                                  resample_at=(0.125, 0.25))


def occlusion_toy_experiment(ratios: Sequence[float], l1: float = 4.5, n_values: int = 216, d: int = 128,
                             n_samples: int = 10_000, config=OCCLUSION_TOY_TRAINING, seed: int = 0) -> list:
    """Per norm ratio r, a vanilla SAE (one batched stack) trained on u_i + v_j, ‖u‖ = 1, ‖v‖ = 1/r
    (the same features and samples at every r), and the shares of u ("io"), v ("s") it finds."""
    data = [occlusion_toy_data(1.0, 1 / ratio, n_samples, n_values, d, seed) for ratio in ratios]
    specs = [dictionaries.SAESpec("vanilla", i, l1_coefficient=l1, seed=seed) for i in range(len(ratios))]
    saes, _ = dictionaries.train_sae_stack(torch.stack([acts for acts, _ in data]), specs, config)
    with torch.no_grad():
        return [{"ratio": ratio, "l1": l1, **occlusion_toy_recovery(sae.active(acts), values, n_values),
                 "l0": sae_core_metrics(sae, acts, acts)["l0"]}
                for ratio, sae, (acts, values) in zip(ratios, saes, data)]


# --- Phenomenon 2: feature over-splitting (README §9) ---
def pos_latents(best_labels: Sequence[str]) -> int:
    """Number of latents whose interpretation is a Pos value (pos=ABB or pos=BAB)."""
    return sum(label in {f"pos={value}" for value in ioi.PATTERNS} for label in best_labels)


def oversplitting_toy_data(n_samples: int, mu: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Samples of the uniform mixture of ±µ + N(0, I) -> [n_samples, d]."""
    signs = torch.randint(2, (n_samples, 1), generator=generator) * 2 - 1  # [N, 1]
    return signs * mu + torch.randn(n_samples, len(mu), generator=generator)


def scaled_family_loss_terms(x: torch.Tensor, encoder_rows: torch.Tensor, W_dec: torch.Tensor,
                             scales: Sequence[float], gammas: Sequence[float]):
    """The toy's SAEs f = ReLU(scale·encoder_rows x - γ), x̂ = f W_dec, each [n_scales, n_gammas]: mean
    ‖x̂ - x‖², mean ‖f‖₁ (the loss at λ: first + λ·second), share of inputs they fire on."""
    projections = x @ encoder_rows.T  # [N, n_latents]
    gammas = torch.as_tensor(gammas, dtype=x.dtype)[:, None, None]  # [n_gammas, 1, 1]
    reconstruction, l1, firing = [], [], []
    for scale in scales:
        f = torch.relu(scale * projections - gammas)  # [n_gammas, N, n_latents]
        reconstruction.append((f @ W_dec - x).pow(2).sum(-1).mean(-1))  # [n_gammas]
        l1.append(f.sum(-1).mean(-1))  # [n_gammas]
        firing.append((f > 0).any(-1).to(x.dtype).mean(-1))  # [n_gammas]
    return torch.stack(reconstruction), torch.stack(l1), torch.stack(firing)


def oversplitting_toy(lambdas, random_betas, random_gammas, n_samples: int = 4096, d: int = 100,
                      mu_norm: float = 2.0, n_latents: int = 1000, ideal_ks=np.geomspace(1 / 16, 2.0, 31),
                      ideal_gammas=np.linspace(0.0, 10.0, 41), seed: int = 0) -> dict:
    """README §9's toy on ±µ + N(0, I_d), ‖µ‖ = mu_norm: per λ, the best loss of the ideal SAE
    (latents reading ±kµ, writing ±µ/‖µ‖; over k, γ) and of a random one (a latent per data sample
    s, reading βs, writing s/‖s‖; over β, γ) -> numpy arrays lambdas, {ideal,random}_best_loss [n_λ],
    _best_params [n_λ, 2] ((k or β), γ), _firing [n_λ] (of the best SAE); zero_sae_loss = E‖x‖²."""
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=generator, dtype=torch.float64)
    mu = mu_norm * mu / mu.norm()
    x = oversplitting_toy_data(n_samples, mu, generator)  # [N, d]
    samples = oversplitting_toy_data(n_latents, mu, generator)  # [n_latents, d]
    signed = torch.stack([mu, -mu])  # [2, d]
    families = {"ideal": (signed, signed / mu.norm(), ideal_ks, ideal_gammas),
                "random": (samples, samples / samples.norm(dim=1, keepdim=True), random_betas, random_gammas)}
    lambdas = torch.as_tensor(lambdas, dtype=torch.float64)
    toy = {"lambdas": lambdas.numpy(), "zero_sae_loss": float(x.pow(2).sum(-1).mean())}
    for family, (encoder_rows, W_dec, scales, gammas) in families.items():
        reconstruction, l1, firing = scaled_family_loss_terms(x, encoder_rows, W_dec, scales, gammas)
        losses = reconstruction.flatten()[None] + lambdas[:, None] * l1.flatten()[None]  # [n_λ, grid]
        best_loss, best = losses.min(dim=1)
        grid = torch.cartesian_prod(torch.as_tensor(scales, dtype=torch.float64),
                                    torch.as_tensor(gammas, dtype=torch.float64))  # [grid, 2]
        toy[f"{family}_best_loss"], toy[f"{family}_best_params"] = best_loss.numpy(), grid[best].numpy()
        toy[f"{family}_firing"] = firing.flatten()[best].numpy()
    return toy


# The paper's own grid (section 5.2): γ = 2.35 for the random SAE, β over (0, 0.1], 100 λ in [0, 20].
OVERSPLITTING_GRIDS = {"paper": {"lambdas": np.linspace(0, 20, 100), "random_gammas": (2.35,),
                                 "random_betas": np.linspace(0.001, 0.1, 100)}}


def oversplitting_verdict(toy: dict, min_firing: float = 0.02, tolerance: float = 1e-9) -> dict:
    """Who wins where it means something: a λ counts if the ideal SAE's best setting fires on >= min_firing
    of the inputs (at large λ both stop firing, tied at E‖x‖²); a relative gap <= `tolerance` ties."""
    ideal, random = np.asarray(toy["ideal_best_loss"]), np.asarray(toy["random_best_loss"])
    counted = np.asarray(toy["ideal_firing"]) >= min_firing
    tie = np.abs(random - ideal) <= tolerance * np.maximum(1.0, np.abs(ideal))
    random_wins, ideal_wins = counted & ~tie & (random < ideal), counted & ~tie & (random > ideal)
    n_counted = int(counted.sum())
    return {"counted": n_counted, "random_wins": int(random_wins.sum()), "ideal_wins": int(ideal_wins.sum()),
            "ties": int((counted & tie).sum()), "not_counted": int((~counted).sum()),
            "share_random_wins": float(random_wins.sum() / n_counted) if n_counted else float("nan")}


# --- Interventions (README §3): patches computed first, then applied in one pass (`ioi.patched_run`) ---
# The unpatched passes a Task keeps to resume patched ones from: at the paper's settings (GPT-2 Small, 5,000
# prompts) 0.3 GB of residual stream + 0.46 GB of keys and values a block: 5.8 GB from layer 0, 1.7 from 9.
CACHE_BYTES = 4 * 2**30


def _cache_bytes(cache: dict) -> int:
    tensors = [t for streams in cache.values() for resid, kv in streams for t in (resid, *sum(kv, ()))]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Task:
    """IOI on the evaluation prompts: the model every test runs, patched or not (README §2)."""
    model: torch.nn.Module
    prompts: Sequence
    batch_size: int = 256
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # {layer: ioi.residual_streams}

    def patched(self, patches: Optional[dict] = None, ld_only: bool = False) -> ioi.PatchedRun:
        """The pass with `patches` set (`ld_only`: the LDs alone, no top token), resumed at the first patched
        layer from the unpatched pass, cached per layer within CACHE_BYTES: the same numbers, faster."""
        if not patches:
            return ioi.patched_run(self.model, self.prompts, patches, self.batch_size, ld_only=ld_only)
        layer = min(node.layer for node in patches)
        below = [cached for cached in self.cache if cached < layer]
        if layer not in self.cache and (not below or _cache_bytes(self.cache) <= CACHE_BYTES / 2):
            streams = ioi.residual_streams(self.model, self.prompts, layer, self.batch_size)
            if _cache_bytes({**self.cache, layer: streams}) > CACHE_BYTES:
                self.cache.clear()  # over the budget: keep the newest only
            self.cache[layer] = streams
        start = max(cached for cached in self.cache if cached <= layer)  # or the highest below: slower
        return ioi.patched_run(self.model, self.prompts, patches, self.batch_size,
                               resume=(start, self.cache[start]), ld_only=ld_only)


def approximation(task: Task, clean: dict, reconstruction: dict, clean_run: ioi.PatchedRun,
                  mean_ablated_run: ioi.PatchedRun) -> dict:
    """README §5 at a cross-section: sufficiency patches â at every node; necessity patches ā + (a - â),
    mean-ablating what the dictionary explains and keeping its error term."""
    patched = task.patched(reconstruction, ld_only=True)
    residual = {node: clean[node].mean(0) + clean[node] - reconstruction[node] for node in clean}
    explained_removed = task.patched(residual, ld_only=True)
    return {"sufficiency": sufficiency(patched.logit_diff, clean_run.logit_diff),
            "necessity": necessity(mean_ablated_run.logit_diff, explained_removed.logit_diff,
                                   clean_run.logit_diff)}


# --- Grading a run (README §5-§9): plain functions that return every test as `Record`s ---
# A dictionary at a node, supervised (`SupervisedAtNode`) or SAE (`SAEAtNode`), has reconstruct(acts [N, d],
# values {attribute: ids [N]}) -> â [N, d] and edit(acts, AttributeChange, SAEEdit or None) -> Edit.
MIN_NODE_EFFECT = 0.005  # LD recovered at a node only if mean-ablating it alone moves the mean LD by >= 0.5%
MIN_SECTION_EFFECT = 0.05  # as ioi.discover: a site is graded if mean-ablating it moves the mean LD by >= 5%


@dataclass(frozen=True)
class Record:
    """One result, a row of metrics.json: a test's value at a site (cross-section, node, "model" or
    "toy") for a method, plus the fields that tell its variants apart; fields left None are not written."""
    test: str
    site: str
    method: str
    value: float
    attribute: Optional[str] = None   # the attribute edited or measured (io, s, pos)
    k: Optional[int] = None           # latents an SAE edit may change
    edit: Optional[str] = None        # how an SAE edit picks them: "greedy" or "f1"
    node: Optional[str] = None        # a node of the site, e.g. "z@L3H0@end"
    threshold: Optional[float] = None  # F1 threshold of a causal curve (README §7)
    low: Optional[float] = None       # a histogram bin [low, high)
    high: Optional[float] = None
    alpha: Optional[float] = None     # occlusion sweep: SAEs trained on a - α u_IO (README §9)
    norm: Optional[float] = None      # feature norm in the occlusion toy
    ratio: Optional[float] = None     # the occlusion toy's norm ratio ‖u_IO‖/‖u_S‖
    l1: Optional[float] = None        # λ of the over-splitting toy
    grid: Optional[str] = None        # which grid of the over-splitting toy
    firing: Optional[float] = None    # share of inputs on which the toy's ideal SAE fires
    setting: Optional[float] = None   # an SAE's hyper-parameter: λ, or k for top-k
    chosen: Optional[bool] = None     # whether this setting was chosen for the site and attribute
    phenomenon: Optional[str] = None  # "occlusion" or "oversplitting"
    reads: Optional[str] = None       # an SAE from elsewhere: the hook it reads,
    head: Optional[int] = None        # and the head
    graded_sae: Optional[str] = None  # an SAE from elsewhere: the name of every row of its grading

    def __post_init__(self):
        value = float(self.value)  # tensors, counts and flags alike
        if not math.isfinite(value):  # no test of the paper gives one, and a bare NaN is not JSON
            raise ValueError(f"{self.test} at {self.site} ({self.method}): the value {value} is not finite")
        object.__setattr__(self, "value", value)

    @classmethod
    def from_json(cls, row: dict) -> "Record":
        """A row of metrics.json read back: a missing, unknown or mistyped field is a TypeError naming it."""
        for name, f in cls.__dataclass_fields__.items():
            kind, *optional = getattr(f.type, "__args__", (f.type,))  # Optional[X]: (X, NoneType)
            kinds = (kind, int, *optional) if kind is float else (kind, *optional)  # an int passes as a float
            if name in row and not isinstance(row[name], kinds):
                raise TypeError(f"'{name}' is {row[name]!r}, not {kind.__name__}")
        return cls(**row)

    def to_json(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}


def mean_ablated(acts: torch.Tensor) -> torch.Tensor:
    """Every prompt's activation replaced by their mean ā -> [N, d]."""
    return acts.mean(0).expand_as(acts)


@dataclass(frozen=True)
class AttributeChange:
    """An edit of one attribute of the evaluation prompts p into their counterfactuals p′, at one node."""
    attribute: str
    values: dict  # {attribute: ids [N]} of p
    new_values: torch.Tensor  # [N] ids of `attribute` in p′
    counterfactual: torch.Tensor  # [N, d] the activations of p′ at this node


@dataclass(frozen=True)
class SAEEdit:
    """How an SAE edit picks the latents it changes (README §6): greedy picks k; F1-guided takes
    k/2 out and k/2 in, so both change at most k (k = 2: the paper's headline 1 out + 1 in)."""
    kind: str  # "greedy" or "f1"
    k: int


class Edit(NamedTuple):
    """One edit at one node (README §6)."""
    activations: torch.Tensor  # [N, d] patched in place of the clean activations
    weight_removed: torch.Tensor  # [N] the weight of the features (latents) it changes
    latents_changed: Optional[torch.Tensor] = None  # [N] how many latents it changes (SAEs only)


@dataclass(frozen=True, eq=False)
class SupervisedAtNode:
    """A supervised dictionary at a node (README §4): reconstructs from attribute values, edits a feature."""
    dictionary: dictionaries.SupervisedDictionary

    def reconstruct(self, acts: torch.Tensor, values: dict) -> torch.Tensor:
        return self.dictionary.reconstruct(values)

    def edit(self, acts: torch.Tensor, change: AttributeChange, how: None = None) -> Edit:
        old_values = change.values[change.attribute]  # [N]
        edited = self.dictionary.edit(acts, change.attribute, old_values, change.new_values)
        return Edit(edited, self.dictionary.feature_weights(change.values)[change.attribute])


@dataclass(frozen=True, eq=False)
class SAEAtNode:
    """An SAE at one node: it reconstructs from the activations and edits latents, interpreted (README §7)
    when first needed on the training activations, where every name occurs as IO and as S (README §6)."""
    sae: object
    train_acts: torch.Tensor  # [N_train, d] at this node
    train_values: dict  # {attribute: ids [N_train]}

    @functools.cached_property
    def interpretations(self) -> LatentInterpretations:
        return interpret_latents(self.sae.active(self.train_acts), self.train_values, ioi.NAMES)

    def reconstruct(self, acts: torch.Tensor, values: Optional[dict] = None) -> torch.Tensor:
        return self.sae(acts)[0]

    def edit(self, acts: torch.Tensor, change: AttributeChange, how: SAEEdit) -> Edit:
        if how.kind == "greedy":
            edited, changed = greedy_sae_edit(self.sae, acts, change.counterfactual, how.k)
        else:
            table = self.interpretations
            ranking = latents_by_f1(table.f1, table.labels, change.attribute)  # [n_values, d_sae]
            old, new = ranking[change.values[change.attribute]], ranking[change.new_values]  # [N, d_sae]
            edited, changed = f1_guided_edit(self.sae, acts, change.counterfactual, old, new, how.k // 2)
        weights = sae_latent_weights(self.sae.encode(acts), self.sae.raw_directions)  # [N, d_sae]
        return Edit(edited, (weights * changed).sum(-1), changed.sum(-1).float())


def saes_at_nodes(saes: dict, train_acts: dict, train_values: dict) -> dict:
    """{node: SAE} -> {node: SAEAtNode}, with the training activations at each node."""
    return {node: SAEAtNode(sae, train_acts[node], train_values) for node, sae in saes.items()}


@dataclass(frozen=True)
class SectionInputs:
    """What every test at one cross-section reads (README §3): the activations at its nodes for
    the evaluation prompts and for each attribute's counterfactuals, and the reference runs."""
    section: ioi.CrossSection
    clean: dict  # {node: [N, d]}
    values: dict  # {attribute: ids [N]} of the evaluation prompts
    counterfactual: dict  # {attribute: {node: [N, d]}}: the activations of p′
    new_values: dict  # {attribute: ids [N]} of each attribute in its counterfactual prompts p′
    clean_run: ioi.PatchedRun
    mean_ablated_run: ioi.PatchedRun  # every node of the section at its mean
    truth: dict  # {attribute: ioi.PatchedRun}: the counterfactual activations patched in (README §6)

    @property
    def site(self) -> str:
        return self.section.name

    def change(self, attribute: str, node) -> AttributeChange:
        return AttributeChange(attribute, self.values, self.new_values[attribute],
                               self.counterfactual[attribute][node])


def section_inputs(task: Task, section, acts: dict, values: dict, clean_run: ioi.PatchedRun) -> SectionInputs:
    """The inputs of one cross-section, from activations {split: {node: [N, d]}} and attribute ids
    {split: {attribute: [N]}} of the splits "eval" and "cf_<attribute>" (README §2)."""
    clean = {node: acts["eval"][node] for node in section.nodes}
    counterfactual = {attribute: {node: acts[f"cf_{attribute}"][node] for node in section.nodes}
                      for attribute in section.attributes}
    new_values = {attribute: values[f"cf_{attribute}"][attribute] for attribute in section.attributes}
    return SectionInputs(section, clean, values["eval"], counterfactual, new_values, clean_run,
                         task.patched({node: mean_ablated(a) for node, a in clean.items()}, ld_only=True),
                         {attribute: task.patched(cf) for attribute, cf in counterfactual.items()})


def moves_the_task(inputs: SectionInputs, min_effect: float = MIN_SECTION_EFFECT) -> bool:
    """Whether mean-ablating the section moves the mean LD by >= `min_effect` of it: sufficiency and
    necessity divide by that move, so a site that barely moves the LD cannot be graded."""
    clean = inputs.clean_run.logit_diff.mean()
    return bool(abs(inputs.mean_ablated_run.logit_diff.mean() - clean) >= min_effect * abs(clean))


def grade_model(prompts: Sequence, clean_run: ioi.PatchedRun) -> list:
    """The task itself (README §2): mean LD, accuracy, top-1 accuracy and the LD histogram."""
    diffs = clean_run.logit_diff
    io_token = torch.tensor([ioi.name_token(prompt.io) for prompt in prompts])
    records = [Record("logit_diff", "model", "clean", diffs.mean()),
               Record("accuracy", "model", "clean", (diffs > 0).float().mean()),
               Record("top1_accuracy", "model", "clean", (clean_run.top_token == io_token).float().mean())]
    counts, edges = np.histogram(diffs.numpy(), bins=30)
    return records + [Record("logit_diff_histogram", "model", "clean", count, low=float(low),
                             high=float(high)) for count, low, high in zip(counts, edges[:-1], edges[1:])]


def grade_dictionary(task: Task, inputs: SectionInputs, method: str, at_nodes: dict,
                     attributes: Sequence[str], hows: Sequence = (None,), setting=None) -> list:
    """Tests 1 and 2 (README §5-§6) of a dictionary {node: SupervisedAtNode or SAEAtNode} at a section: its
    reconstruction; each edit in `hows` of each of `attributes`, at every node together: edit accuracy
    against the ground truth, and the mean over nodes of the weight removed and (SAEs) latents changed."""
    reconstruction = {node: at_nodes[node].reconstruct(acts, inputs.values)
                      for node, acts in inputs.clean.items()}
    scores = approximation(task, inputs.clean, reconstruction, inputs.clean_run, inputs.mean_ablated_run)
    records = [Record(test, inputs.site, method, value, setting=setting) for test, value in scores.items()]
    for attribute, how in itertools.product(attributes, hows):
        edits = {node: at_nodes[node].edit(acts, inputs.change(attribute, node), how)
                 for node, acts in inputs.clean.items()}
        edited = task.patched({node: edit.activations for node, edit in edits.items()})
        variant = dict(attribute=attribute, setting=setting,
                       k=None if how is None else how.k, edit=None if how is None else how.kind)
        records.append(Record("edit_accuracy", inputs.site, method,
                              edit_accuracy(edited.top_token, inputs.truth[attribute].top_token), **variant))
        for test in ("weight_removed", "latents_changed"):  # Edit's fields, [N] per node (None: not an SAE)
            per_node = [getattr(edit, test) for edit in edits.values()]
            if all(values is not None for values in per_node):
                mean = sum(values.mean() for values in per_node) / len(per_node)
                records.append(Record(test, inputs.site, method, mean, **variant))
    return records


def interpretability_records(task: Task, inputs: SectionInputs, method: str, at_nodes: dict,
                             thresholds: Sequence[float], setting=None) -> list:
    """Test 3 (README §7) of an SAE at a section: its mean L0; per node, the share of each attribute's values
    some latent explains (F1 >= 0.8) and its Pos latents; per F1 threshold, only the latents of F1 >= it
    kept (the others' part subtracted: sufficiency) and the part they explain mean-ablated (necessity)."""
    l0s = [sae_core_metrics(at_nodes[node].sae, acts, acts)["l0"] for node, acts in inputs.clean.items()]
    records = [Record("l0_at_site", inputs.site, method, sum(l0s) / len(l0s), setting=setting)]
    for node in inputs.clean:
        table = at_nodes[node].interpretations
        shares = coverage(table.f1, table.labels, 0.8)
        records += [Record("f1_coverage", inputs.site, method, shares[attribute], attribute=attribute,
                           node=str(node), setting=setting) for attribute in inputs.section.attributes]
        records.append(Record("pos_latents", inputs.site, method, pos_latents(table.best_labels),
                              node=str(node), setting=setting))
    for threshold in thresholds:
        kept, removed = {}, {}
        for node, acts in inputs.clean.items():
            features, directions = at_nodes[node].sae.encode(acts), at_nodes[node].sae.raw_directions
            interpretable = at_nodes[node].interpretations.best_f1 >= threshold  # [d_sae]
            explained = (features * interpretable) @ directions  # [N, d]
            kept[node] = acts - (features * ~interpretable) @ directions
            removed[node] = acts - explained + explained.mean(0)
        kept_run, removed_run = task.patched(kept, ld_only=True), task.patched(removed, ld_only=True)
        records += [Record("causal_keep_sufficiency", inputs.site, method,
                           sufficiency(kept_run.logit_diff, inputs.clean_run.logit_diff),
                           threshold=threshold, setting=setting),
                    Record("causal_remove_necessity", inputs.site, method,
                           necessity(inputs.mean_ablated_run.logit_diff, removed_run.logit_diff,
                                     inputs.clean_run.logit_diff), threshold=threshold, setting=setting)]
    return records


def sae_edits(edit_ks: Sequence[int]) -> list:
    """Every SAE edit graded: greedy and F1-guided for each k, and the authors' F1-guided edit (2 out +
    2 in: k = 4) beside the headline's 1 + 1 (k = 2)."""
    edits = [SAEEdit(kind, k) for k in edit_ks for kind in ("greedy", "f1")]
    return edits if SAEEdit("f1", 4) in edits else edits + [SAEEdit("f1", 4)]


def grade_sae(task: Task, inputs: SectionInputs, method: str, at_nodes: dict, attributes: Sequence[str],
              edit_ks: Sequence[int], thresholds: Sequence[float], setting=None) -> list:
    """Tests 1-3 of one SAE {node: SAEAtNode} at a section, editing `attributes`."""
    return (grade_dictionary(task, inputs, method, at_nodes, attributes, sae_edits(edit_ks), setting)
            + interpretability_records(task, inputs, method, at_nodes, thresholds, setting))


def choose_settings(inputs: SectionInputs, method: str, settings: dict):
    """README §8: per attribute, the setting {setting: {node: SAEAtNode}} whose k = 2 greedy edits land
    closest (L2, mean over nodes and prompts) to a(p′) -> ({attribute: setting}, records)."""
    chosen, records = {}, []
    for attribute, counterfactual in inputs.counterfactual.items():
        distances = {}
        for setting, at_nodes in settings.items():
            gaps = [(greedy_sae_edit(at_nodes[node].sae, inputs.clean[node], a_cf, 2)[0] - a_cf).norm(dim=-1)
                    for node, a_cf in counterfactual.items()]  # [N] per node
            distances[setting] = float(sum(gap.mean() for gap in gaps) / len(gaps))
        chosen[attribute] = min(distances, key=distances.get)
        records += [Record("edit_distance_k2", inputs.site, method, distance, attribute=attribute,
                           setting=setting, chosen=setting == chosen[attribute])
                    for setting, distance in distances.items()]
    return chosen, records


def section_tests(task: Task, supervised: dict, task_saes: dict, corpus_saes: dict, edit_ks: Sequence[int],
                  thresholds: Sequence[float]) -> dict:
    """Tests 1-3 at a cross-section (README §5-§7) one method at a time, {method: grade(inputs) -> records}:
    no intervention and mean ablation ("none"); supervised dictionaries {method: {node: SupervisedAtNode}};
    task SAEs {method: {setting: {node: SAEAtNode}}}, each attribute edited at the setting chosen for it;
    full-distribution SAEs {method: {node: SAEAtNode}}."""
    def baseline(inputs):
        site, means = inputs.site, {node: mean_ablated(acts) for node, acts in inputs.clean.items()}
        scores = approximation(task, inputs.clean, means, inputs.clean_run, inputs.mean_ablated_run)
        return [Record("edit_accuracy_no_intervention", site, "none",
                       edit_accuracy(inputs.clean_run.top_token, inputs.truth[attribute].top_token),
                       attribute=attribute) for attribute in inputs.section.attributes] + [
            Record(test, site, "mean_ablation", value) for test, value in scores.items()]

    def dictionary(method, at_nodes, inputs):
        return grade_dictionary(task, inputs, method, at_nodes, inputs.section.attributes)

    def task_sae(method, settings, inputs):
        chosen, records = choose_settings(inputs, method, settings)
        for setting in dict.fromkeys(chosen.values()):
            edited = [attribute for attribute, best in chosen.items() if best == setting]
            records += grade_sae(task, inputs, method, settings[setting], edited, edit_ks, thresholds,
                                 setting)
        return records

    def corpus_sae(method, at_nodes, inputs):
        return grade_sae(task, inputs, method, at_nodes, inputs.section.attributes, edit_ks, thresholds)
    tests = {"none": baseline}
    for grade, by_method in ((dictionary, supervised), (task_sae, task_saes), (corpus_sae, corpus_saes)):
        tests |= {method: functools.partial(grade, method, value) for method, value in by_method.items()}
    return tests


def grade_section(task: Task, inputs: SectionInputs, supervised: dict, task_saes: dict, corpus_saes: dict,
                  edit_ks: Sequence[int], thresholds: Sequence[float]) -> list:
    """Tests 1-3 at one cross-section for every method: `section_tests`' records, in its order."""
    tests = section_tests(task, supervised, task_saes, corpus_saes, edit_ks, thresholds)
    return [record for grade in tests.values() for record in grade(inputs)]


def chosen_settings(records: Sequence[Record]) -> dict:
    """{(site, method): [setting chosen for some attribute there]}, from `choose_settings`' records."""
    chosen = {}
    for record in records:
        if record.test == "edit_distance_k2" and record.chosen:
            chosen.setdefault((record.site, record.method), []).append(record.setting)
    return chosen


# --- SAE core metrics (README §8): `dictionaries.core_metrics`, on raw activations ---
def sae_core_metrics(sae, x: torch.Tensor, train_x: torch.Tensor) -> dict:
    """L0, MSE, FVE of an SAE on raw activations x [N, d], and dead fraction (never active on train_x)."""
    x_hat, f = sae(x)
    return dictionaries.core_metrics(x, x_hat, (f != 0).sum(0), sae.active(train_x).sum(0))


def every_setting(task_saes: dict, corpus_saes: dict) -> dict:
    """Task SAEs {method: {setting: {node: SAE}}} and full-distribution SAEs {method: {node: SAE}} at None."""
    return {**task_saes, **{method: {None: at_nodes} for method, at_nodes in corpus_saes.items()}}


def core_records(saes: dict, eval_acts: dict, training: dict) -> list:
    """L0, MSE, variance explained and dead fraction (on the training activations) of every SAE {method:
    {setting: {node: SAEAtNode}}}, and how it ended training {(method, setting, node): its last log}."""
    records = []
    for method, settings in saes.items():
        for setting, at_nodes in settings.items():
            for node, at_node in at_nodes.items():
                ended = training.get((method, setting, node)) or {}
                scores = {**sae_core_metrics(at_node.sae, eval_acts[node], at_node.train_acts),
                          **{f"train_{key}": ended.get(key) for key in ("steps", "loss", "converged")}}
                records += [Record(test, str(node), method, value, setting=setting)
                            for test, value in scores.items() if value is not None]  # fve of a constant x
    return records


def ld_recovered_records(task: Task, clean_run: ioi.PatchedRun, eval_acts: dict, sections: Sequence,
                         saes: dict, chosen: dict, min_node_effect: float = MIN_NODE_EFFECT) -> list:
    """LD recovered (README §5) with one node patched at a time, at every node of `sections`, for every SAE
    {method: {setting: {node: SAEAtNode}}} at the settings `chosen` there (None: full-distribution SAEs).
    Skips a node whose mean ablation moves the mean LD by < `min_node_effect`: LD recovered divides by it."""
    clean_ld, ablated, records = clean_run.logit_diff.mean(), {}, []
    graded = dict.fromkeys((node, method, setting) for section in sections for method in saes
                           for setting in dict.fromkeys(chosen.get((section.name, method), [None]))
                           for node in section.nodes)
    for node, method, setting in graded:
        x = eval_acts[node]
        if node not in ablated:
            ablated[node] = task.patched({node: mean_ablated(x)}, ld_only=True)
        if abs(ablated[node].logit_diff.mean() - clean_ld) < min_node_effect * abs(clean_ld):
            continue
        patched = task.patched({node: saes[method][setting][node].reconstruct(x)}, ld_only=True)
        recovered = ld_recovered(patched.logit_diff, ablated[node].logit_diff, clean_run.logit_diff)
        records.append(Record("ld_recovered", str(node), method, recovered, setting=setting))
    return records


# --- the two phenomena (README §9) ---
def mean_code_norm(acts: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean norm of the mean codes u_v = mean(a - ā | value v) of the values that occur, over the spread
    of the activations (mean ‖a - ā‖)."""
    codes = dictionaries.SupervisedDictionary.fit(acts, {"a": ids}).features["a"]  # [n_values, d]
    spread = (acts - acts.mean(0)).norm(dim=-1).mean()
    return float(codes[torch.bincount(ids) > 0].norm(dim=-1).mean() / spread)


def presence(acts: torch.Tensor, ids: torch.Tensor, n_permutations: int = 20, seed: int = 0):
    """(mean_code_norm, noise floor: its 95th percentile with the labels shuffled). A finite sample's mean
    codes are never 0: an attribute is present only where they stand above that floor."""
    generator = torch.Generator().manual_seed(seed)
    shuffled = [mean_code_norm(acts, ids[torch.randperm(len(ids), generator=generator)])
                for _ in range(n_permutations)]
    return mean_code_norm(acts, ids), float(np.quantile(shuffled, 0.95))


def attribute_evidence(task: Task, clean_run: ioi.PatchedRun, nodes: Sequence, acts: dict, supervised: dict):
    """Per node and attribute (README §9): the supervised features' mean norm / spread, `presence` on the
    evaluation prompts, and the effect of this node alone counterfactual -> ({(node, a): row}, records)."""
    evidence, records, ld_clean = {}, [], clean_run.logit_diff.mean()
    values = ioi.attribute_ids(task.prompts)
    for node in nodes:
        x = acts["eval"][node]
        spread = (x - x.mean(0)).norm(dim=-1).mean()
        features = supervised[node].dictionary.features
        for attribute in ioi.ATTRIBUTES:
            patched = task.patched({node: acts[f"cf_{attribute}"][node]})
            eval_norm, noise_floor = presence(x, values[attribute])
            evidence[node, attribute] = row = {
                "norm": float(features[attribute].norm(dim=-1).mean() / spread) if spread > 0 else 0.0,  # 0/0
                "answers_changed": 1 - edit_accuracy(clean_run.top_token, patched.top_token),
                "ld_moved": float(abs(patched.logit_diff.mean() - ld_clean) / abs(ld_clean)),
                "eval_norm": eval_norm, "noise_floor": noise_floor}
            records += [Record(f"evidence_{key}", str(node), "supervised", value, attribute=attribute)
                        for key, value in row.items()]
    return evidence, records


PRESENT, CAUSAL = 0.1, 0.1  # present: above the noise floor and >= 10% of the spread; causal: >= 10%
OCCLUDED, SPLIT = 0.5, 10  # reproduced: see occlusion_reproduced; >= 10 Pos latents


def occlusion_reproduced(stronger_names: int, weaker_names: int) -> bool:
    """README §9: the SAE has latents for nearly every name of the stronger attribute (>= OCCLUDED of the
    names) and for few of the weaker (< OCCLUDED x as many)."""
    return OCCLUDED * len(ioi.NAMES) <= stronger_names and weaker_names < OCCLUDED * stronger_names


def phenomenon_gates(rows: dict, present: float = PRESENT, causal: float = CAUSAL) -> dict:
    """A phenomenon's gates at one node, rows {attribute: evidence row}: the stronger attribute (by norm)
    present, the weaker causal (over-splitting: Pos both) -> {(attribute, "present" / "causal"): passed}."""
    weaker = min(rows, key=lambda a: rows[a]["eval_norm"])
    stronger = max(rows, key=lambda a: rows[a]["eval_norm"])
    row, effect = rows[stronger], max(rows[weaker]["answers_changed"], rows[weaker]["ld_moved"])
    return {(stronger, "present"): row["eval_norm"] > row["noise_floor"] and row["eval_norm"] >= present,
            (weaker, "causal"): effect >= causal}


def phenomenon_node(evidence: dict, attributes: Sequence[str], **thresholds):
    """Where a phenomenon can be tested: of the nodes that pass every gate, the one whose weaker attribute
    is most causal, or None. evidence: {(node, attribute): row} (`attribute_evidence`)."""
    rows = {node: {a: evidence[node, a] for a in attributes} for node, _ in evidence}
    passing = [node for node in rows if all(phenomenon_gates(rows[node], **thresholds).values())]
    weaker = {node: min(rows[node].values(), key=lambda row: row["eval_norm"]) for node in passing}
    return max(passing, key=lambda node: max(weaker[node]["answers_changed"], weaker[node]["ld_moved"]),
               default=None)


class Phenomena(NamedTuple):
    records: list
    occlusion_node: object  # where occlusion is testable, or None
    toy_norms: Optional[dict]  # the IO and S feature norms measured there (None: not testable)


PHENOMENA = {"occlusion": NAME_ATTRIBUTES, "oversplitting": ("pos",)}


def grade_phenomena(task: Task, clean_run: ioi.PatchedRun, nodes: Sequence, acts: dict, supervised: dict,
                    task_saes: dict) -> Phenomena:
    """README §9: the gates at every node, and where a phenomenon is testable, what every task SAE {method:
    {setting: {node: SAEAtNode}}} did (IO and S names with a latent, or Pos latents): as in the paper?"""
    evidence, records = attribute_evidence(task, clean_run, nodes, acts, supervised)
    if ioi.is_gpt2_small(task.model.config):  # in GPT-2 Small only the paper's node is a candidate
        paper_node = ioi.Node("q", 10, 0, "end")
        evidence = {key: row for key, row in evidence.items() if key[0] == paper_node} or evidence
    found = {}
    for phenomenon, attributes in PHENOMENA.items():
        for node in dict.fromkeys(node for node, _ in evidence):
            gates = phenomenon_gates({a: evidence[node, a] for a in attributes})
            records += [Record(f"gate_{gate}", str(node), "supervised", passed, attribute=a,
                               phenomenon=phenomenon) for (a, gate), passed in gates.items()]
        found[phenomenon] = node = phenomenon_node(evidence, attributes)
        records.append(Record("phenomenon_testable", str(node), "supervised", node is not None,
                              phenomenon=phenomenon))
    occlusion_node, split_node = found["occlusion"], found["oversplitting"]
    if occlusion_node is not None:  # which name is the weaker (by norm)
        weaker, stronger = sorted(NAME_ATTRIBUTES, key=lambda a: evidence[occlusion_node, a]["eval_norm"])
    for method, settings in task_saes.items():
        for setting, at_nodes in settings.items():
            if occlusion_node is not None:  # IO and S names with a latent of F1 >= 0.5
                table = at_nodes[occlusion_node].interpretations
                names = {a: names_with_latent(table.f1, table.labels, a, 0.5) for a in NAME_ATTRIBUTES}
                records += [Record(f"occlusion_{a}_names", str(occlusion_node), method, n, setting=setting)
                            for a, n in names.items()]
                records.append(Record("occlusion_reproduced", str(occlusion_node), method,
                                      occlusion_reproduced(names[stronger], names[weaker]), setting=setting))
            if split_node is not None:
                count = pos_latents(at_nodes[split_node].interpretations.best_labels)
                records += [Record("pos_latents", str(split_node), method, count, node=str(split_node),
                                   setting=setting, phenomenon="oversplitting"),
                            Record("oversplitting_reproduced", str(split_node), method, count >= SPLIT,
                                   setting=setting)]
    if occlusion_node is None:
        return Phenomena(records, None, None)
    features = supervised[occlusion_node].dictionary.features  # the toy takes their mean norms' ratio
    norms = {attribute: float(features[attribute].norm(dim=-1).mean()) for attribute in NAME_ATTRIBUTES}
    records += [Record("supervised_feature_norm", str(occlusion_node), "supervised", norm,
                       attribute=attribute) for attribute, norm in norms.items()]
    return Phenomena(records, occlusion_node, norms)


def io_shrunk_activations(acts: torch.Tensor, io_features: torch.Tensor, io_ids: torch.Tensor,
                          alphas: Sequence[float]) -> torch.Tensor:
    """a - α u_IO for each α -> [n_alphas, N, d] (README §9): IO features shrink, S latents appear."""
    return torch.stack([acts - alpha * io_features[io_ids] for alpha in alphas])


def alpha_sweep_records(node, saes: Sequence, datasets: torch.Tensor, alphas: Sequence[float],
                        train_values: dict, k: int) -> list:
    """The IO and S names with a latent (F1 >= 0.5) of top-k SAEs trained on each of `datasets`."""
    records = []
    for alpha, sae, data in zip(alphas, saes, datasets):
        table = interpret_latents(sae.active(data), train_values, ioi.NAMES)
        records += [Record(f"alpha_sweep_{attribute}_names", str(node), "topk",
                           names_with_latent(table.f1, table.labels, attribute, 0.5), alpha=alpha, setting=k)
                    for attribute in NAME_ATTRIBUTES]
    return records


def occlusion_toy_records(norms: Optional[dict], seed: int = 0) -> list:
    """The occlusion toy (`occlusion_toy_experiment`) at every ratio of OCCLUSION_TOY_RATIOS and at the
    ratio ‖u_IO‖/‖u_S‖ measured at the occlusion node, to 2 decimals (norms; None: not testable)."""
    ratios = sorted({*OCCLUSION_TOY_RATIOS, *([round(norms["io"] / norms["s"], 2)] if norms else [])})
    return [Record("occlusion_toy_recovered", "toy", "vanilla", result[attribute], attribute=attribute,
                   ratio=result["ratio"], norm=1.0 if attribute == "io" else 1 / result["ratio"],
                   setting=result["l1"])
            for result in occlusion_toy_experiment(ratios, seed=seed) for attribute in NAME_ATTRIBUTES]


def oversplitting_toy_records(grids: dict = OVERSPLITTING_GRIDS, seed: int = 0) -> list:
    """The over-splitting toy on each grid {name: oversplitting_toy's settings}: losses per λ, and
    who wins over the λ where the ideal SAE still fires (`oversplitting_verdict`)."""
    records = []
    for grid, settings in grids.items():
        toy = oversplitting_toy(seed=seed, **settings)
        for lam, ideal, random, firing in zip(toy["lambdas"], toy["ideal_best_loss"], toy["random_best_loss"],
                                              toy["ideal_firing"]):
            records += [Record("oversplit_toy_loss", "toy", "ideal_2_latent", ideal, l1=float(lam),
                               grid=grid, firing=float(firing)),
                        Record("oversplit_toy_loss", "toy", "random_1000_latent", random, l1=float(lam),
                               grid=grid)]
        records += [Record(f"oversplit_toy_{count}", "toy", "random_1000_latent", value, grid=grid)
                    for count, value in oversplitting_verdict(toy).items()]
    return records


# --- ground truth, beyond the paper: what the SAEs' decoders and the activations look like ---
def decoder_recovery(decoder: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over the feature directions [n, d] (zero rows, unseen values, left out) of the best cosine
    between the direction and any decoder row [L, d]: 1 when every feature is a decoder row."""
    directions = directions[directions.norm(dim=-1) > 0]
    return float((F.normalize(directions, dim=-1) @ F.normalize(decoder, dim=-1).T).max(dim=1).values.mean())


def ground_truth_records(saes: dict, supervised: dict, truth: dict) -> list:
    """How well every SAE {method: {setting: {node: SAEAtNode}}} recovers, per attribute, the supervised
    mean codes (as the authors do) and the true directions (truth: {node: {attribute: [n, d]} or None})."""
    references = {"supervised_cosine": {node: s.dictionary.features for node, s in supervised.items()},
                  "ground_truth_cosine": truth}
    return [Record(test, str(node), method, decoder_recovery(at_nodes[node].sae.W_dec, directions),
                   attribute=attribute, setting=setting)
            for test, features in references.items()
            for node, by_attribute in features.items() if by_attribute
            for method, settings in saes.items() for setting, at_nodes in settings.items() if node in at_nodes
            for attribute, directions in by_attribute.items()]


def effective_rank(acts: torch.Tensor) -> float:
    """exp of the entropy of the covariance's normalised eigenvalues: directions activations [N, d] use."""
    eigenvalues = torch.linalg.eigvalsh(torch.cov(acts.double().T)).clamp(min=0)
    p = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def geometry_records(nodes: Sequence, acts: dict, values: dict) -> list:
    """Per node: the FVE on "eval" of a least-squares supervised dictionary fit on "train", the effective
    rank, and the IO-S overlap (mean |cos| of a name's IO and S mean codes). acts {split: {node: [N, d]}}."""
    sizes = {"io": len(ioi.NAMES), "s": len(ioi.NAMES), "pos": len(ioi.PATTERNS)}
    records = []
    for node in nodes:
        train, test = acts["train"][node], acts["eval"][node]
        fit = dictionaries.SupervisedDictionary.fit(train, values["train"], sizes, method="lstsq")
        fve = 1 - (test - fit.reconstruct(values["eval"])).pow(2).sum() / (test - test.mean(0)).pow(2).sum()
        codes = dictionaries.SupervisedDictionary.fit(train, values["train"], sizes).features
        both = (codes["io"].norm(dim=-1) > 0) & (codes["s"].norm(dim=-1) > 0)
        overlap = F.cosine_similarity(codes["io"][both], codes["s"][both], dim=-1).abs().mean()
        records += [Record(f"geometry_{test_name}", str(node), "supervised", value)
                    for test_name, value in (("lstsq_fve", fve), ("effective_rank", effective_rank(test)),
                                             ("io_s_overlap", overlap))]
    return records
