"""The IOI task (Wang et al. 2022, arXiv 2211.00593) as Makelov, Lange & Nanda (arXiv 2405.08366) use it,
README §2-3: "Then, Mary and John went to the store. John gave a drink to" -> " Mary". Prompts with
independent attributes IO, S and Pos, counterfactuals, circuit nodes (per head, at positions found per
prompt), patched runs, `discover` (the circuit of a model but GPT-2 Small), a small hand-written IOI model.
Where to start: `sample_prompts`, `counterfactual`, `Node`, then `run_batches` and `patched_run`.
"""
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import gpt2

# ----------------------------------------------------------------------------- words and templates

# Every word is one GPT-2 token *with* its leading space (" Mary"), as tests/test_ioi.py
# checks. Names alternate female/male so that both halves of the list are alike.
NAMES = (
    "Mary", "John", "Sarah", "Bob", "Emma", "James", "Anna", "Michael", "Laura", "David",
    "Kate", "Tom", "Lisa", "Paul", "Susan", "Peter", "Alice", "Jack", "Jennifer", "Daniel",
    "Elizabeth", "Robert", "Linda", "William", "Barbara", "Richard", "Jessica", "Thomas", "Karen", "Charles",
    "Nancy", "Chris", "Betty", "Steve", "Helen", "Kevin", "Sandra", "Brian", "Donna", "George",
    "Carol", "Edward", "Ruth", "Jason", "Sharon", "Jeff", "Michelle", "Ryan", "Amy", "Gary",
    "Angela", "Eric", "Emily", "Adam", "Rachel", "Frank", "Anne", "Scott", "Jane", "Ben",
    "Julie", "Sam", "Maria", "Henry", "Diana", "Patrick", "Amanda", "Jerry", "Sophie", "Dennis",
    "Chloe", "Walter", "Lucy", "Harry", "Ellie", "Carl", "Katie", "Arthur", "Megan", "Roger",
    "Hannah", "Joe", "Olivia", "Jim", "Jenny", "Tim", "Claire", "Dan", "Rebecca", "Mike",
    "Nicole", "Matt", "Heather", "Nick", "Kelly", "Tony", "Ashley", "Andrew", "Paula", "Josh",
    "Joan", "Justin", "Judy", "Luke", "Eva", "Alex", "Nina", "Leo", "Sara", "Oscar",
    "Tina", "Victor", "Kim", "Martin", "Jill", "Simon", "Beth", "Ian", "Ann", "Neil",
    "Molly", "Craig", "Stella", "Sean", "Vera", "Kyle", "Rita", "Aaron", "Dana", "Tyler",
    "Erin", "Brandon", "Fiona", "Nathan", "Lauren", "Ethan", "Natalie", "Noah", "Caroline", "Liam",
    "Catherine", "Owen", "Marie", "Evan", "Margaret", "Ross", "Sophia", "Bruce", "Mia", "Louis",
)
OBJECTS = (  # all start with a consonant, so "a {object}" reads well
    "drink", "ball", "book", "key", "ring", "pen", "bag", "box", "cake", "hat",
    "letter", "gift", "phone", "card", "cup", "map", "coin", "knife", "basket", "bottle",
    "toy", "plate", "bowl", "candle", "camera", "watch", "brush", "shirt", "lamp", "pencil",
    "towel", "blanket", "ticket", "photo", "flower", "note", "sandwich", "cookie", "jacket", "radio",
    "guitar", "wallet", "sweater", "puzzle", "chair", "clock", "glove", "doll", "shoe", "rope",
)
PLACES = (
    "store", "park", "school", "office", "beach", "house", "garden", "station", "library", "hospital",
    "restaurant", "church", "market", "museum", "hotel", "airport", "farm", "bank", "zoo", "gym",
    "lake", "river", "forest", "mall", "bar", "cafe", "kitchen", "theater", "stadium", "club",
    "village", "castle", "harbor", "island", "temple", "bakery", "cinema", "pool", "factory", "bridge",
)
# Three name slots: A and B are introduced, C (= S) repeats one of them; the prompt ends
# right before the answer. No slot starts the text, so every name keeps its leading space.
TEMPLATES = (
    "Then, {A} and {B} went to the {place}. {C} gave a {object} to",
    "When {A} and {B} got to the {place}, {C} handed the {object} to",
    "After {A} and {B} arrived at the {place}, {C} passed a {object} to",
    "Then, {A} and {B} were working at the {place}. {C} decided to give a {object} to",
    "Yesterday, {A} and {B} met at the {place}, and {C} sold the {object} to",
    "While {A} and {B} were sitting in the {place}, {C} brought a {object} to",
    "Later, {A} had lunch with {B} at the {place}. {C} threw the {object} to",
    "So {A} and {B} walked into the {place} together. Afterwards, {C} offered a {object} to",
    "Then, {A} and {B} found a {object} at the {place}. {C} gave it to",
    "On Sunday, {A} and {B} cleaned the {place}, so {C} lent a {object} to",
    "It was getting late at the {place} when {A} and {B} showed up. {C} gave a {object} to",
    "Before they left the {place} this morning, {A} and {B} talked for a while. {C} returned the {object} to",
    "At the {place}, {A} said hello to {B}, and {C} gave a {object} to",
    "Near the {place}, {A} was waiting for {B}. When they met, {C} handed a {object} to",
    "Last night, {A} and {B} cooked dinner at the {place}. After dinner, {C} passed the {object} to",
    "Then, {A} met {B} at the {place}. {C} gave the {object} to",
    "While {A} and {B} were working at the {place}, {C} handed a {object} to",
)
# Held out from the training prompts, to check that a model generalises: new sentences made of
# known words, and objects and places no training prompt uses.
HELD_OUT_TEMPLATES = (15, 16)
TRAIN_TEMPLATES = tuple(t for t in range(len(TEMPLATES)) if t not in HELD_OUT_TEMPLATES)
HELD_OUT_OBJECTS, TRAIN_OBJECTS = OBJECTS[-10:], OBJECTS[:-10]
HELD_OUT_PLACES, TRAIN_PLACES = PLACES[-8:], PLACES[:-8]
# Paper (revised code): evaluation prompts use the first half of the names, their
# counterfactuals the second half, so an edit always brings in a name the prompt lacks.
EVAL_NAMES, COUNTERFACTUAL_NAMES = NAMES[:len(NAMES) // 2], NAMES[len(NAMES) // 2:]
NAME_INDEX = {name: i for i, name in enumerate(NAMES)}

ATTRIBUTES = ("io", "s", "pos")
PATTERNS = ("ABB", "BAB")  # Pos: is the IO the first (ABB) or the second (BAB) name?
POSITIONS = ("io", "s1", "s1+1", "s2", "end")


def name_token(name):
    return gpt2.load_tokenizer().encode(" " + name)[0]


# ----------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    text: str
    tokens: list      # token ids, BOS first
    io: str           # indirect object: the answer
    s: str            # subject: the name that is repeated
    pos: str          # "ABB" (IO first) or "BAB"
    template: int     # index into TEMPLATES
    place: str
    object: str
    c: str            # the name in slot C: S itself, or a third name in an ABC prompt
    positions: dict   # "io", "s1", "s1+1", "s2", "end" -> token index


def make_prompt(template, io, s, pos, place, object, c=None):
    """Fill a template; positions are found by matching name tokens, never assumed."""
    c = s if c is None else c
    a, b = (io, s) if pos == "ABB" else (s, io)
    text = TEMPLATES[template].format(A=a, B=b, C=c, place=place, object=object)
    tokens = [gpt2.BOS_TOKEN_ID] + gpt2.load_tokenizer().encode(text)
    found = {name: [i for i, t in enumerate(tokens) if t == name_token(name)] for name in (io, s, c)}
    for name, count in {io: 1, s: 1 + (c == s), c: 1 + (c == s)}.items():
        if len(found[name]) != count:
            raise ValueError(f"{text!r}: ' {name}' occurs {len(found[name])} times as a token, "
                             f"expected {count}")
    s1 = found[s][0]
    positions = {"io": found[io][0], "s1": s1, "s1+1": s1 + 1, "s2": found[c][-1], "end": len(tokens) - 1}
    return Prompt(text, tokens, io, s, pos, template, place, object, c, positions)


def sample_prompts(n, seed, names=NAMES, templates=TRAIN_TEMPLATES, objects=OBJECTS, places=PLACES,
                   abc=False):
    """n prompts; IO, S (distinct, each uniform) and Pos (exactly balanced) are independent. `seed`: an
    int or a numpy Generator; `abc=True` puts a third name in slot C (ABC prompts, for mean ablation)."""
    rng = np.random.default_rng(seed)
    n_names = len(names)
    pos = rng.permutation(np.arange(n) % 2)                        # half ABB, half BAB
    io = rng.integers(n_names, size=n)
    s = (io + rng.integers(1, n_names, size=n)) % n_names          # uniform over the names != IO
    c = rng.integers(n_names - 2, size=n)                          # uniform over the names != IO, S:
    c = c + (c >= np.minimum(io, s))                               # skip the smaller of the two,
    c = c + (c >= np.maximum(io, s))                               # then the larger
    template = rng.choice(templates, size=n)
    obj, place = rng.integers(len(objects), size=n), rng.integers(len(places), size=n)
    return [make_prompt(int(template[i]), names[io[i]], names[s[i]], PATTERNS[pos[i]], places[place[i]],
                        objects[obj[i]], names[c[i]] if abc else None) for i in range(n)]


# Templates with the first two names at positions 3 and 5, one layout as in the paper: a model that finds S
# by position (the embedded one does) then has one Pos feature, not one per layout (which no dictionary has).
ALIGNED_TEMPLATES = (0, 3, 4, 8)


def train_prompts(n=20_000, seed=0, templates=ALIGNED_TEMPLATES):
    """Dictionary/SAE training set: all names (paper, revised code)."""
    return sample_prompts(n, seed, templates=templates)


def eval_prompts(n=5_000, seed=1, templates=ALIGNED_TEMPLATES):
    """Evaluation set: names from the first half; counterfactuals take the second half."""
    return sample_prompts(n, seed, names=EVAL_NAMES, templates=templates)


def held_out_prompts(n=1_000, seed=2):
    """Templates, objects and places no training prompt uses: a generalisation check."""
    return sample_prompts(n, seed, templates=HELD_OUT_TEMPLATES, objects=HELD_OUT_OBJECTS,
                          places=HELD_OUT_PLACES)


def counterfactual(prompt, attribute, rng, names=COUNTERFACTUAL_NAMES):
    """The prompt with one attribute changed, everything else kept (README §2). io: a new IO name not in
    the prompt; s: both S occurrences become a new name; pos: the first two names swap (ABB <-> BAB)."""
    fields = {key: getattr(prompt, key) for key in ("template", "io", "s", "pos", "place", "object", "c")}
    if attribute == "pos":
        fields["pos"] = PATTERNS[1 - PATTERNS.index(prompt.pos)]
    elif attribute in ("io", "s"):
        candidates = [name for name in names if name not in (prompt.io, prompt.s, prompt.c)]
        new = candidates[rng.integers(len(candidates))]
        if attribute == "s" and prompt.c == prompt.s:
            fields["c"] = new
        fields[attribute] = new
    else:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return make_prompt(**fields)


def counterfactuals(prompts, attribute, seed, names=COUNTERFACTUAL_NAMES):
    rng = np.random.default_rng(seed)
    return [counterfactual(p, attribute, rng, names) for p in prompts]


# ----------------------------------------------------------------------------- batches

@dataclass
class PromptBatch:
    tokens: torch.Tensor     # [batch, pos], right-padded
    positions: dict          # "io", "s1", "s1+1", "s2", "end" -> LongTensor [batch]
    io_token: torch.Tensor   # [batch]
    s_token: torch.Tensor    # [batch]


def batch_prompts(prompts, device="cpu"):
    """Right-pad to the longest prompt; causal attention keeps padding out of real positions."""
    tokens = torch.full((len(prompts), max(len(p.tokens) for p in prompts)), gpt2.BOS_TOKEN_ID)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt.tokens)] = torch.tensor(prompt.tokens)
    positions = {key: torch.tensor([p.positions[key] for p in prompts], device=device) for key in POSITIONS}
    io_token, s_token = (torch.tensor([name_token(getattr(p, key)) for p in prompts], device=device)
                         for key in ("io", "s"))
    return PromptBatch(tokens.to(device), positions, io_token, s_token)


