"""RAIN's model-free rules on hand-built trees, against values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from minialign.rain_tree import (Node, add_children, backup, best_child, clamp_greedy_prior, puct,
                                 ready_to_commit, remix_after_commit, select_child,
                                 share_with_similar_siblings, wants_addition)


def tree(*children):
    """A root with children given as (prior, n, q) triples; root.n = 4."""
    root = Node([0], 1.0)
    root.n = root.real_visits = 4
    for i, (prior, n, q) in enumerate(children):
        child = Node([i + 1], prior, root)
        child.n, child.real_visits, child.q = n, int(n), q
        root.children.append(child)
    return root


def test_puct_by_hand():
    root = tree((0.1, 0, 0.0), (0.6, 1, 0.5), (0.3, 2, -1.0))
    a, b, c = root.children
    assert puct(a, root, 2.0) == pytest.approx(0 + 2 * 0.1 * 2 / 1)            # unvisited: qhat = 0
    assert puct(b, root, 2.0) == pytest.approx(0.75 + 2 * 0.6 * 2 / 2)         # qhat = (0.5 + 1) / 2
    assert puct(c, root, 2.0) == pytest.approx(0.0 + 2 * 0.3 * 2 / 3)
    assert puct(b, root, 2.0, sibling_visits=True) == pytest.approx(0.75 + 2 * 0.6 * math.sqrt(3) / 2)  # Eq. 1
    assert puct(b, root, 0.0) == pytest.approx(0.75)


def test_selection_trades_value_against_prior():
    root = tree((0.5, 0, 0.0), (0.2, 2, 1.0))  # a: 0 + 2 * .5 * 2 = 2.0; b: 1 + 2 * .2 * 2 / 3 = 1.267
    assert select_child(root, 2.0) is root.children[0]
    assert select_child(root, 0.5) is root.children[1]  # a: 0.5; b: 1 + 0.067
    assert select_child(root, 0.0) is root.children[1]  # no exploration: the value alone


def test_backup_by_hand():
    root = tree((0.5, 2, 0.5))
    a = root.children[0]
    b = Node([9], 1.0, a)
    a.children.append(b)
    e = F.normalize(torch.ones(4), dim=0)
    a.embedding = F.normalize(torch.tensor([1.0, 0, 0, 0]), dim=0)
    backup([root, a, b], -1.0, [e, e], gamma=0.2, threshold=0.95)
    assert (b.n, b.real_visits, b.q) == (1.0, 1, -1.0)                      # a first visit: q = s
    assert (a.n, a.real_visits) == (3.0, 3) and a.q == pytest.approx((0.5 * 2 - 1) / 3)
    assert a.embedding == pytest.approx((torch.tensor([1.0, 0, 0, 0]) * 2 + e) / 3)  # running mean over real visits
    assert (root.n, root.real_visits) == (5.0, 5) and root.q == pytest.approx(-1 / 5)


def test_similarity_update_follows_eq_2():
    root = tree((0.5, 0, 0.0), (0.3, 2, 0.5), (0.2, 1, 0.3))
    node, close, far = root.children
    node.embedding = F.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0)
    close.embedding = F.normalize(torch.tensor([1.0, 0.2, 0.05]), dim=0)
    far.embedding = torch.tensor([0.0, 0.0, 1.0])
    sim = float(node.embedding @ close.embedding)
    assert sim >= 0.95
    assert share_with_similar_siblings(node, -1.0, gamma=0.2, threshold=0.95) == (2, 1)
    assert close.n == pytest.approx(2 + 0.2 * sim)
    assert close.q == pytest.approx((0.5 * 2 + 0.2 * sim * -1.0) / (2 + 0.2 * sim))
    assert (far.n, far.q) == (1, 0.3)
    assert share_with_similar_siblings(node, -1.0, gamma=0.2, threshold=0.9999) == (2, 0)


def test_expansion_priors_normalise_and_mix_at_the_root():
    root = Node([0], 1.0)
    add_children(root, [Node([1], 0.3, root), Node([2], 0.1, root)], is_root=True, root_mix=0.25)
    assert [c.prior for c in root.children] == pytest.approx([0.75 * 0.75 + 0.125, 0.75 * 0.25 + 0.125])
    below = root.children[0]
    add_children(below, [Node([3], 0.3, below), Node([4], 0.1, below), Node([3], 0.5, below)], False, 0.25)
    assert [c.tokens for c in below.children] == [[3], [4]]  # the duplicate chain is dropped
    assert [c.prior for c in below.children] == pytest.approx([0.75, 0.25])


def test_an_added_child_gets_its_share_not_prior_one():
    root = Node([0], 1.0)
    add_children(root, [Node([1], 0.6, root), Node([2], 0.3, root)], is_root=True, root_mix=0.25)
    before = [c.prior for c in root.children]
    added = add_children(root, [Node([1], 0.6, root), Node([7], 0.1, root)], is_root=True, root_mix=0.25)
    assert [c.tokens for c in added] == [[7]]
    assert added[0].prior == pytest.approx(0.75 * 0.1 / 1.0 + 0.25 / 3)  # official checkadd: over nc + 1, mixed
    assert [c.prior for c in root.children[:2]] == pytest.approx(before)  # siblings keep theirs
    inner = root.children[0]
    add_children(inner, [Node([5], 0.2, inner), Node([6], 0.2, inner)], False, 0.25)
    new = add_children(inner, [Node([8], 0.1, inner)], False, 0.25)[0]
    assert new.prior == pytest.approx(0.1 / 0.5)


def test_priors_below_the_root_are_not_mixed():
    root = Node([0], 1.0)
    add_children(root, [Node([1], 2.0, root), Node([2], 6.0, root)], is_root=False, root_mix=0.25)
    assert [c.prior for c in root.children] == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("greedy, sampled, expected", [
    (0.9, [0.2, 0.1], 0.3),    # above the sum: clamped down to the sum
    (0.05, [0.2, 0.1], 0.3),   # below max + min (0.3): clamped up
    (0.05, [0.2, 0.1, 0.05], 0.25),  # max + min = 0.25 <= sum = 0.35
    (0.3, [0.2, 0.15, 0.1], 0.3),    # within [max + min, sum] = [0.3, 0.45]: kept
    (0.4, [], 0.4),
])
def test_greedy_prior_clamp(greedy, sampled, expected):
    assert clamp_greedy_prior(greedy, sampled) == pytest.approx(expected)


def stuck(n_children=3, set_length=1, q=-0.5, spread=0.0):
    root = Node([0], 1.0)
    for i in range(n_children):
        child = Node([i + 1] * set_length, 0.1, root)
        child.q, child.n, child.real_visits = q, 1, 1
        child.embedding = F.normalize(torch.ones(8), dim=0) + spread * torch.eye(8)[i % 8]
        root.children.append(child)
    return root


def test_addition_test_needs_every_condition():
    assert wants_addition(stuck(), 20, 0.03)
    assert not wants_addition(stuck(n_children=1), 20, 0.03)     # one child: variance undefined (official)
    assert not wants_addition(stuck(n_children=20), 20, 0.03)    # already max_children
    assert not wants_addition(stuck(q=0.0), 20, 0.03)            # not all values below 0
    high = stuck()
    high.children[1].q = 0.2
    assert not wants_addition(high, 20, 0.03)
    unvisited = stuck()
    unvisited.children[2].embedding = None
    assert not wants_addition(unvisited, 20, 0.03)
    # 3 embeddings, each bumped by s on its own axis: per-axis variance s^2 / 3, norm sqrt(3) s^2 / 3
    assert not wants_addition(stuck(spread=0.3), 20, 0.03)       # 0.052 > 0.03 * 1
    assert wants_addition(stuck(spread=0.3, set_length=2), 20, 0.03)  # 0.052 < 0.03 * 2: scales with the set


def test_commit_takes_the_most_visited_child_ties_by_value():
    root = tree((0.5, 3, 0.9), (0.3, 5, 0.1), (0.2, 5, 0.2))
    assert best_child(root) is root.children[2]


@pytest.mark.parametrize("real_visits, q, expected", [(7, 0.81, True), (6, 0.9, False), (7, 0.8, False), (9, 0.5, False)])
def test_stop_rule_is_strict_on_both_thresholds(real_visits, q, expected):
    root = tree((0.5, real_visits, q), (0.5, 1, 1.0))
    assert ready_to_commit(root, commit_visits=6, commit_value=0.8) is expected


def test_commit_remix_by_hand():
    root = Node([0], 1.0)
    root.children = [Node([1], 0.0, root), Node([2], 0.0, root), Node([3], 0.0, root)]
    for c, p in zip(root.children, (0.6, 0.3, 0.3)):  # sum 1.2, as after a dynamic addition
        c.prior = p
    remix_after_commit(root, 0.25)
    mixed = [0.75 * p + 0.25 / 3 for p in (0.6, 0.3, 0.3)]
    assert [c.prior for c in root.children] == pytest.approx([m / sum(mixed) for m in mixed])


def test_depth_is_absolute():
    root = Node([0], 1.0)
    child = Node([1], 1.0, root)
    assert (root.depth, child.depth, Node([2], 1.0, child).depth) == (0, 1, 2)


def test_selection_uses_parent_visits_unless_asked_for_eq_1():
    root = tree((0.9, 0, 0.0), (0.1, 1, 1.0))  # root.n = 4 but the siblings have 1 visit in all
    a, b = root.children                       # parent.n: a 2 * .9 * 2 = 3.6 > b 1 + .2 = 1.2
    assert select_child(root, 2.0) is a
    root.n = 100                               # Eq. 1 with sqrt(1): a 1.8 > b 1.1; parent.n = 100: a 18
    assert select_child(root, 0.5, sibling_visits=True) is b  # a: .45, b: 1 + .025
    assert select_child(root, 0.5) is a                       # a: 4.5, b: 1 + .25


def test_backup_shares_with_similar_siblings_and_counts_pairs():
    root = tree((0.5, 1, 0.0), (0.5, 1, 0.0), (0.5, 1, 0.0))
    node, twin, other = root.children
    e = F.normalize(torch.tensor([1.0, 1.0]), dim=0)
    twin.embedding, other.embedding = e.clone(), e.clone()
    assert backup([root, node], 0.5, [e], gamma=0.2, threshold=0.95) == (2, 2)  # similarity is on by default
    for sib in (twin, other):
        assert sib.n == pytest.approx(1.2) and sib.q == pytest.approx(0.2 * 0.5 / 1.2)
    assert backup([root, node], 0.5, [e], gamma=0.2, threshold=0.95, similarity=False) == (0, 0)


def test_similarity_threshold_is_inclusive():
    root = tree((0.5, 0, 0.0), (0.5, 1, 0.0))
    node, sib = root.children
    node.embedding = F.normalize(torch.tensor([1.0, 0.0]), dim=0)
    sib.embedding = F.normalize(torch.tensor([1.0, 0.3]), dim=0)
    sim = float(F.cosine_similarity(node.embedding, sib.embedding, dim=0))
    assert share_with_similar_siblings(node, 1.0, 0.2, threshold=sim) == (1, 1)


def test_a_childless_root_is_never_ready():
    assert not ready_to_commit(Node([0], 1.0), 6, 0.8)


# --- fractional visits: after Eq. 2 a node's visits n exceed its real visits, and each rule reads one ------

def fractional():
    """A root with real visits 5 and visits 5.6; children (prior, n, real visits, q) with n != real visits."""
    root = Node([0], 1.0)
    root.n, root.real_visits = 5.6, 5
    for i, (prior, n, real, q) in enumerate([(0.5, 2.4, 2, 0.5), (0.3, 2.0, 2, 0.1), (0.2, 1.2, 1, -0.2)]):
        child = Node([i + 1], prior, root)
        child.n, child.real_visits, child.q = n, real, q
        root.children.append(child)
    return root


def test_puct_counts_fractional_visits():
    root = fractional()
    a = root.children[0]
    assert puct(a, root, 2.0) == pytest.approx(0.75 + 2 * 0.5 * math.sqrt(5.6) / (1 + 2.4))  # n, not real visits
    assert puct(a, root, 2.0, sibling_visits=True) == pytest.approx(0.75 + 2 * 0.5 * math.sqrt(5.6) / 3.4)


def test_backup_steps_n_and_real_visits_by_one_and_averages_q_over_n_the_embedding_over_real_visits():
    root = fractional()
    a = root.children[0]
    a.embedding = torch.tensor([1.0, 0.0])
    e = torch.tensor([0.0, 1.0])
    backup([root, a], -1.0, [e], gamma=0.2, threshold=0.95, similarity=False)
    assert (a.n, a.real_visits) == (pytest.approx(3.4), 3)
    assert a.q == pytest.approx(0.5 + (-1.0 - 0.5) / 3.4)              # q += (s - q) / n
    assert a.embedding == pytest.approx(torch.tensor([2 / 3, 1 / 3]))  # a mean over the 3 real visits
    assert (root.n, root.real_visits) == (pytest.approx(6.6), 6) and root.q == pytest.approx(-1 / 6.6)


def test_eq_2_adds_to_a_siblings_fractional_visits():
    root = fractional()
    node, sib, _ = root.children
    node.embedding = sib.embedding = F.normalize(torch.tensor([1.0, 1.0]), dim=0)
    share_with_similar_siblings(node, 1.0, 0.2, 0.95)
    assert sib.n == pytest.approx(2.2) and sib.real_visits == 2          # n' = n + gamma sim; real visits unchanged
    assert sib.q == pytest.approx((0.1 * 2.0 + 0.2 * 1.0) / 2.2)       # q' = (q n + gamma sim s) / n'


def test_commit_and_stop_rule_pick_by_visits_and_test_real_visits():
    root = Node([0], 1.0)
    for prior, n, real, q in [(0.5, 7.5, 6, 0.9), (0.5, 7.0, 7, 0.9)]:  # the first has the most visits, fewer real ones
        child = Node([len(root.children) + 1], prior, root)
        child.n, child.real_visits, child.q = n, real, q
        root.children.append(child)
    assert best_child(root) is root.children[0]                        # the most visits n
    assert not ready_to_commit(root, commit_visits=6, commit_value=0.8)  # its real visits (6) are not > T_m
    root.children[0].real_visits = 7
    assert ready_to_commit(root, commit_visits=6, commit_value=0.8)
