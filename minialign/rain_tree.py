"""RAIN's search tree without a model: nodes and the pure rules that read and update them.

Everything here is arithmetic on visit counts, values, priors and embeddings (read from the hidden
states the model side stored on each node), so each rule can be checked on a hand-built tree. The
model-facing part (candidate chains, rollouts, caches) is in ``rain_proposer.py``, the
self-evaluation in ``rain_judge.py``, and the loop that ties them together, in the order of the
paper's Algorithm 1, in ``rain.py``.

Paper: Li et al., "RAIN: Your Language Models Can Align Themselves without Finetuning", ICLR 2024.
Official code: https://github.com/SafeAILab/RAIN (``HH/main.py``, ``HH/nodes.py``; function names
below are theirs, e.g. ``node.getqu`` for the PUCT score).
"""
import math

import torch
import torch.nn.functional as F


class Node:
    """A token set (a short run of tokens) in the context of everything above it.

    Search statistics: ``n`` visits (real visits plus the fractional visits of the similarity update),
    ``real_visits`` (official ``fn``), ``q`` mean score in [-1, 1], ``embedding`` running mean of the embeddings of the
    texts evaluated through this node. ``raw_prior`` is the candidate's unnormalised probability (the
    token's probability, or the product of a chain's token probabilities); ``prior`` is what PUCT uses.
    ``state`` is whatever the model side keeps for the node (keys/values, hidden states, logits).
    """

    def __init__(self, tokens: list[int], raw_prior: float, parent: "Node | None" = None,
                 terminal: bool = False, state=None):
        self.tokens, self.raw_prior, self.parent, self.terminal, self.state = tokens, raw_prior, parent, terminal, state
        self.depth = 0 if parent is None else parent.depth + 1  # absolute: not reset when the root moves on
        self.prior = raw_prior
        self.children: list[Node] = []
        self.n, self.real_visits, self.q = 0.0, 0, 0.0
        self.embedding: torch.Tensor | None = None

    def path_from(self, ancestor: "Node") -> list["Node"]:
        """Nodes from ``ancestor`` (inclusive) down to this node."""
        path, node = [], self
        while node is not ancestor:
            path.append(node)
            node = node.parent
        return [ancestor] + path[::-1]


# --- selection (paper Eq. 1; official node.getqu) --------------------------------------------------

def puct(child: Node, parent: Node, c: float, sibling_visits: bool = False) -> float:
    """PUCT score of ``child``: qhat + c * p * sqrt(N) / (1 + n).

    qhat = (q + 1) / 2 maps the value to [0, 1] (official: fixed bounds [-1, 1]) and is 0 for a child
    never visited (official code). N is ``parent.n`` (official code) or, with ``sibling_visits``, the sum
    of the siblings' visits (the paper's Eq. 1)."""
    qhat = (child.q + 1) / 2 if child.n > 0 else 0.0
    total = sum(s.n for s in parent.children) if sibling_visits else parent.n
    return qhat + c * child.prior * math.sqrt(total) / (1 + child.n)


def select_child(node: Node, c: float, sibling_visits: bool = False) -> Node:
    """The child with the highest PUCT score (the first one on ties, as Python's ``max``)."""
    return max(node.children, key=lambda child: puct(child, node, c, sibling_visits))


# --- backup (official node.backup) and the similarity update (paper Eq. 2) -------------------------

def backup(path: list[Node], score: float, embeddings: list[torch.Tensor], gamma: float, threshold: float,
           similarity: bool = True) -> tuple[int, int]:
    """Back the score ``s`` up the path (root first): for every node n += 1, real_visits += 1, q += (s - q) / n.

    ``embeddings[i]`` is the embedding of the text evaluated through ``path[i + 1]`` (from that node's
    tokens to the end of the rollout); each node keeps their running mean over its real visits and,
    with ``similarity``, shares the score with siblings whose embedding is close (Eq. 2). Returns the
    number of sibling pairs compared and of those similar enough to share."""
    compared = similar = 0
    for node, e in zip(path[1:], embeddings):
        node.n += 1
        node.real_visits += 1
        node.embedding = e if node.embedding is None else node.embedding + (e - node.embedding) / node.real_visits  # (C,)
        if similarity:
            pairs, shared = share_with_similar_siblings(node, score, gamma, threshold)
            compared, similar = compared + pairs, similar + shared
        node.q += (score - node.q) / node.n
    root = path[0]
    root.n += 1
    root.real_visits += 1
    root.q += (score - root.q) / root.n
    return compared, similar