def attribute_ids(prompts):
    """{"io", "s": index into NAMES, "pos": 0 = ABB, 1 = BAB}, each a LongTensor [n]."""
    return {"io": torch.tensor([NAME_INDEX[p.io] for p in prompts]),
            "s": torch.tensor([NAME_INDEX[p.s] for p in prompts]),
            "pos": torch.tensor([PATTERNS.index(p.pos) for p in prompts])}


def prompts_fingerprint(prompts):
    """sha256 of every prompt's tokens and positions: identifies a prompt set in a cache key."""
    data = [[p.tokens, [p.positions[key] for key in POSITIONS]] for p in prompts]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


# ----------------------------------------------------------------------------- circuit nodes

HEAD_ACTS = ("q", "k", "v", "z")
RESIDUAL_ACTS = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True, order=True)
class Node:
    """One head's q, k, v or z (before W_O) at one semantic position: z@L9H9@end; for SAEs that read more
    (README, "Use with TransformerLens / SAELens"), all heads (z@L9@end) or resid_pre@L9@end."""
    act: str
    layer: int
    head: Optional[int]
    position: str

    def __post_init__(self):
        if self.act not in HEAD_ACTS + RESIDUAL_ACTS or self.position not in POSITIONS:
            raise ValueError(f"bad node {self}: act must be one of {HEAD_ACTS + RESIDUAL_ACTS} "
                             f"and position one of {POSITIONS}")
        if self.act in RESIDUAL_ACTS and self.head is not None:
            raise ValueError(f"bad node {self}: the residual stream has no heads")

    def __str__(self):
        head = "" if self.head is None else f"H{self.head}"
        return f"{self.act}@L{self.layer}{head}@{self.position}"

    @property
    def hook_name(self):
        return f"blocks.{self.layer}.{'' if self.act in RESIDUAL_ACTS else 'attn.'}hook_{self.act}"

    def read(self, act, positions):
        """This node's activations [batch, d] at positions [batch] of its hook's (per head or not)."""
        rows = torch.arange(len(act), device=act.device)
        at_positions = act[rows, positions.to(act.device)]            # [batch, (head,) d]
        return at_positions.flatten(1) if self.head is None else at_positions[:, self.head]

    @classmethod
    def parse(cls, text):
        match = re.fullmatch(r"([qkvz]|resid_pre|resid_mid|resid_post)@L(\d+)(?:H(\d+))?@(\S+)", text)
        if not match:
            raise ValueError(f"{text!r} is not a node like 'z@L9H9@end'")
        act, layer, head, position = match.groups()
        return cls(act, int(layer), None if head is None else int(head), position)


