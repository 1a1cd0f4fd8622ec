"""Feature dictionaries (Makelov, Lange & Nanda, arXiv 2405.08366): supervised ones, the yardstick
(README §4), and sparse autoencoders, the graded (README §8). Read `SupervisedDictionary`, then `SAE`
and its encoders and losses, then `train_sae_stack`: same-shaped SAEs train as one tensor program yet
never interact (the summed loss gives each its own gradient, Adam is elementwise, each SAE has its
own seed), so an SAE trained in a stack equals the same SAE trained alone (`train_sae`: a stack of one).
"""
import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save


def _check_activations(x, what: str, shape: str = "[N, d]") -> torch.Tensor:
    """x if a finite float tensor of `shape` ([N, d] or [n_datasets, N, d]); else a one-line ValueError."""
    if not isinstance(x, torch.Tensor) or x.dim() != shape.count(",") + 1:
        raise ValueError(f"{what}: expected a tensor of shape {shape}, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected floats, got dtype {x.dtype}")
    if 0 in x.shape:  # nothing to fit (no rows) or to reconstruct (no columns)
        raise ValueError(f"{what}: expected at least one row and one column, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or inf")
    return x


def save_tensors(tensors: dict, path: Path):
    with open(path, "wb") as f:  # open() gives the umask's mode; safetensors' save_file makes files 0600
        f.write(save({name: t.detach().contiguous() for name, t in tensors.items()}))


def load_activations(path) -> torch.Tensor:
    """The `acts` tensor [N, d] of a safetensors file, checked (one-line ValueError otherwise)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: {'a folder, not a file' if Path(path).is_dir() else 'no such file'}")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a corrupt file
        raise ValueError(f"{path}: not a safetensors file ({error})") from None
    if "acts" not in tensors:
        raise ValueError(f"{path}: no tensor named 'acts' (found: {', '.join(sorted(tensors)) or 'none'})")
    acts = _check_activations(tensors["acts"], f"{path}: acts").float()
    return _check_activations(acts, f"{path}: acts, as float32")  # float64 values beyond float32's range


# ----------------------------------------------------------------------------- supervised dictionaries

def attribute_sizes(attributes: dict, n: int, n_values: Optional[dict] = None) -> dict:
    """Number of values of each attribute (n_values, else the largest id + 1), checking the id tensors."""
    sizes = {}
    for name, ids in attributes.items():
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.shape != (n,):
            raise ValueError(f"attribute {name!r}: expected a LongTensor of shape [{n}]")
        size = (n_values or {}).get(name, int(ids.max()) + 1)
        if ids.min() < 0 or ids.max() >= size:
            raise ValueError(f"attribute {name!r}: ids must lie in [0, {size}), "
                             f"got [{ids.min()}, {ids.max()}]")
        sizes[name] = size
    return sizes


def _mean_codes(acts, attributes, sizes):
    """ā = mean(a); u_{i,v} = mean(a - ā | attribute i = v); unseen values get 0."""
    bias = acts.mean(0)
    centred = acts - bias  # [N, d]
    features = {}
    for name, ids in attributes.items():
        sums = centred.new_zeros(sizes[name], acts.shape[1]).index_add_(0, ids, centred)
        counts = torch.bincount(ids, minlength=sizes[name]).clamp_min(1)
        features[name] = sums / counts[:, None]  # [n_values, d]
    return bias, features


def _lstsq_codes(acts, attributes, sizes):
    """"MSE" codes: the minimum-norm U = pinv(CᵀC) CᵀA of min ‖A - C U‖², C = [1 | each one-hot]
    (rank deficient), then each attribute's frequency-weighted mean moved into the bias, as in mean codes."""
    design = torch.cat([acts.new_ones(len(acts), 1)]
                       + [F.one_hot(ids, sizes[name]).to(acts) for name, ids in attributes.items()], 1)
    solution = torch.linalg.pinv(design.T @ design, hermitian=True) @ (design.T @ acts)  # [1 + Σ n_v, d]
    bias, *blocks = solution.split([1] + list(sizes.values()))
    bias, features = bias[0], {}
    for (name, ids), block in zip(attributes.items(), blocks):
        frequency = torch.bincount(ids, minlength=sizes[name]).to(acts) / len(ids)  # [n_values]
        shift = frequency @ block
        bias = bias + shift
        features[name] = (block - shift) * (frequency > 0)[:, None]  # unseen values stay 0
    return bias, features