def share_with_similar_siblings(node: Node, score: float, gamma: float, threshold: float) -> tuple[int, int]:
    """RAIN Eq. 2: every sibling with an embedding and cosine similarity sim >= threshold to ``node``
    gets a fractional visit gamma * sim carrying the score: n' = n + gamma sim,
    q' = (q n + gamma sim s) / n'. Returns (siblings compared, siblings updated)."""
    compared = similar = 0
    for sib in node.parent.children:
        if sib is node or sib.embedding is None:
            continue
        sim = float(F.cosine_similarity(node.embedding, sib.embedding, dim=0))  # of two (C,) embeddings
        compared += 1
        if sim >= threshold:
            similar += 1
            n_old = sib.n
            sib.n += gamma * sim
            sib.q = (sib.q * n_old + gamma * sim * score) / sib.n
    return compared, similar


def continuation_embeddings(path: list[Node], tail_hidden: torch.Tensor) -> list[torch.Tensor]:
    """The texts Eq. 2 compares: for each node below ``path[0]`` (the search root), the embedding of the
    text from its tokens to the end of the evaluated text, its final hidden states (each node's
    ``state.hidden`` (L, C), then the rollout's ``tail_hidden`` (n, C)) mean-pooled and L2-normalised.

    The paper embeds that text with Sentence-BERT (all-MiniLM-L6-v2); offline there is none, so the
    model's own hidden states stand in: they come free with the forward passes that made the tokens."""
    hidden = torch.cat([n.state.hidden for n in path[1:]] + [tail_hidden], 0)  # (T, C)
    suffix = hidden.flip(0).cumsum(0).flip(0)  # (T, C): suffix[i] = sum of hidden[i:]
    out, offset = [], 0
    for node in path[1:]:
        out.append(F.normalize(suffix[offset] / (len(hidden) - offset), dim=-1))  # (C,) mean from the node on
        offset += len(node.tokens)
    return out


# --- priors (official main.py expansion and node.checkadd / node.add) -----------------------------

def add_children(node: Node, children: list[Node], is_root: bool, root_mix: float) -> list[Node]:
    """Attach new candidates (a duplicate of an existing child's tokens is dropped) and give each its
    prior: its raw prior normalised over all of the node's candidates, then at the search root mixed
    with uniform, p <- (1 - mix) p + mix / K (exploration at the root). Existing children keep theirs.

    For a first expansion that is the official expansion rule; for a dynamic addition it is official
    ``node.checkadd`` / ``node.add``: the added child gets its share of the nc + 1 candidates (it does
    not get prior 1). Returns the children actually added."""
    seen = {tuple(c.tokens) for c in node.children}
    new = []
    for child in children:
        if tuple(child.tokens) not in seen:
            seen.add(tuple(child.tokens))
            new.append(child)
    node.children += new
    total = sum(c.raw_prior for c in node.children) or 1.0
    for child in new:
        child.prior = child.raw_prior / total
        if is_root:
            child.prior = (1 - root_mix) * child.prior + root_mix / len(node.children)
    return new


def clamp_greedy_prior(greedy: float, sampled: list[float]) -> float:
    """Official expansion of multi-token sets: the greedy chain's prior is clamped to
    [max + min, sum] of the sampled chains' priors, so the greedy chain is tried first."""
    if not sampled:
        return greedy
    return max(min(greedy, sum(sampled)), max(sampled) + min(sampled))


def wants_addition(node: Node, max_children: int, add_norm: float) -> bool:
    """Dynamic node addition (official ``node.checkadd``): fewer than ``max_children`` children, at
    least two (the variance of one embedding is undefined), all of them evaluated, their embeddings
    nearly identical (norm of the per-dimension variance below ``add_norm`` * set length) and all of
    their values below 0: the search is stuck among alike, bad candidates."""
    kids = node.children
    if not 2 <= len(kids) < max_children or any(c.embedding is None for c in kids):
        return False
    spread = torch.stack([c.embedding for c in kids]).var(0).norm()
    return bool(spread < add_norm * len(kids[0].tokens)) and max(c.q for c in kids) < 0


# --- commit (official main.py outer loop; node.get_max_n_action) -----------------------------------

def best_child(root: Node) -> Node:
    """The most-visited child (ties: the higher value): what RAIN commits."""
    return max(root.children, key=lambda c: (c.n, c.q))


def ready_to_commit(root: Node, commit_visits: int, commit_value: float) -> bool:
    """RAIN's early stop: the most-visited child has more than T_m real visits and a value above V."""
    if not root.children:
        return False
    best = best_child(root)
    return best.real_visits > commit_visits and best.q > commit_value


def remix_after_commit(new_root: Node, root_mix: float) -> None:
    """The committed child becomes the root: its children's priors are mixed with uniform,
    p <- (1 - mix) p + mix / K, and renormalised (official main.py after a commit; the sum differs
    from 1 after dynamic additions)."""
    K = len(new_root.children)
    mixed = [(1 - root_mix) * c.prior + root_mix / K for c in new_root.children]
    for c, m in zip(new_root.children, mixed):
        c.prior = m / sum(mixed)