# ----------------------------------------------------------------------------- running the model

def run_with_patches(model, batch, patches, hooks=(), resume=None, ld_only=False):
    """End logits [batch, vocab] (`ld_only`: of IO and S, [batch, 2]) with every node of `patches` ({Node:
    values [batch, d]}) set at once (README §3), then `hooks` ([(hook name, fn)]). `resume`: the batch's
    `residual_streams`; only positions from the first patched one (or `end`) are then computed."""
    first, resumed = 0, {}
    if resume is not None:  # attention is causal: positions before the first patched one stay clean
        first = int(min(batch.positions[key].min() for key in {node.position for node in patches} | {"end"}))
        resumed = dict(resume_from=(resume[0], resume[1][:, first:]),
                       past_kv=[(k[:, :first], v[:, :first]) for k, v in resume[2]])
    at = {key: positions - first for key, positions in batch.positions.items()}  # [batch] each
    groups = {}  # one fn writes every node of a hook: one head each, or each the whole slot
    for node in patches:
        groups.setdefault((node.hook_name, node.head is None), []).append(node)
    patch_hooks = [(hook_name, gpt2.patch_heads(torch.stack([at[n.position] for n in nodes], 1),  # [batch, n]
                                                None if whole_slot else [n.head for n in nodes],
                                                torch.stack([patches[n] for n in nodes], 1)))  # [batch, n, d]
                   for (hook_name, whole_slot), nodes in groups.items()]
    io_and_s = torch.stack([batch.io_token, batch.s_token], 1) if ld_only else None  # [batch, 2]
    return model.run_with_hooks(batch.tokens[:, first:], patch_hooks + list(hooks), logits_at=at["end"],
                                logits_of=io_and_s, **resumed)


def run_batches(model, prompts, batch_size=256, patches=None, read=(), resume=None, ld_only=False):
    """Yield (batch, logits at `end`, {name: activation} of the hooks in `read`) per batch: every evaluation's
    loop. `patches`: {Node: [n_prompts, d]}; `resume`: (layer, `residual_streams`); `ld_only`: as above."""
    device, stored = next(model.parameters()).device, {}

    def store(activation, hook):
        stored[hook.name] = activation
    hooks = [(name, store) for name in read]
    with torch.inference_mode():
        for i, start in enumerate(range(0, len(prompts), batch_size)):
            rows = slice(start, start + batch_size)
            batch = batch_prompts(prompts[rows], device)
            batch_patches = {node: values[rows].to(device) for node, values in (patches or {}).items()}
            resume_from = resume and (resume[0], *resume[1][i])
            logits = run_with_patches(model, batch, batch_patches, hooks, resume_from, ld_only)
            yield batch, logits, stored.copy()


def residual_streams(model, prompts, layer, batch_size=256):
    """[(resid_pre [batch, pos, d_model] entering block `layer`, [(k, v) [batch, p, head, d_head] of each
    block from there on], p: the batch's first `end`)] of an unpatched pass, for a patched one to resume."""
    blocks = range(layer, model.config.n_layer)
    names = [f"blocks.{layer}.hook_resid_pre", *(f"blocks.{b}.attn.hook_{kv}" for b in blocks for kv in "kv")]
    streams = []
    for batch, _, cache in run_batches(model, prompts, batch_size, read=names):  # (copies free the rest)
        kv = [cache[name][:, :batch.positions["end"].min()].clone() for name in names[1:]]
        streams.append((cache[names[0]], list(zip(kv[::2], kv[1::2]))))
    return streams


@dataclass
class PatchedRun:
    """What the metrics need from a (patched) forward pass, per prompt, at `end`."""
    logit_diff: torch.Tensor  # [n] logit[IO] - logit[S]
    top_token: Optional[torch.Tensor] = None  # [n] argmax next token (not in an LD-only run)
    io_prob: Optional[torch.Tensor] = None  # [n] P(IO), if asked for


def patched_run(model, prompts, patches=None, batch_size=256, io_prob=False, resume=None, ld_only=False):
    """Run every prompt with `patches` ({Node: values [n_prompts, d]}) set; `resume`: see `run_batches`.
    P(IO) only if `io_prob` (its softmax costs a fifth of a small model's run); `ld_only`: LDs alone."""
    columns = []
    for batch, logits, _ in run_batches(model, prompts, batch_size, patches, resume=resume, ld_only=ld_only):
        io_s = logits if ld_only else logits.gather(1, torch.stack([batch.io_token, batch.s_token], 1))
        columns.append([io_s[:, 0] - io_s[:, 1]] + ([] if ld_only else [logits.argmax(-1)]))
        if io_prob:  # softmax at the IO token: log P(IO) = logit[IO] - logsumexp(logits)
            columns[-1].append((io_s[:, 0] - logits.logsumexp(-1)).exp())
    return PatchedRun(*(torch.cat(column).cpu() for column in zip(*columns)))


def evaluate(model, prompts, batch_size=256):
    """Mean logit difference, accuracy (LD > 0), top-1 accuracy, mean P(IO), overall and per template."""
    run = patched_run(model, prompts, batch_size=batch_size, io_prob=True)
    top1 = (run.top_token == torch.tensor([name_token(p.io) for p in prompts])).float()

    def summary(where):
        ld = run.logit_diff[where]
        return {"mean_logit_diff": ld.mean().item(), "accuracy": (ld > 0).float().mean().item(),
                "top1_accuracy": top1[where].mean().item(), "io_prob": run.io_prob[where].mean().item(),
                "n": len(ld)}
    templates = torch.tensor([p.template for p in prompts])
    per_template = {t: summary(templates == t) for t in sorted(set(templates.tolist()))}
    return {**summary(slice(None)), "per_template": per_template}