@dataclass
class SupervisedDictionary:
    """a(p) ≈ ā + Σ_i u_{i, value_i(p)}: one feature per attribute value (README §4)."""
    bias: torch.Tensor  # [d]  ā
    features: dict  # attribute name -> [n_values, d]  u_{i,v}
    method: str = "mean"

    @classmethod
    def fit(cls, acts, attributes: dict, n_values: Optional[dict] = None, method: str = "mean"):
        """Mean codes (method="mean") or least-squares codes (method="lstsq"), computed in float64."""
        _check_activations(acts, "acts")
        sizes = attribute_sizes(attributes, len(acts), n_values)
        fitters = {"mean": _mean_codes, "lstsq": _lstsq_codes}
        if method not in fitters:
            raise ValueError(f"unknown method {method!r}; use 'mean' or 'lstsq'")
        bias, features = fitters[method](acts.double(), attributes, sizes)
        return cls(bias.to(acts.dtype), {k: v.to(acts.dtype) for k, v in features.items()}, method)

    def _codes(self, attributes) -> dict:
        if set(attributes) != set(self.features):
            raise ValueError(f"expected attributes {sorted(self.features)}, got {sorted(attributes)}")
        return {name: self.features[name][ids] for name, ids in attributes.items()}  # name -> [N, d]

    def reconstruct(self, attributes: dict) -> torch.Tensor:
        """â = ā + Σ_i u_{i, value_i}  -> [N, d]."""
        return self.bias + sum(self._codes(attributes).values())

    def edit(self, acts, name: str, old_values, new_values) -> torch.Tensor:
        """Supervised edit of one attribute: a - u_{i,v} + u_{i,v'}  -> [N, d]."""
        return acts - self.features[name][old_values] + self.features[name][new_values]

    def feature_weights(self, attributes: dict) -> dict:
        """w_i = u_i·r / ‖r‖² with r = â - ā; the weights of one prompt sum to 1 (README §4)."""
        codes = self._codes(attributes)
        r = sum(codes.values())  # [N, d]
        norm2 = r.pow(2).sum(-1).clamp_min(torch.finfo(r.dtype).tiny)
        return {name: (u * r).sum(-1) / norm2 for name, u in codes.items()}

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"bias": self.bias, **{f"features.{k}": v for k, v in self.features.items()}}
        save_tensors(tensors, directory / "dictionary.safetensors")
        (directory / "dictionary.json").write_text(json.dumps(
            {"method": self.method, "n_values": {k: len(v) for k, v in self.features.items()}}, indent=1))

    @classmethod
    def load(cls, directory):
        directory = Path(directory)
        config = json.loads((directory / "dictionary.json").read_text())
        tensors = load_file(str(directory / "dictionary.safetensors"))
        features = {name: tensors[f"features.{name}"] for name in config["n_values"]}
        return cls(tensors["bias"], features, config["method"])


# ----------------------------------------------------------------------------- SAEs (README §8)

PARAMETERS = {"vanilla": ("W_enc", "b_enc", "W_dec", "b_dec"),  # each architecture's, as SAELens names them
              "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
              "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
              "jumprelu": ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")}
MATRICES = ("W_enc", "W_dec")  # every other parameter is a vector


@dataclass
class SAE:
    """An SAE in the normalised space x = x_raw * input_scale (README §8); `encode`, `sae(x)`, `active`
    take raw x. A stack (`stack_saes`): axis S first, then a batch axis 1 on vectors and numbers."""
    arch: str  # "vanilla" | "gated" | "topk" | "jumprelu" (JumpReLU only as read from SAELens)
    W_enc: torch.Tensor  # [..., d_in, d_sae]
    W_dec: torch.Tensor  # [..., d_sae, d_in]  unit rows when trained here
    b_dec: torch.Tensor  # [..., d_in]
    b_enc: Optional[torch.Tensor] = None  # [..., d_sae]  vanilla, top-k, JumpReLU
    b_gate: Optional[torch.Tensor] = None  # [..., d_sae]  gated: the gate path's bias
    r_mag: Optional[torch.Tensor] = None  # [..., d_sae]  gated: log-scale of W_enc's columns ...
    b_mag: Optional[torch.Tensor] = None  # [..., d_sae]  ... and the bias of the magnitude path
    threshold: Optional[torch.Tensor] = None  # [..., d_sae]  JumpReLU
    k: Optional[int] = None  # top-k: latents kept per input  (stack: [S, 1, 1])
    l1_coefficient: float = 0.0  # λ of the vanilla and gated losses  (stack: [S, 1])
    input_scale: float = 1.0  # (stack: [S, 1, 1])
    frozen_decoder: bool = False  # the paper's floor: a random decoder, never trained  (stack: [S, 1, 1])
    meta: dict = field(default_factory=dict)  # provenance (spec, training config), saved in cfg.json

    def __post_init__(self):
        if self.arch not in PARAMETERS:
            raise ValueError(f"unknown SAE architecture {self.arch!r}; use one of {sorted(PARAMETERS)}")
        missing = [name for name in PARAMETERS[self.arch] if getattr(self, name) is None]
        if missing or (self.arch == "topk" and self.k is None):
            raise ValueError(f"a {self.arch} SAE needs {', '.join(missing or ['k'])}")

    params = property(lambda self: {name: getattr(self, name) for name in PARAMETERS[self.arch]})
    d_in = property(lambda self: self.W_dec.shape[-1])
    d_sae = property(lambda self: self.W_dec.shape[-2])
    raw_directions = property(lambda self: self.W_dec.detach() / self.input_scale)  # row j: what f_j = 1 adds

    # --- the paper's formulas, on normalised inputs x [..., d_in] -------------------------
    def latents(self, x):
        """f [..., d_sae]."""
        return ENCODERS[self.arch](self, x)

    def reconstruct(self, f):
        """x̂ = f W_dec + b_dec  [..., d_in]."""
        return f @ self.W_dec + self.b_dec

    def loss(self, x):
        """The training loss of each input [...] (README §8)."""
        return LOSSES[self.arch](self, x)

    # --- raw activations ------------------------------------------------------------------
    def encode(self, x):
        """Latents f [..., d_sae] of raw activations x [..., d_in]."""
        return self.latents(x * self.input_scale)

    def __call__(self, x):
        """(raw reconstruction x̂ / input_scale, latents) of raw activations x."""
        f = self.encode(x)
        return self.reconstruct(f) / self.input_scale, f

    def active(self, x):
        """Latents with f ≠ 0 on raw x, as SAELens and SAEBench count L0 (an open gate may add 0)."""
        return self.encode(x) != 0

    def to(self, device) -> "SAE":
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: t.to(device) for name, t in tensors.items() if torch.is_tensor(t)})

    def unstack(self) -> list:
        """The S SAEs of a stack, one by one: detached copies."""
        return [SAE(self.arch, **{name: (t[s] if name in MATRICES else t[s, 0]).detach().clone()
                                  for name, t in self.params.items()},
                    k=None if self.k is None else int(self.k[s]),
                    l1_coefficient=float(self.l1_coefficient[s]), input_scale=float(self.input_scale[s]),
                    frozen_decoder=bool(self.frozen_decoder[s]))
                for s in range(len(self.W_enc))]


