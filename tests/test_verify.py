"""The verifier on hand-made trees, with no model, and a distribution test of lossless sampling."""

from __future__ import annotations

import math

import torch

from offload_infer.sampling import SamplingConfig, probs_from_logits
from offload_infer.tree import TokenTree
from offload_infer.verify import verify

V = 6


def onehot_logits(tokens: list[int]) -> torch.Tensor:
    out = torch.full((len(tokens), V), -10.0)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return out


def example_tree() -> TokenTree:
    t = TokenTree.root(5)
    a = t.add(1, 0)  # 1
    t.add(2, 0)  # 2
    c = t.add(3, a)  # 3
    t.add(4, a)  # 4
    t.add(0, c)  # 5
    return t


def test_greedy_accepts_longest_matching_path():
    tree = example_tree()
    # argmax at each node: root->1 (in tree), node1->3 (in tree), node3->0 (in tree), node5->4 (bonus)
    logits = onehot_logits([1, 3, 0, 0, 0, 4])
    path, nxt = verify(tree, logits, SamplingConfig())
    assert path == [0, 1, 3, 5] and nxt == 4


def test_greedy_rejects_at_root_and_midway():
    tree = example_tree()
    path, nxt = verify(tree, onehot_logits([4, 0, 0, 0, 0, 0]), SamplingConfig())
    assert path == [0] and nxt == 4
    path, nxt = verify(tree, onehot_logits([2, 3, 1, 2, 0, 0]), SamplingConfig())
    assert path == [0, 2] and nxt == 1  # sibling branch accepted, then the LLM's own token


def test_merge_keeps_each_distinct_path_once():
    t1 = example_tree()
    t2 = TokenTree.root(5)
    x = t2.add(1, 0)
    t2.add(4, x)  # already in t1
    t2.add(5, x)  # new
    t2.add(3, 0)  # new
    t1.merge(t2)
    paths = {tuple(t1.tokens[i] for i in t1.path(n)) for n in range(len(t1))}
    assert len(paths) == len(t1) == 8
    assert (5, 1, 5) in paths and (5, 3) in paths


def test_attention_mask_sees_prefix_and_ancestors():
    tree = example_tree()
    assert tree.token_tensor().tolist() == [5, 1, 2, 3, 4, 0]
    assert tree.parent_tensor().tolist() == [-1, 0, 0, 1, 1, 3]
    assert tree.depth_tensor().tolist() == [0, 1, 1, 2, 2, 3]
    m = tree.attention_mask(3)
    assert m.shape == (6, 9) and m[:, :3].all()
    assert m[5, 3:].tolist() == [True, True, False, True, False, True]
    assert m[2, 3:].tolist() == [True, False, True, False, False, False]


# -- sampling: the output distribution equals the LLM's ----------------------------------------------
def llm_dist(prefix: tuple[int, ...]) -> torch.Tensor:
    """A fixed 'LLM': a distinct, skewed next-token distribution for every prefix."""
    g = torch.Generator().manual_seed(hash(prefix) % (2**31))
    return torch.softmax(torch.randn(V, generator=g) * 1.5, -1)


def joint_counts(verifier, n: int, seed: int) -> torch.Tensor:
    tree = example_tree()
    prefixes = [tuple(tree.tokens[i] for i in tree.path(node))[1:] for node in range(len(tree))]
    logits = torch.stack([llm_dist(p).log() for p in prefixes])
    cfg = SamplingConfig(temperature=1.0)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        path, nxt = verifier(tree, logits, cfg, gen)
        out = [tree.tokens[i] for i in path[1:]] + [nxt]
        if len(out) < 2:  # the next pass would sample the second token from the LLM at (t1,)
            out.append(int(torch.multinomial(llm_dist((out[0],)), 1, generator=gen)))
        counts[out[0], out[1]] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor) -> float:
    n = counts.sum()
    expected = torch.stack([llm_dist(())[a] * llm_dist((a,)) for a in range(V)]) * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = V * V - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def biased_verify(tree, logits, cfg, gen):
    """A wrong verifier: accepts any child the LLM gives at least 15%, which over-weights tree tokens."""
    path = [0]
    while True:
        p = probs_from_logits(logits[path[-1]], cfg)
        good = [c for c in tree.children(path[-1]) if p[tree.tokens[c]] >= 0.15]
        if not good:
            return path, int(torch.multinomial(p, 1, generator=gen))
        path.append(good[0])


def test_sampling_is_lossless_chi_square():
    counts = joint_counts(verify, 100_000, seed=0)
    assert chi_square_pvalue(counts) > 1e-3


def test_chi_square_catches_a_biased_verifier():
    counts = joint_counts(biased_verify, 100_000, seed=0)
    assert chi_square_pvalue(counts) < 1e-6


def test_top_k_top_p_processing():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = probs_from_logits(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (p[2:] == 0).all() and math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)
    full = logits.softmax(-1)
    p = probs_from_logits(logits, SamplingConfig(temperature=1.0, top_p=float(full[0] + full[1] * 0.5)))
    assert (p[:2] > 0).all() and (p[2:] == 0).all()