def collect_activations(model, prompts, nodes, batch_size=256, patches=None):
    """{node: Tensor [n_prompts, d]}: one forward pass per batch, with `patches` set, reads every node."""
    # Shortest prompts first: batches of similar lengths need little padding (~20% faster).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].tokens))
    patches = {node: values[order] for node, values in (patches or {}).items()}
    parts = {node: [] for node in nodes}  # each node once, even if asked for twice
    hook_names = list(dict.fromkeys(node.hook_name for node in parts))
    for batch, _, cache in run_batches(model, [prompts[i] for i in order], batch_size, patches, hook_names):
        for node in parts:
            parts[node].append(node.read(cache[node.hook_name], batch.positions[node.position]).cpu())
    back = torch.tensor(order).argsort()  # to prompt order, outside inference mode: tensors to train on
    return {node: torch.cat(chunks)[back] for node, chunks in parts.items()}


# ----------------------------------------------------------------------------- the circuit

@dataclass(frozen=True)
class CrossSection:
    """Nodes patched together in one forward pass, and the attributes edited there."""
    name: str
    nodes: tuple
    attributes: tuple


# Wang et al. (2022), figure 2 (layer, head). Backup name movers include 10.6, which the
# paper's code left out.
GPT2_SMALL_HEADS = {
    "name mover": ((9, 6), (9, 9), (10, 0)),
    "backup name mover": ((9, 0), (9, 7), (10, 1), (10, 2), (10, 6), (10, 10), (11, 2), (11, 9)),
    "negative name mover": ((10, 7), (11, 10)),
    "S-inhibition": ((7, 3), (7, 9), (8, 6), (8, 10)),
    "induction": ((5, 5), (5, 8), (5, 9), (6, 9)),
    "duplicate token": ((0, 1), (0, 10), (3, 0)),
    "previous token": ((2, 2), (4, 11)),
}


def cross_sections(name_movers, s_inhibition, induction_dt):
    """The paper's six cross-sections (README §3) for three groups of (layer, head)."""
    def nodes(act, heads, position):
        return tuple(Node(act, layer, head, position) for layer, head in heads)
    sections = [
        CrossSection("(B)NM out", nodes("z", name_movers, "end"), ("io", "s", "pos")),
        CrossSection("(B)NM q", nodes("q", name_movers, "end"), ("pos", "s")),
        CrossSection("(B)NM qk", nodes("q", name_movers, "end") + nodes("k", name_movers, "io")
                     + nodes("k", name_movers, "s1"), ("pos", "s", "io")),
        CrossSection("S-I out", nodes("z", s_inhibition, "end"), ("pos", "s")),
        CrossSection("S-I v", nodes("v", s_inhibition, "s2"), ("pos", "s")),
        CrossSection("Ind+DT out", nodes("z", induction_dt, "s2"), ("pos", "s")),
    ]
    return [section for section in sections if section.nodes]


def is_gpt2_small(config):
    return (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)


def circuit_cross_sections(model, prompts, batch_size=256):
    """(cross-sections, discover table): GPT-2 Small's known circuit, else what `discover` finds."""
    if is_gpt2_small(model.config):
        heads = GPT2_SMALL_HEADS
        return cross_sections(heads["name mover"] + heads["backup name mover"], heads["S-inhibition"],
                              heads["induction"] + heads["duplicate token"]), {"heads": [], "sections": []}
    return discover(model, prompts, batch_size=batch_size)


def discover(model, prompts, threshold=1 / 3, min_effect=0.02, min_section_effect=0.05, batch_size=256):
    """The IOI circuit's heads in a model whose circuit is unknown, by Wang et al.'s (2022, section 3) measure
    of each class, >= `threshold` of the strongest head's and >= `min_effect` of the clean mean LD: name
    movers by direct effect; earlier S-inhibition heads by the LD drop when the movers' queries at `end` see
    the head's z mean-ablated (path patching); induction, duplicate token: the LD drop, its z at s2 ablated.
    Sections whose mean ablation moves the mean LD by >= `min_section_effect` are kept (necessity divides by
    it) -> (kept sections, {"heads": a row per head and position, "sections": a row per section})."""
    clean = patched_run(model, prompts, batch_size=batch_size).logit_diff.mean().item()
    floor = min_effect * abs(clean)
    heads = [(layer, head) for layer in range(model.config.n_layer) for head in range(model.config.n_head)]

    def strongest(effects):
        top = max(effects.values(), default=0.0)
        return [head for head, effect in effects.items() if effect >= max(threshold * top, floor)]

    def mean_of(nodes):
        return {node: a.mean(0) for node, a in collect_activations(model, prompts, nodes, batch_size).items()}

    def ablation_drop(nodes, through_queries_of=()):
        patches = {node: means[node].expand(len(prompts), -1) for node in nodes}
        if through_queries_of:  # path patching: patch these heads' queries at `end` as `nodes` make them
            queries = [Node("q", layer, head, "end") for layer, head in through_queries_of]
            patches = collect_activations(model, prompts, queries, batch_size, patches=patches)
        return clean - patched_run(model, prompts, patches, batch_size).logit_diff.mean().item()

    means = mean_of([Node("z", layer, head, position) for position in ("end", "s2") for layer, head in heads])
    direct = direct_effects(model, prompts, batch_size)                          # [layer, head]
    name_movers = strongest({(l, h): direct[l, h].item() for l, h in heads})
    query_effect = {(l, h): ablation_drop([Node("z", l, h, "end")], name_movers)  # heads before the movers
                    for l, h in heads if l < min((layer for layer, _ in name_movers), default=0)}
    s2_drop = {(l, h): ablation_drop([Node("z", l, h, "s2")]) for l, h in heads}
    s_inhibition, induction_dt = strongest(query_effect), strongest(s2_drop)
    table = []
    for l, h in heads:
        role = "name mover" if (l, h) in name_movers else "S-inhibition" if (l, h) in s_inhibition else ""
        drop = ablation_drop([Node("z", l, h, "end")]) if role else None
        table.append({"head": f"L{l}H{h}", "position": "end", "direct_effect": direct[l, h].item(),
                      "query_effect": query_effect.get((l, h)), "ld_drop": drop,
                      "fraction": None if drop is None else drop / clean, "role": role})
        table.append({"head": f"L{l}H{h}", "position": "s2", "direct_effect": None, "query_effect": None,
                      "ld_drop": s2_drop[l, h], "fraction": s2_drop[l, h] / clean,
                      "role": "induction/duplicate token" if (l, h) in induction_dt else ""})
    sections = cross_sections(name_movers, s_inhibition, induction_dt)
    means.update(mean_of([node for section in sections for node in section.nodes if node not in means]))
    drops = {section.name: ablation_drop(section.nodes) for section in sections}
    section_rows = [{"section": name, "ld_drop": drop, "fraction": drop / clean,
                     "kept": abs(drop) >= min_section_effect * abs(clean)} for name, drop in drops.items()]
    kept = [section for section, row in zip(sections, section_rows) if row["kept"]]
    return kept, {"heads": table, "sections": section_rows}