def stack_saes(saes: list) -> SAE:
    """S SAEs of one architecture and shape as one SAE with a leading stack axis (see SAE)."""
    def stacked(name):
        t = torch.stack([getattr(sae, name) for sae in saes])
        return t if name in MATRICES else t[:, None]  # vectors [S, 1, d]: they broadcast over the batch

    def per_sae(name, *shape):
        return torch.tensor([getattr(sae, name) for sae in saes]).view(-1, *shape)
    arch = saes[0].arch
    return SAE(arch, **{name: stacked(name) for name in PARAMETERS[arch]},
               k=per_sae("k", 1, 1) if arch == "topk" else None, l1_coefficient=per_sae("l1_coefficient", 1),
               input_scale=per_sae("input_scale", 1, 1), frozen_decoder=per_sae("frozen_decoder", 1, 1))


def centred_projection(sae, x):
    """(x − b_dec) W_enc  [..., d_sae], computed as x W_enc − b_dec W_enc: b_dec's gradient is then
    one row times W_encᵀ, not a [B, d_sae] one (a training step ~25% faster)."""
    return x @ sae.W_enc - sae.b_dec @ sae.W_enc


def encode_vanilla(sae, x):
    """ReLU SAE (Bricken et al. 2023): f = ReLU((x − b_dec) W_enc + b_enc)."""
    return torch.relu(centred_projection(sae, x) + sae.b_enc)


def gated_paths(sae, x):
    """Gated SAE (arXiv 2404.16014) -> (π_gate = (x − b_dec) W_enc + b_gate: fires if > 0, magnitude =
    ReLU((x − b_dec)(W_enc ⊙ exp r_mag) + b_mag): how strongly; the original code forgot this ReLU)."""
    projection = centred_projection(sae, x)  # [..., d_sae]
    # exp r_mag rescales W_enc's columns, so (x − b_dec)(W_enc ⊙ exp r_mag) is this projection rescaled
    return projection + sae.b_gate, torch.relu(projection * sae.r_mag.exp() + sae.b_mag)


def encode_gated(sae, x):
    """f = 1[π_gate > 0] ⊙ magnitude."""
    pi_gate, magnitude = gated_paths(sae, x)
    return (pi_gate > 0) * magnitude


def encode_topk(sae, x):
    """Top-k SAE (Gao et al. 2024, arXiv 2406.04093): f = ReLU(TopK((x − b_dec) W_enc + b_enc)), the
    k largest pre-activations ReLU'd (the original code did not), the others 0."""
    pre = centred_projection(sae, x) + sae.b_enc  # [..., d_sae]
    top = pre.topk(int(torch.as_tensor(sae.k).max()), dim=-1)  # sorted: each SAE's top k come first
    kept = torch.arange(top.values.shape[-1], device=pre.device) < sae.k  # [k_max] or [S, 1, k_max]
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values) * kept)


def encode_jumprelu(sae, x):
    """JumpReLU SAE (arXiv 2407.14435) as SAELens computes it, read for grading, not trained here:
    f = ReLU(pre) ⊙ 1[pre > θ], pre = (x − b_dec) W_enc + b_enc."""
    pre = centred_projection(sae, x) + sae.b_enc  # [..., d_sae]
    return torch.relu(pre) * (pre > sae.threshold)


def loss_vanilla(sae, x):
    """‖x − x̂‖² + λ‖f‖₁ (the decoder rows have unit norm, so no norm weighting)."""
    f = encode_vanilla(sae, x)  # f ≥ 0: Σf = ‖f‖₁
    return (x - sae.reconstruct(f)).pow(2).sum(-1) + sae.l1_coefficient * f.sum(-1)


def loss_gated(sae, x):
    """‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²; x̂_frozen's
    decoder gets no gradient, so the last term trains the gate path to reconstruct alone."""
    pi_gate, magnitude = gated_paths(sae, x)
    gate = torch.relu(pi_gate)  # [..., d_sae]
    x_hat = sae.reconstruct((pi_gate > 0) * magnitude)
    x_hat_frozen = gate @ sae.W_dec.detach() + sae.b_dec.detach()
    return (x - x_hat).pow(2).sum(-1) + sae.l1_coefficient * gate.sum(-1) + (x - x_hat_frozen).pow(2).sum(-1)


def loss_topk(sae, x):
    """‖x − x̂‖²: the top-k makes f sparse by construction."""
    return (x - sae.reconstruct(encode_topk(sae, x))).pow(2).sum(-1)


ENCODERS = {"vanilla": encode_vanilla, "gated": encode_gated, "topk": encode_topk,
            "jumprelu": encode_jumprelu}
LOSSES = {"vanilla": loss_vanilla, "gated": loss_gated, "topk": loss_topk}