def direct_effects(model, prompts, batch_size=256):
    """Mean LD that each head's output at `end` adds to the logits directly, [layer, head]: z @ W_O through
    the final LayerNorm with the clean run's scale (direct logit attribution), onto u_IO - u_S."""
    config = model.config
    last_resid = f"blocks.{config.n_layer - 1}.hook_resid_post"
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(config.n_layer)] + [last_resid]
    total = torch.zeros(config.n_layer, config.n_head)
    for batch, _, cache in run_batches(model, prompts, batch_size, read=names):
        rows, end = torch.arange(len(batch.tokens)), batch.positions["end"]
        resid = cache[last_resid][rows, end]                                           # [batch, d_model]
        scale = (resid.var(-1, unbiased=False) + config.layer_norm_epsilon).sqrt()      # [batch]
        # u_IO - u_S (the unembedding is tied) in the final LayerNorm's input, its weight applied
        direction = (model.wte.weight[batch.io_token] - model.wte.weight[batch.s_token]) * model.ln_f.weight
        for layer, block in enumerate(model.h):
            z = cache[f"blocks.{layer}.attn.hook_z"][rows, end]                 # [batch, head, d_head]
            W_O = block.attn.c_proj.weight.view(config.n_head, config.d_head, -1)  # [head, d_head, d_model]
            out = torch.einsum("bhd,hde->bhe", z, W_O)                          # [batch, head, d_model]
            out = out - out.mean(-1, keepdim=True)                              # LayerNorm centres
            total[layer] += (torch.einsum("bhe,be->bh", out, direction) / scale[:, None]).sum(0).cpu()
    return total / len(prompts)


# ----------------------------------------------------------------------------- the embedded IOI model
#
# GPT-2 Small's IOI circuit (Wang et al. 2022, figure 2) written by hand into a 5-layer GPT-2. Nothing
# is trained: every weight says what a head reads and writes, so the features are known (`true_features`).
#   layer 0  previous-token head: at each token, copy the previous token's name (and a little of its word);
#            MLP: at names, a (position x name) code along position directions no prompt reaches
#   layer 1  induction head (s2 -> s1+1) and duplicate-token head (s2 -> s1): "S, first at s1's position"
#   layer 2  S-inhibition heads: at `end`, attend to s2 and copy that
#   layer 3  name movers: at `end`, attend to the names S-inhibition does not rule out, copy the name to
#            the logits, and "not this name" into S-inhibition's name subspace
#   layer 4  late name mover (GPT-2's 10.0): the same, its query reading S and IO in that one subspace
# A name mover's score of a name token = name_bonus + duplicate_bonus [s2] - inhibit_position [at S's first
# position] - inhibit_token [S] (late mover: + late_inhibit io_s_ratio [IO]), so the IO wins. Editing Pos
# moves the position inhibition onto the IO; editing S lifts the token inhibition and s2 wins; at the late
# query, editing IO takes the IO's bonus: each changes the answer, as in GPT-2 (arXiv 2405.08366, sections
# 4-5). As in GPT-2, no node is exactly ā + u_IO + u_S + u_Pos: position codes overlap, Pos varies with the
# names (the MLP, a duplicate-token attention that depends on S), and each head reads a little of the words.

# The residual stream: named blocks of orthonormal features (sizes in dimensions), orthogonal to the all-ones
# vector (LayerNorm's mean subtraction changes nothing); `bias` is large and constant, so its division is too.
FEATURES = (
    ("bias", 1),        # constant: queries that do not depend on the token read it
    ("bos", 1),         # 1 at <|endoftext|>: where a head attends when nothing matches
    ("is_name", 1),     # 1 at a name token
    ("name_key", 30),   # which name: the part heads match on ...
    ("name_rest", 26),  # ... and the rest of its (unit-norm, random) code, for the logits
    ("other", 6),       # a small random code for every other token (and a little of the previous one)
    ("pos", 31),        # the position (1..31; 0 is BOS): overlapping codes, cos = pos_overlap^distance
    ("prev_name", 30),  # written by the previous-token head: name_key of the token before
    ("dup", 1),         # written at s2: "this name occurred before"
    ("s1_pos", 31),     # written at s2: the position of the earlier occurrence, s1
    ("dup_name", 30),   # written at s2: which name occurred before (name_key of S)
    ("si_name", 30),    # at `end`: S's name_key (S-inhibition) minus io_s_ratio x IO's (name movers)
    ("si_pos", 31),     # written at `end` by S-inhibition: where S first occurred
)


@dataclass
class CircuitConfig:
    """The embedded IOI model: sizes, the seed of its random codes, its attention scores, its geometry."""
    n_layer: int = 5
    n_embd: int = 256
    n_head: int = 4             # d_head 64, as in GPT-2 Small
    n_positions: int = 32       # prompts are at most ~23 tokens: the last n_tail positions are never used
    n_inner: int = 64           # MLP width; only layer 0's MLP is written, the others add exactly 0
    seed: int = 0               # draws the name codes, the residual basis, the MLP and the leaks
    bias_norm: float = 15.5     # with ~8 unit features, |x| ~ 16 = sqrt(n_embd): LayerNorm ~ identity
    match: float = 30.0         # scores (softmax logits): previous token, duplicate, induction, S-inhibition
    sink: float = 15.0          # BOS, the fallback when nothing matches
    name_bonus: float = 10.0    # name movers: any name
    duplicate_bonus: float = 4.0
    inhibit_position: float = 11.0
    inhibit_token: float = 14.0
    late_inhibit: float = 7.0   # late name mover: the score of S's name code (and io_s_ratio x it of IO's)
    late_duplicate_bonus: float = 12.0
    io_s_ratio: float = 1.2     # ||u_IO|| / ||u_S|| at the late mover's query ("slightly larger")
    name_logit: float = 5.0     # the late mover also raises every name's logit (copying "a name")
    logit_scale: float = 1.5    # ln_f weight: sets the logit difference (GPT-2 Small ~3.5)
    pos_overlap: float = 0.5    # cosine of neighbouring position codes
    n_tail: int = 8             # unused positions: the MLP's code on the first half, its copy on the second
    mlp_gain: float = 0.35      # size of that code
    tail_copy: float = 1.5      # the duplicate-token head's gain on it, into s1_pos
    query_tail: float = 1.3     # the name movers' queries carry it (their keys have nothing there)
    key_pos_scale: float = 24.0  # name movers: position keys x 24, queries / 24: Pos is a small part of q
    dt_spread: float = 1.5      # duplicate token: score at s1 = sink + this x (1 + a random form of S's code)
    leak: float = 0.5           # how much of the `other` block (and spare: of `pos`) heads' q, k, v read
    context: float = 0.5        # how much of the previous token's `other` code the previous-token head copies
    word_value: float = 70.0    # induction: the word after s1 (what it predicts) in values W_O drops