def core_metrics(x, x_hat, fires, dead_fires=None) -> dict:
    """L0, MSE, FVE = 1 - Σ‖x - x̂‖² / Σ‖x - mean(x)‖² (None for a constant x), dead fraction
    (README §8) of x, x̂ [N, d]; fires [d_sae]: active counts; dead_fires: those on the training data."""
    squared_error, variance = (x - x_hat).pow(2), (x - x.mean(0)).pow(2).sum()  # [N, d], []
    ever_active = (fires if dead_fires is None else dead_fires) > 0  # [d_sae]
    return {"l0": float(fires.sum() / len(x)), "mse": float(squared_error.mean()),
            "fve": float(1 - squared_error.sum() / variance) if variance > 0 else None,
            "dead_fraction": float(1 - ever_active.float().mean())}


# ----------------------------------------------------------------------------- the SAELens layout

SAELENS_ARCH = {"vanilla": "standard", "gated": "gated", "topk": "topk", "jumprelu": "jumprelu"}
# Our SAEs read gpt2.py's plain GPT-2: TransformerLens's model with none of its weight processing.
PLAIN_MODEL = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
               "fold_value_biases": False}


def fold_input_scale(params: dict, scale: float) -> dict:
    """The same SAE on raw x instead of x * s, as SAELens's trainer folds it: (x s - b_dec) W_enc =
    (x - b_dec / s)(s W_enc) and the output is divided by s; latents and encoder biases are unchanged."""
    return {**params, "W_enc": params["W_enc"] * scale, "W_dec": params["W_dec"] / scale,
            "b_dec": params["b_dec"] / scale}


def fold_decoder_norm(params: dict) -> dict:
    """SAELens's `rescale_acts_by_decoder_norm` (top-k: pre-activations times n_j = ‖W_dec[j]‖, latents
    divided by it before decoding) as a plain top-k: W_enc[:, j], b_enc[j] times n_j, W_dec[j] / n_j."""
    norms = params["W_dec"].norm(dim=-1).clamp_min(1e-8)  # [d_sae]; SAELens's floor for empty rows
    return {**params, "W_enc": params["W_enc"] * norms, "b_enc": params["b_enc"] * norms,
            "W_dec": params["W_dec"] / norms[:, None]}


def fold_input_shift(params: dict, shift: torch.Tensor) -> dict:
    """The SAE that reads x where this one reads x - shift (b_dec is subtracted, then added back)."""
    return {**params, "b_dec": params["b_dec"] + shift}


def fold_input_centring(params: dict) -> dict:
    """The SAE that reads x where this one reads Px = x - mean(x) (over d_in): (Px - b_dec) W =
    (x - b_dec)(PW) - mean(b_dec) 1ᵀW for every encoder path W. The input's mean is left to the error."""
    W = params["W_enc"]
    return _shift_encoder_biases({**params, "W_enc": W - W.mean(0, keepdim=True)},
                                 -params["b_dec"].mean() * W.sum(0))


def as_plain_model_sae(sae, model, act: str, layer: int, head: Optional[int]):
    """(the SAE on gpt2.py's plain activations, what was folded in). SAELens SAEs read TransformerLens's
    processed model (model_from_pretrained_kwargs): hook_v/z without b_V, the residual stream centred."""
    settings, params, folded = sae.meta.get("model_from_pretrained_kwargs") or {}, sae.params, []
    if act in ("v", "z") and settings.get("fold_value_biases", True):
        config, block = model.config, model.h[layer]
        values = slice(2 * config.n_embd, None)  # c_attn computes q, k, v
        b_V = block.attn.c_attn.bias[values]                                       # [d_model]
        if settings.get("fold_ln", True):  # folded in first, ln1's bias joins the value bias
            b_V = b_V + block.ln_1.bias @ block.attn.c_attn.weight[:, values]
        b_V = b_V.detach().view(config.n_head, config.d_head)
        params = fold_input_shift(params, b_V.flatten() if head is None else b_V[head])
        folded.append("read without the value bias (fold_value_biases)")
    if act.startswith("resid") and settings.get("center_writing_weights", True):
        params = fold_input_centring(params)
        folded.append("read centred (center_writing_weights)")
    return replace(sae, **params), folded


def _shift_encoder_biases(params: dict, shift: torch.Tensor) -> dict:
    """Add shift [d_sae] to every encoder path's pre-activations (b_mag's times exp r_mag, as its weights)."""
    shifted = {name: params[name] + shift for name in ("b_enc", "b_gate") if name in params}
    if "b_mag" in params:
        shifted["b_mag"] = params["b_mag"] + shift * params["r_mag"].exp()
    return {**params, **shifted}


def _finite(params: dict, where) -> dict:
    """params if every value is finite; else a one-line ValueError naming the tensors that are not."""
    broken = [name for name, t in params.items() if not torch.isfinite(t).all()]
    if broken:
        raise ValueError(f"{where}: {', '.join(broken)} hold{'s' * (len(broken) == 1)} NaN or inf")
    return params


def save_sae(sae: SAE, directory):
    """The SAE in SAELens's layout, as `SAE.load_from_disk` reads it: on raw activations (input scale
    folded in), `sae.meta` as cfg.json's `metadata` (hook_name, ...). A NaN or inf is never saved."""
    params = _finite(fold_input_scale(sae.params, sae.input_scale), "SAE not saved")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # sae_lens_version 6: else SAELens reads cfg.json in its pre-6 layout (metadata at the top level)
    meta = {"model_from_pretrained_kwargs": PLAIN_MODEL, **sae.meta, "sae_lens_version": "6.0.0"}
    # SAELens flattens [.., head, d_head] for an SAE over all heads' hook_z concatenated
    layer_z = str(meta.get("hook_name", "")).endswith("hook_z") and meta.get("hook_head_index") is None
    cfg = {"architecture": SAELENS_ARCH[sae.arch], "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "hook_z" if layer_z else "none", "frozen_decoder": sae.frozen_decoder,
           "metadata": meta}
    if sae.arch == "topk":
        cfg |= {"k": sae.k, "rescale_acts_by_decoder_norm": False}
    save_tensors({name: t.float() for name, t in params.items()}, directory / "sae_weights.safetensors")
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=1))  # last: its presence marks a complete save