def _unit_rows(n, d, generator):
    rows = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


class CircuitWriter:
    """Writes heads into a GPT-2 state dict in terms of the feature blocks. A score term (query, key, M[,
    scale]) adds x_q^T M x_k to the softmax logits (keys x scale, queries / scale); an output term (source,
    target, M[, scale]) adds x_source^T M to the target (v x scale, W_O / scale), in its own coordinates."""

    def __init__(self, config):
        self.config, self.d_head = config, config.n_embd // config.n_head
        ends = list(itertools.accumulate(size for _, size in FEATURES))
        self.slices = {name: slice(end - size, end) for (name, size), end in zip(FEATURES, ends)}
        self.size = dict(FEATURES)
        self.generator = torch.Generator().manual_seed(config.seed)
        # An orthonormal basis of the zero-mean subspace: QR of [ones, random] drops the ones.
        random = torch.randn(config.n_embd, ends[-1], generator=self.generator, dtype=torch.float64)
        seed_matrix = torch.cat([torch.ones(config.n_embd, 1, dtype=torch.float64), random], 1)
        self.basis = torch.linalg.qr(seed_matrix)[0][:, 1:].T                 # [feature, d_model]
        distance = torch.arange(self.size["pos"], dtype=torch.float64)      # position codes: rows of
        self.codes = torch.linalg.cholesky(config.pos_overlap ** (distance[:, None] - distance).abs())
        self.gpt2_config = gpt2.GPT2Config(n_positions=config.n_positions, n_embd=config.n_embd,
                                           n_layer=config.n_layer, n_head=config.n_head,
                                           n_inner=config.n_inner)
        # Everything not written below stays 0: idle heads, MLPs and biases; LayerNorms are identities.
        self.state = {key: torch.full_like(value, float("ln_" in key and key.endswith(".weight")),
                                           dtype=torch.float64)
                      for key, value in gpt2.GPT2(self.gpt2_config).state_dict().items()}

    def score(self, per_position):  # code_i^T M code_j = per_position[i, j]
        return torch.linalg.inv(self.codes) @ per_position @ torch.linalg.inv(self.codes).T

    def map(self, per_position):    # code_i M = sum_j per_position[i, j] code_j
        return torch.linalg.inv(self.codes) @ per_position @ self.codes

    def embeddings(self):
        """Every token carries `bias`; names their code; BOS its flag; positions their code."""
        s, bias, size, generator = self.slices, self.config.bias_norm, self.size, self.generator
        tokens = torch.zeros(gpt2.GPT2Config.vocab_size, len(self.basis), dtype=torch.float64)
        tokens[:, s["bias"]] = bias
        tokens[:, s["other"]] = 0.3 * _unit_rows(len(tokens), size["other"], generator)
        names = [name_token(name) for name in NAMES]
        tokens[names, s["other"]], tokens[names, s["is_name"]] = 0, 1
        tokens[names, s["name_key"]] = _unit_rows(len(names), size["name_key"], generator)
        tokens[names, s["name_rest"]] = _unit_rows(len(names), size["name_rest"], generator)
        tokens[gpt2.BOS_TOKEN_ID] = 0
        tokens[gpt2.BOS_TOKEN_ID, s["bias"]], tokens[gpt2.BOS_TOKEN_ID, s["bos"]] = bias, 1
        positions = torch.zeros(self.config.n_positions, len(self.basis), dtype=torch.float64)
        positions[1:, s["pos"]] = self.codes[:self.config.n_positions - 1]
        self.state["wte.weight"] = tokens @ self.basis
        self.state["wpe.weight"] = positions @ self.basis

    def head(self, layer, head, scores, outputs, word=0.0):
        d, d_head, basis, g = self.config.n_embd, self.d_head, self.basis, self.generator
        leak = self.config.leak
        W_Q, W_K, W_V = (torch.zeros(len(basis), d_head, dtype=torch.float64) for _ in range(3))
        W_O = torch.zeros(d_head, len(basis), dtype=torch.float64)          # Q, K, V: [feature, d_head]
        def eye(gain, rows, cols):  # a number times the identity, or a matrix
            is_number = isinstance(gain, (int, float))
            return gain * torch.eye(rows, cols, dtype=torch.float64) if is_number else gain
        coord = 0
        for query, key, gain, *scale in scores:
            n, scale = self.size[key], (scale or [1.0])[0]
            W_Q[self.slices[query], coord:coord + n] = eye(gain, self.size[query], n) / scale
            W_K[self.slices[key], coord:coord + n] = eye(scale, n, n)
            coord += n
        assert coord <= d_head, f"L{layer}H{head}: {coord} score coordinates > d_head"
        sources, coord = {}, 0
        for source, target, gain, *scale in outputs:
            n, scale = self.size[source], (scale or [1.0])[0]
            if source not in sources:
                W_V[self.slices[source], coord:coord + n] = eye(scale, n, n)
                sources[source], coord = coord, coord + n
            rows = slice(sources[source], sources[source] + n)
            W_O[rows, self.slices[target]] += eye(gain, n, self.size[target]) / scale
        assert coord <= d_head, f"L{layer}H{head}: {coord} value coordinates > d_head"
        # Spare value coordinates carry a little of the position, and `word` x the attended word's code,
        # written nowhere; q, k, v read a little of the words around.
        spare = d_head - coord
        W_V[self.slices["pos"], coord:] = 0.4 * leak * torch.randn(
            self.size["pos"], spare, generator=g, dtype=torch.float64) / math.sqrt(spare + 1)
        W_V[self.slices["other"], coord:] = word * torch.eye(self.size["other"], spare)
        for W in (W_Q, W_K, W_V):
            W[self.slices["other"]] += leak * torch.randn(
                self.size["other"], d_head, generator=g, dtype=torch.float64) / math.sqrt(d_head)
        # Attention divides q.k by sqrt(d_head); the query undoes it so scores are as written.
        columns = slice(head * d_head, (head + 1) * d_head)
        c_attn = self.state[f"h.{layer}.attn.c_attn.weight"]                 # [d_model, 3 d_model]: q | k | v
        c_attn[:, columns] = basis.T @ W_Q * math.sqrt(d_head)
        c_attn[:, d:][:, columns] = basis.T @ W_K
        c_attn[:, 2 * d:][:, columns] = basis.T @ W_V
        self.state[f"h.{layer}.attn.c_proj.weight"][columns] = W_O @ basis   # rows: this head's z

    def position_name_mlp(self, layer):
        """At names, f_k = E(a_k + b_k) - E(a_k - b_k), E(x) = gelu(x) + gelu(-x), of a random reading a_k of
        the name and b_k(p) = cos(pi p / 2 + phi_k): odd in a and in b (b(p + 2) = -b(p)), so no part depends
        on the name or the position alone. Written along unused positions' codes, which no match reads."""
        config, s, g, n_pos = self.config, self.slices, self.generator, self.size["pos"]
        n_features, half = config.n_inner // 4, config.n_tail // 2
        a = 1.5 * torch.randn(self.size["name_key"], n_features, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(n_features, generator=g, dtype=torch.float64)
        b = 1.5 * torch.cos(math.pi / 2 * torch.arange(1, n_pos + 1, dtype=torch.float64)[:, None] + phase)
        W_in = torch.zeros(len(self.basis), config.n_inner, dtype=torch.float64)  # [feature, hidden]
        for unit, (sign_a, sign_b) in enumerate(((1, 1), (-1, -1), (1, -1), (-1, 1))):
            W_in[s["name_key"], unit::4] = sign_a * a
            W_in[s["pos"], unit::4] = torch.linalg.inv(self.codes) @ (sign_b * b)  # code_p . column = b(p)
        W_in[s["is_name"]] = 20.0                                            # silent but at names: bias - 20
        first_tail = self.codes[n_pos - 2 * half:n_pos - half]                # [half, pos]
        directions = config.mlp_gain * _unit_rows(n_features, half, g) @ first_tail
        W_out = torch.zeros(config.n_inner, len(self.basis), dtype=torch.float64)  # [hidden, feature]
        W_out[:, s["pos"]] = torch.stack([directions, directions, -directions, -directions], 1).flatten(0, 1)
        self.state[f"h.{layer}.mlp.c_fc.weight"] = self.basis.T @ W_in
        self.state[f"h.{layer}.mlp.c_fc.bias"] = torch.full((config.n_inner,), -20.0, dtype=torch.float64)
        self.state[f"h.{layer}.mlp.c_proj.weight"] = W_out @ self.basis


def build_ioi_model(config=None):
    """The embedded default: GPT-2's IOI circuit written into a 5-layer GPT-2 (see above)."""
    config = config or CircuitConfig()
    writer = CircuitWriter(config)
    s, bias, n_pos, half = writer.slices, config.bias_norm, writer.size["pos"], config.n_tail // 2
    writer.embeddings()
    # Per-position matrices: pos i (row) -> pos i - 1; positions in use; the tail's first half -> second.
    previous = torch.diag(torch.ones(n_pos - 1, dtype=torch.float64), -1)
    live = torch.diag((torch.arange(n_pos) < n_pos - config.n_tail).double())
    first, second = torch.zeros(2, n_pos, n_pos, dtype=torch.float64)
    first[n_pos - 2 * half:n_pos - half, n_pos - half:] = torch.eye(half)
    second[n_pos - half:, n_pos - half:] = torch.eye(half)
    fallback = ("bias", "bos", config.sink / bias)     # every query scores BOS at `sink`
    # Layer 0. Previous token: position i matches position i - 1; copy its name and a little of its word.
    writer.head(0, 0, [("pos", "pos", writer.score(config.match * previous)), fallback],
                [("name_key", "prev_name", 1.0), ("other", "other", config.context)])
    writer.position_name_mlp(0)
    # Layer 1. Induction: my name matches the previous name of s1 + 1; its position, shifted back, is s1's.
    # `bias / bias_norm - bos` is 1 but at BOS: BOS writes no `dup`.
    # Names are copied x 8 in v and z (/ 8 in W_O), so that they dominate those nodes as S does in GPT-2's.
    # Its value also keeps the word at s1 + 1 (what an induction head predicts) where W_O drops it.
    writer.head(1, 0, [("name_key", "prev_name", config.match), fallback],
                [("pos", "s1_pos", 0.5 * writer.map(live @ previous)), ("prev_name", "dup_name", 0.5, 8.0),
                 ("bias", "dup", 0.5 / bias), ("bos", "dup", -0.5)], word=config.word_value)
    # Duplicate token: same name, but not itself (same position cancels the match); as strong as BOS
    # give or take a random quadratic form of the name, so how much Pos it copies depends on S.
    n_key = writer.size["name_key"]
    form = torch.randn(n_key, n_key, generator=writer.generator, dtype=torch.float64)
    form = (config.sink + config.dt_spread) * torch.eye(n_key) + config.dt_spread * (form + form.T) / 2
    writer.head(1, 1, [("name_key", "name_key", form),
                       ("pos", "pos", writer.score(-config.match * live)), fallback],
                [("pos", "s1_pos", writer.map(0.5 * live + config.tail_copy * first)),
                 ("is_name", "dup", 0.5), ("name_key", "dup_name", 0.5, 8.0)])
    # Layer 2. S-inhibition: attend to the duplicate, copy which name it is and where it first was (the
    # position x 1.5 in v and z, / 1.5 in W_O: Pos stands out of their spread, as over-splitting needs).
    for head, (name_gain, position_gain) in enumerate(((0.55, 0.6), (0.55, 0.4))):
        writer.head(2, head, [("bias", "dup", config.match / bias), fallback],
                    [("dup_name", "si_name", name_gain, 8.0), ("s1_pos", "si_pos", position_gain, 1.5)])
    # Layers 3-4. Name movers: names score high, s2 higher, unless S-inhibition rules them out. Layer 3
    # is silent at name tokens (`end` only), so layer 4 reads the names' own codes there.
    inhibited = -config.inhibit_position * (live + config.query_tail * second)
    inhibit = writer.score(inhibited), config.key_pos_scale
    for layer, head, gain in ((3, 0, 0.5), (3, 1, 0.45), (4, 0, 1.2)):
        late = layer == 4
        duplicate, token = (config.late_duplicate_bonus, config.late_inhibit) if late else (
            config.duplicate_bonus, config.inhibit_token)
        writer.head(layer, head, ([] if late else [("is_name", "is_name", -config.name_bonus)])
                    + [("bias", "is_name", config.name_bonus / bias), ("bias", "dup", duplicate / bias),
                       ("si_pos", "pos", *inhibit), ("si_name", "name_key", -token, 2.0 if late else 3.0)],
                    [("name_key", "name_key", gain), ("name_rest", "name_rest", gain)]
                    + ([("is_name", "is_name", config.name_logit * gain)] if late
                       else [("name_key", "si_name", -config.io_s_ratio / 2)]))
    # Logits: ln_f's bias removes `bias`, which every (tied) unembedding shares: logits sit near 0.
    writer.state["ln_f.weight"] = torch.full((config.n_embd,), config.logit_scale, dtype=torch.float64)
    writer.state["ln_f.bias"] = -config.logit_scale * bias * writer.basis[s["bias"]][0]
    model = gpt2.GPT2(writer.gpt2_config)
    model.load_state_dict({key: value.float() for key, value in writer.state.items()})
    model.circuit_config = config  # for `true_features`
    return model.eval()


# The heads written above, by class: what `discover` should find in the embedded model.
EMBEDDED_HEADS = {"name mover": ((3, 0), (3, 1), (4, 0)), "S-inhibition": ((2, 0), (2, 1)),
                  "induction": ((1, 0),), "duplicate token": ((1, 1),), "previous token": ((0, 0),)}
_ATTENDS = {"name mover": "io", "S-inhibition": "s2", "induction": "s1+1", "duplicate token": "s1"}


def true_features(model, node):
    """{attribute: [n_values, d]}: the directions written at `node` per IO, S and Pos value (None: another
    model, an idle head, a residual node): the head's read (z: W_V where it attends) of the circuit's blocks,
    centred; Pos at 3 and 5. Left out: the MLP code, leaks, attention < 1 (no IO/S/Pos dictionary has any)."""
    config = getattr(model, "circuit_config", None)
    roles = {head: role for role, heads in EMBEDDED_HEADS.items() for head in heads}
    if config is None or node.act not in HEAD_ACTS or (node.layer, node.head) not in roles:
        return None
    writer = CircuitWriter(config)
    s, basis, layer = writer.slices, writer.basis.float(), node.layer
    names = model.wte.weight[[name_token(n) for n in NAMES]].detach() @ basis.T      # [name, feature]
    at = torch.tensor([[3, 5, 6], [5, 3, 4]])                              # [Pos, (io, s1, s1+1)]
    positions = model.wpe.weight[at].detach() @ basis.T                     # [Pos, 3, feature]

    def moved(codes, source, target, gain=1.0):   # a block's values, written to another block
        out = torch.zeros_like(codes)
        out[..., s[target]] = gain * codes[..., s[source]]
        return out
    position = _ATTENDS[roles[node.layer, node.head]] if node.act == "z" else node.position
    found = {"io": {"io": names, "pos": positions[:, 0]}, "s1": {"s": names, "pos": positions[:, 1]},
             "s1+1": {"s": moved(names, "name_key", "prev_name"), "pos": positions[:, 2]},
             "s2": {"s": names + moved(names, "name_key", "dup_name") * (layer >= 2),
                    "pos": moved(positions[:, 1], "pos", "s1_pos") * (layer >= 2)},
             "end": {"s": moved(names, "name_key", "si_name") * (layer >= 3),
                     "pos": moved(positions[:, 1], "pos", "si_pos") * (layer >= 3)}}[position]
    if position == "end" and layer >= 4:  # the name movers' copy of the IO name (gains 0.5 + 0.45)
        found["io"] = (0.95 * (moved(names, "name_key", "name_key") + moved(names, "name_rest", "name_rest"))
                       - moved(names, "name_key", "si_name", config.io_s_ratio))
    start = config.n_embd * HEAD_ACTS.index(node.act.replace("z", "v")) + node.head * writer.d_head
    read = model.h[node.layer].attn.c_attn.weight.detach()[:, start:start + writer.d_head]  # [d, d_head]
    out = {attribute: (codes @ basis) @ read for attribute, codes in found.items()}
    return {attribute: values - values.mean(0) for attribute, values in out.items()
            if values.std(0).sum() > 1e-3}


def default_model():
    """The embedded default model (built in a few seconds; nothing to download or train)."""
    return build_ioi_model()


# --- the nodes an SAE from elsewhere reads (`main.py grade-sae`), from TransformerLens's hook names

def hook_reads(hook_name, head, d_in, config):
    """(act, layer, head) that an SAE reads, from cfg.json's hook_name and hook_head_index, checked against
    the model: one head's q|k|v|z, all heads concatenated (head None), or the residual stream."""
    match = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.hook_([qkvz])|hook_(resid_pre|resid_mid|resid_post))",
                         str(hook_name))
    if match is None:
        raise ValueError(f"hook_name={hook_name!r}: grade-sae reads blocks.L.attn.hook_q|k|v|z "
                         "(hook_head_index: one head, or none for all) or blocks.L.hook_resid_*")
    layer, act = int(match[1]), match[2] or match[3]
    if layer >= config.n_layer:
        raise ValueError(f"hook_name={hook_name!r}: the model has {config.n_layer} layers")
    if head is not None and (act in RESIDUAL_ACTS or not 0 <= head < config.n_head):
        raise ValueError(f"hook_head_index={head!r} with {hook_name}: the model has "
                         f"{config.n_head} heads, the residual stream none")
    expected = config.d_head if head is not None else config.n_embd
    if d_in != expected:
        where = hook_name + ("" if head is None else f" head {head}")
        raise ValueError(f"d_in={d_in}: {where} of this model has {expected} values")
    return act, layer, head