NULL = type(None)  # JSON null
# cfg.json's true/false settings that load_sae folds into the weights, with SAELens's defaults
SAELENS_FLAGS = {"apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": False, "frozen_decoder": False}


def _read_weights(path: Path, arch: str, d_in: int, d_sae: int) -> dict:
    """The parameters of a `sae_weights.safetensors`, each of its shape and finite."""
    try:
        weights = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a missing or corrupt file
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in weights and not torch.all(weights[name] == 1):
            raise ValueError(f"{path}: weight {name} is not all ones (only ones are supported)")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}  # the others: (d_sae,)
    for name, shape in ((name, shapes.get(name, (d_sae,))) for name in PARAMETERS[arch]):
        if name not in weights:
            raise ValueError(f"{path}: a {arch} SAE needs a tensor {name} (found: {sorted(weights)})")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(weights[name].shape)}, not {shape} "
                             f"(cfg.json has d_in={d_in}, d_sae={d_sae})")
    return _finite({name: weights[name].float() for name in PARAMETERS[arch]}, path)


def load_sae(directory) -> SAE:
    """An SAE folder of `save_sae` or SAELens (standard, gated, top-k, JumpReLU; any cfg.json layout), its
    settings folded into the weights, metadata as `meta`; else a ValueError naming file, field and value."""
    path = Path(directory) / "cfg.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if type(cfg) is not dict:
        raise ValueError(f"{path}: expected a JSON object of settings, got {type(cfg).__name__}")

    def field(name, types, default, valid=lambda value: True, supported="", table=cfg):
        """table[name] (or default) if of a JSON type in `types` (nothing is coerced) and `valid`."""
        value = table.get(name, default)
        if type(value) not in types or not valid(value):
            raise ValueError(f"{path}: {name}={value!r} is not supported ({supported})")
        return value
    metadata = dict(field("metadata", (dict, NULL), None, supported="a JSON object") or {})
    for new, old in (("hook_name", "hook_point"), ("hook_head_index", "hook_point_head_index")):
        if new not in metadata and (new in cfg or old in cfg):
            metadata[new] = cfg.get(new, cfg.get(old))
    field("hook_name", (str, NULL), None, supported="a hook name, e.g. blocks.9.attn.hook_z", table=metadata)
    field("hook_head_index", (int, NULL), None, lambda h: h is None or h >= 0, "null or an integer >= 0",
          table=metadata)
    model = field("model_from_pretrained_kwargs", (dict, NULL), None, supported="an object", table=metadata)
    for name in PLAIN_MODEL:  # how the model the SAE read was processed (as_plain_model_sae)
        field(name, (bool,), True, supported="true or false", table=model or {})
    d_in, d_sae = (field(name, (int,), None, lambda n: n > 0, "an integer > 0") for name in ("d_in", "d_sae"))
    architecture = field("architecture", (str,), "standard", lambda a: a in SAELENS_ARCH.values(),
                         ", ".join(SAELENS_ARCH.values()))
    activation = field("activation_fn", (str,), cfg.get("activation_fn_str", "relu"),
                       lambda a: architecture != "standard" or a in ("relu", "topk"), "relu or topk")
    arch = {"standard": "topk" if activation == "topk" else "vanilla"}.get(architecture, architecture)
    kwargs = field("activation_fn_kwargs", (dict, NULL), None, supported="a JSON object") or {}
    k = field("k", (int, NULL), kwargs.get("k"), lambda k: arch != "topk" if k is None else 1 <= k <= d_sae,
              f"an integer in [1, d_sae={d_sae}]")
    # input_scale beside normalised-space weights: this project's SAE folders before it was folded in
    field("normalize_activations", (str, bool, NULL), "none", lambda n: n in ("none", False, None)
          or (n == "expected_average_only_in" and "input_scale" in cfg),  # SAELens < 6: false for none
          "only 'none': fold input scaling into the weights")
    field("reshape_activations", (str,), "none", lambda r: r in ("none", "hook_z"), "none or hook_z")
    field("finetuning_scaling_factor", (bool,), False, lambda f: not f, "only false")
    scale = field("input_scale", (int, float), 1.0, lambda s: 0 < s < math.inf, "a finite number > 0")
    centred, rescaled, frozen = (field(name, (bool,), default, supported="true or false")
                                 for name, default in SAELENS_FLAGS.items())
    p = _read_weights(Path(directory) / "sae_weights.safetensors", arch, d_in, d_sae)
    if not centred:  # fold "no centring" into the encoder biases
        p = _shift_encoder_biases(p, p["b_dec"] @ p["W_enc"])
    if arch == "topk" and rescaled:
        p = fold_decoder_norm(p)
    p = _finite(fold_input_scale(p, scale), f"{path}: input_scale={scale} folded into the weights")
    return SAE(arch, **p, k=k, frozen_decoder=frozen, meta=metadata)


# ----------------------------------------------------------------------------- training

@dataclass
class SAESpec:
    """One SAE of a stack: architecture, which dataset, its hyper-parameter and seed."""
    arch: str  # "vanilla" | "gated" | "topk"
    dataset_index: int = 0
    l1_coefficient: float = 1.0  # λ for vanilla / gated, on inputs normalised to mean norm √d
    k: int = 3  # top-k
    seed: int = 0
    frozen_decoder: bool = False  # the paper's floor: random unit decoder rows, never trained
    name: str = ""


@dataclass
class TrainConfig:
    """The paper's settings (appendix on SAE training); `epochs` is the length, or a cap with `plateau`."""
    d_sae: int = 512
    lr: float = 3e-4
    batch_size: int = 512
    epochs: int = 2000
    resample_at: tuple = (0.125, 0.25, 0.375, 0.5)  # fixed: when, in fractions; converging: how often
    warmup_fraction: float = 0.02  # linear LR warm-up at the start and after each resampling
    decay_fraction: float = 0.25  # linear LR decay to 0 over the last quarter
    plateau: Optional[float] = None  # converge at this relative improvement (Schedule); None: fixed


class Schedule:
    """When a stack resamples, its learning rate (warm-up after every (re)start, linear decay to 0 over the
    last quarter), when it stops: after `epochs` epochs, resampling at the `resample_at` fractions, or at a
    plateau (every loss down by less than a fraction `plateau` over max(5, 10% of the epochs run) epochs),
    where it resamples dead latents, or decays a third as long again and stops."""

    def __init__(self, config: TrainConfig, steps_per_epoch: int, can_resample: bool):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.cap = config.epochs * steps_per_epoch
        self.warmup = max(1, round(config.warmup_fraction * self.cap))
        self.restart, self.losses = 0, []  # losses: one [S] tensor per epoch since the last restart
        self.resamples_left = len(config.resample_at) if can_resample else 0
        fixed = config.plateau is None
        fractions = config.resample_at if fixed and can_resample else ()
        self.resample_epochs = {round(f * config.epochs) for f in fractions} - {0}
        self.end = self.cap if fixed else None  # the step training stops at, once it is known
        self.converged = None if fixed else False  # a fixed schedule makes no claim

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step - self.restart + 1) / self.warmup)
        if self.end is None:
            return warm
        decay = max(1, round(self.config.decay_fraction * self.end))
        return warm * max(0.0, min(1.0, (self.end - step) / decay))

    def plateaued(self, epochs_run: int) -> bool:
        window = max(5, round(0.1 * epochs_run))  # epochs back, counted once the warm-up is over
        if len(self.losses) <= window + math.ceil(self.warmup / self.steps_per_epoch):
            return False
        before, now = self.losses[-1 - window], self.losses[-1]
        return bool(((before - now) < self.config.plateau * before).all())

    def after_epoch(self, epochs_run: int, epoch_loss: torch.Tensor, has_dead) -> Optional[str]:
        """"resample", "stop" or None after `epochs_run` epochs; has_dead() is asked at a plateau only."""
        steps = epochs_run * self.steps_per_epoch
        self.losses.append(epoch_loss)
        if self.end is None and self.plateaued(epochs_run):  # converging, the end not yet known
            if self.resamples_left and has_dead():
                self.resamples_left -= 1
                return "resample"
            self.end = min(self.cap, round(steps / (1 - self.config.decay_fraction)))
            self.converged = self.end < self.cap or steps == self.cap
        if steps >= (self.end or self.cap):
            return "stop"
        return "resample" if epochs_run in self.resample_epochs else None  # fixed: at the fractions

    def restarted(self, epochs_run: int):
        self.restart, self.losses = epochs_run * self.steps_per_epoch, []


def _check_stack(datasets, specs, config):
    _check_activations(datasets, "datasets", "[n_datasets, N, d]")
    if not specs or len({s.arch for s in specs}) != 1 or specs[0].arch not in LOSSES:
        raise ValueError(f"one architecture per stack, one of {sorted(LOSSES)}; "
                         f"got {sorted({s.arch for s in specs})}")
    for name in ("d_sae", "batch_size", "epochs", "lr"):
        if not 0 < getattr(config, name) < math.inf:
            raise ValueError(f"{name} must be positive and finite, got {getattr(config, name)}")
    for s in specs:
        if not 0 <= s.dataset_index < len(datasets):
            raise ValueError(f"dataset_index {s.dataset_index} outside [0, {len(datasets)})")
        if s.arch == "topk" and not 1 <= s.k <= config.d_sae:
            raise ValueError(f"k must lie in [1, d_sae={config.d_sae}], got {s.k}")
        if s.arch != "topk" and not 0 <= s.l1_coefficient < math.inf:
            raise ValueError(f"l1_coefficient must be non-negative and finite, got {s.l1_coefficient}")
    for i, norm in enumerate(datasets.norm(dim=-1).mean(1).tolist()):  # each is scaled to mean norm √d
        if (datasets[i] == datasets[i, :1]).all():  # all 0: scaled by 1/0
            raise ValueError(f"dataset {i}: every row is {'the same' if norm else '0'}, nothing to learn")
        if norm == math.inf:
            raise ValueError(f"dataset {i}: values up to {datasets[i].abs().max():.3g} overflow float32")