def sections_read(sections, act, layer, head):
    """The cross-sections as an SAE reading (act, layer, head) sees them: each node becomes the SAE's node
    that reads it, if any; sections that map to the same nodes are graded once, for all their attributes."""
    def reads(node):
        if act in RESIDUAL_ACTS:  # resid_pre@L feeds layer L's heads on; resid_mid and resid_post the next's
            return node.layer >= layer + (act != "resid_pre")
        return (node.act, node.layer) == (act, layer) and head in (None, node.head)

    merged = {}
    for section in sections:
        nodes = tuple(dict.fromkeys(Node(act, layer, head, n.position) for n in section.nodes if reads(n)))
        if nodes:
            names, attributes = merged.get(nodes, ([], []))
            merged[nodes] = (names + [section.name], attributes + list(section.attributes))
    sae = f"{act}@L{layer}" + ("" if head is None else f"H{head}")
    return [CrossSection(f"{' + '.join(names)} [{sae}]", nodes, tuple(a for a in ATTRIBUTES if a in attrs))
            for nodes, (names, attrs) in merged.items()]


def check_reads_prompts(model, prompts, name="the model"):
    """A ValueError unless `model` reads GPT-2's whole vocabulary and positions up to the longest prompt."""
    longest = max(len(prompt.tokens) for prompt in prompts)
    if model.config.vocab_size <= gpt2.BOS_TOKEN_ID:
        raise ValueError(f"{name}'s vocabulary ({model.config.vocab_size} tokens) is smaller "
                         f"than GPT-2's ({gpt2.BOS_TOKEN_ID + 1}), whose tokens make the prompts")
    if longest > model.config.n_positions:
        raise ValueError(f"{name} reads at most {model.config.n_positions} tokens "
                         f"(n_positions), but a prompt has {longest}")