def init_sae(spec: SAESpec, d_in: int, d_sae: int, generator: torch.Generator, b_dec: torch.Tensor,
             input_scale: float) -> SAE:
    """Random unit decoder rows, the encoder their transpose (× 0.1 for ReLU SAEs, as Anthropic's April
    2024 update: else hundreds of half-active latents start far too big), b_dec the data mean, 0 biases."""
    W_dec = F.normalize(torch.randn(d_sae, d_in, generator=generator), dim=-1)
    W_enc = (1.0 if spec.arch == "topk" else 0.1) * W_dec.T.contiguous()
    biases = {name: torch.zeros(d_sae) for name in PARAMETERS[spec.arch] if name not in (*MATRICES, "b_dec")}
    return SAE(spec.arch, W_enc=W_enc, W_dec=W_dec, b_dec=b_dec.clone(), **biases,
               k=spec.k if spec.arch == "topk" else None, l1_coefficient=spec.l1_coefficient,
               input_scale=float(input_scale), frozen_decoder=spec.frozen_decoder)


@torch.no_grad()
def _statistics(stack: SAE, x: torch.Tensor, specs: list, chunk: int, epoch: int):
    """(x̂ [S, N, d_in], ‖x - x̂‖² [S, N], fires [S, d_sae]) in chunks of the training batch, whose
    memory the allocator reuses (larger ones are page-faulted afresh). Stops at a NaN or inf."""
    x_hat, fires = [], 0
    for batch in x.split(chunk, 1):  # [S, chunk, d_in]
        f = stack.latents(batch)
        x_hat.append(stack.reconstruct(f))
        fires = fires + (f != 0).sum(1)  # active: f ≠ 0, as `SAE.active` and the grading count it
    x_hat = torch.cat(x_hat, 1)
    errors = (x - x_hat).pow(2).sum(-1)  # [S, N]
    _stop_if_diverged(specs, torch.stack([torch.isfinite(t).flatten(1).all(1)  # [S]
                                          for t in [errors, *stack.params.values()]]).all(0), epoch)
    return x_hat, errors, fires


def _stop_if_diverged(specs: list, finite: torch.Tensor, epoch: int):
    """Stop, naming the epoch and the first SAE with finite[s] False: it must not be saved and graded."""
    diverged = (~finite.cpu()).nonzero()[:, 0].tolist()
    if diverged:
        raise ValueError(f"training diverged (NaN or inf) at epoch {epoch} in {specs[diverged[0]]}: "
                         "lower the learning rate")


def _train_epoch(stack, adam, x, generators, batch_size, lr_at) -> torch.Tensor:
    """One pass over x [S, N, d_in], each SAE in its own order, an Adam step at lr_at(i) per batch -> mean
    loss per SAE [S] (CPU). Decoder rows stay unit: no radial gradient (none if frozen), renormalised."""
    order = torch.stack([torch.randperm(x.shape[1], generator=g) for g in generators])  # [S, N]
    starts = range(0, x.shape[1], batch_size)
    epoch_loss = 0
    for i, start in enumerate(starts):
        rows = order[:, start:start + batch_size]  # [S, B]: each SAE's own batch
        loss = stack.loss(x[torch.arange(len(x))[:, None], rows]).mean(-1)  # [S]
        adam.zero_grad(set_to_none=True)
        loss.sum().backward()
        with torch.no_grad():
            grad, W_dec = stack.W_dec.grad, stack.W_dec  # [S, d_sae, d_in]
            grad -= (grad * W_dec).sum(-1, keepdim=True) * W_dec
            grad.masked_fill_(stack.frozen_decoder, 0)
        for group in adam.param_groups:
            group["lr"] = lr_at(i)
        adam.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
        epoch_loss += loss.detach() / len(starts)
    return epoch_loss.cpu()


@torch.no_grad()
def _resample_dead_latents(stack: SAE, adam, dead, errors, x, generators: list):
    """Point dead latents [S, d_sae] (README §8, after Anthropic 2023) at centred inputs drawn ∝ loss²
    (encoder column at 0.2 × the mean alive norm; decoder unless frozen), zero biases and Adam moments."""
    for s, generator in enumerate(generators):
        latents = dead[s].nonzero()[:, 0]
        if len(latents) == 0:
            continue
        weights = errors[s].double().pow(2).cpu() + 1e-30  # +tiny: sampling needs a positive total
        picks = torch.multinomial(weights, len(latents), len(latents) > len(weights), generator=generator)
        directions = F.normalize(x[s, picks] - stack.b_dec[s], dim=-1)  # [n_dead, d_in]
        alive = stack.W_enc[s][:, ~dead[s]].norm(dim=0)
        stack.W_enc[s][:, latents] = directions.T * 0.2 * (alive.mean() if len(alive) else 1.0)
        if not stack.frozen_decoder[s]:
            stack.W_dec[s][latents] = directions
        for name, t in stack.params.items():
            if name == "b_dec":  # no latent axis
                continue
            axis = -2 if name == "W_dec" else -1  # the latent axis, the same with or without S
            if name not in MATRICES:  # the encoder biases (r_mag too: exp 0 = 1)
                t[s].index_fill_(axis, latents, 0)
            for moment in adam.state[t].values():
                if moment.dim():  # not the step count
                    moment[s].index_fill_(axis, latents, 0)


def train_sae_stack(datasets: torch.Tensor, specs: list, config: Optional[TrainConfig] = None, progress=None):
    """Train SAE s on raw activations datasets[specs[s].dataset_index] ([n_datasets, N, d]; README §8) ->
    (saes, logs: loss and core metrics at every checkpoint). `progress`: None, or called with 1 an epoch."""
    config = config or TrainConfig()
    _check_stack(datasets, specs, config)
    index = torch.tensor([spec.dataset_index for spec in specs])
    scales = (datasets.shape[-1] ** 0.5 / datasets.norm(dim=-1).mean(1))[index]  # [S]: to mean norm √d
    x = datasets[index] * scales[:, None, None]  # [S, N, d]  what each SAE reads
    generators = [torch.Generator().manual_seed(spec.seed) for spec in specs]  # init, batch order, resampling
    initial = [init_sae(spec, datasets.shape[-1], config.d_sae, generator, b_dec, scale) for spec, generator,
               b_dec, scale in zip(specs, generators, datasets.mean(1)[index] * scales[:, None], scales)]
    stack = stack_saes(initial).to(datasets.device)
    # fused: one kernel a tensor (unfused, a loop over SAEs spends ~17% of its step); CPU: torch >= 2.4
    adam = torch.optim.Adam([t.requires_grad_() for t in stack.params.values()], lr=config.lr,
                            fused=torch.__version__ >= "2.4")
    batch_size = min(config.batch_size, x.shape[1])
    steps_per_epoch = math.ceil(x.shape[1] / batch_size)
    schedule = Schedule(config, steps_per_epoch, can_resample=specs[0].arch != "topk")
    checkpoints = {2 ** i for i in range(config.epochs.bit_length())} | {config.epochs}  # 1, 2, 4, ..., last
    logs = []
    for epoch in range(config.epochs):
        epoch_loss = _train_epoch(stack, adam, x, generators, batch_size,
                                  lambda i: config.lr * schedule.lr_factor(epoch * steps_per_epoch + i))
        _stop_if_diverged(specs, torch.isfinite(epoch_loss), epoch + 1)
        if progress:
            progress(1)
        statistics = functools.partial(_statistics, stack, x, specs, batch_size, epoch + 1)  # when asked for
        action = schedule.after_epoch(epoch + 1, epoch_loss, lambda: bool((statistics()[2] == 0).any()))
        if epoch + 1 in checkpoints or action == "stop":
            saes = [replace(sae, meta={"spec": asdict(spec), "train_config": asdict(config)})
                    for sae, spec in zip(stack.unstack(), specs)]
            x_hat, _, fires = statistics()  # core metrics in each SAE's normalised space
            logs += [{"sae": s, "name": spec.name, "epoch": epoch + 1, "steps": (epoch + 1) * steps_per_epoch,
                      "converged": schedule.converged if action == "stop" else None,
                      "loss": float(epoch_loss[s]), **core_metrics(x[s], x_hat[s], fires[s])}
                     for s, spec in enumerate(specs)]
        if action == "stop":
            break
        if action == "resample":
            _, errors, fires = statistics()
            _resample_dead_latents(stack, adam, fires == 0, errors, x, generators)
            schedule.restarted(epoch + 1)
    return saes, logs  # the last epoch is always a checkpoint


def train_sae(acts: torch.Tensor, spec: SAESpec, config: Optional[TrainConfig] = None, **kwargs):
    """One SAE on activations [N, d]: a stack of one. Returns (sae, logs)."""
    saes, logs = train_sae_stack(_check_activations(acts, "acts")[None], [spec], config, **kwargs)
    return saes[0], logs


# ----------------------------------------------------------------------------- full-distribution SAEs

def iter_corpus_texts(path=None) -> Iterator[str]:
    """Texts of a .jsonl file ({"text": ...} a line), any other file's paragraphs, or (None) Python's help."""
    if path is None:
        from pydoc_data.topics import topics
        yield from (topics[key] for key in sorted(topics))
    elif str(path).endswith(".jsonl"):
        with open(path) as lines:
            yield from (json.loads(line)["text"] for line in lines if line.strip())
    else:
        yield from (p.strip() for p in Path(path).read_text().split("\n\n") if p.strip())


def _chunks(tokenizer, texts, length: int, bos: int) -> Iterator[list]:
    """Token chunks of `length`, documents joined by the BOS/end-of-text token, streamed."""
    buffer = []
    for text in texts:
        buffer += tokenizer.encode_ordinary(text) + [bos]
        while len(buffer) >= length:
            yield buffer[:length]
            buffer = buffer[length:]


@torch.inference_mode()
def collect_corpus_activations(model, tokenizer, nodes: list, texts, max_tokens: int,
                               context: int = 128, batch_size: int = 16) -> dict:
    """{(hook_name, head): [n_tokens, d_head]} at every position but BOS of chunks of BOS + context-1
    tokens of `texts`, up to max_tokens per node. Texts are streamed, so memory stays bounded."""
    from gpt2 import BOS_TOKEN_ID  # imported here so the SAE code needs no model module
    names, device = sorted({name for name, _ in nodes}), next(model.parameters()).device
    chunks = itertools.islice(_chunks(tokenizer, texts, context - 1, BOS_TOKEN_ID),
                              math.ceil(max_tokens / (context - 1)))  # the chunks needed, or all there are
    collected = {node: [] for node in nodes}
    while batch := list(itertools.islice(chunks, batch_size)):
        tokens = torch.tensor([[BOS_TOKEN_ID] + chunk for chunk in batch], device=device)  # [B, context]
        _, cache = model.run_with_cache(tokens, names, logits_at=torch.zeros_like(tokens[:, 0]))
        for name, head in nodes:  # cache[name]: [B, context, head, d_head]; drop the BOS position
            collected[(name, head)].append(cache[name][:, 1:, head].reshape(-1, cache[name].shape[-1]))
    return {node: torch.cat(parts)[:max_tokens] if parts else torch.empty(0)
            for node, parts in collected.items()}
