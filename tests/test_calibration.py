"""Trees shaped by measured acceptance: the calibration learns what the LLM accepts, deep chains grow
where the SSM is reliably right, ``max_depth`` caps depth, and output stays exactly the LLM's."""

from __future__ import annotations

import copy
import random

import pytest

from offload_infer.calibration import AcceptanceCalibration
from offload_infer.engine import Engine
from offload_infer.speculate import TreeConfig
from offload_infer.stats import GenerationStats
from offload_infer.tree import TokenTree
from tests.conftest import assert_outputs_follow, joint_distribution
from weights.load import load_model
from weights.resolve import resolve

PROMPT = [5, 17, 42, 7, 99, 3]


def test_calibration_learns_a_planted_acceptance_curve():
    """Synthetic verification records where a token of SSM probability q is accepted with probability
    sqrt(q) after a confident parent and q / 2 after the root: the estimates find both curves."""
    rng = random.Random(0)
    cal = AcceptanceCalibration()
    for _ in range(60_000):
        q = rng.random()
        if rng.random() < 0.5:
            cal.record(q, 0.97, rng.random() < q**0.5)
        else:
            cal.record(q, None, rng.random() < q / 2)
    for q in (0.05, 0.25, 0.45, 0.65, 0.85):
        assert cal.estimate(q, 0.97) == pytest.approx(q**0.5, abs=0.06), q
        assert cal.estimate(q, None) == pytest.approx(q / 2, abs=0.06), q
    assert AcceptanceCalibration().estimate(0.3, None) == pytest.approx(0.3)  # no records: the SSM's own figure


def test_observe_counts_the_children_of_accepted_nodes_only():
    """root -> a (0.9) -> c (0.8), a -> d (0.1); root -> b (0.1) -> e (0.7). Accepted: a, then the LLM
    picked d's token as its next: trials are a, b (root's children) and c, d (a's); e says nothing."""
    t = TokenTree.root(0)
    a, b = t.add(1, 0, 0.9), t.add(2, 0, 0.1)
    t.add(3, a, 0.8), t.add(4, a, 0.1), t.add(5, b, 0.7)
    cal = AcceptanceCalibration()
    seen = []
    cal.record = lambda q, parent_q, ok: seen.append((q, parent_q, ok))  # type: ignore[method-assign]
    cal.observe(t, [1, 4])
    assert seen == [(0.9, None, True), (0.1, None, False), (0.8, 0.9, False), (0.1, 0.9, True)]


@pytest.fixture(scope="module")
def sharp(tiny_dirs):
    """The tiny llama with its head scaled up: its next-token distribution is nearly one-hot."""
    model = copy.deepcopy(load_model(resolve(str(tiny_dirs["llama"][0])), progress=False).model)
    model.weights.globals["lm_head.weight"].mul_(2000.0)
    return model


@pytest.mark.parametrize("calibrated", [True, False])
def test_a_reliable_ssm_grows_a_chain_of_the_whole_budget(sharp, calibrated):
    """The LLM as its own SSM: a budget of 64 becomes a 64-deep chain (no depth cap, and the processing
    cap does not cut it: siblings far below the chain are never expanded), and each full pass yields 65
    tokens; the output equals incremental decoding."""
    ref = [t for step in Engine(sharp, [], max_sequence_length=256).generate(PROMPT, 200) for t in step]
    stats = GenerationStats()
    # whole trees: here a drafting round costs about what a pass does, which weighing rounds would count
    engine = Engine(sharp, [sharp], TreeConfig(budget=64, calibrated=calibrated, weigh_rounds=False),
                    max_sequence_length=256)
    out = [t for step in engine.generate(PROMPT, 200, stats=stats) for t in step]
    assert out == ref
    assert stats.tokens_per_pass[:3] == [65, 65, 65], stats.tokens_per_pass
    assert stats.tree_sizes[:3] == [64, 64, 64]
    assert max(stats.ssm_calls[:3]) <= 66  # a level per round: the prompt's forward, 64 levels, one more


def test_a_fixed_budget_stops_growing_when_rounds_cost_more_than_they_bring(sharp, monkeypatch):
    """With drafting rounds made far dearer than the LLM's pass, a fixed budget's growth stops once the
    measured costs say another level lowers the expected tokens per second (``weigh_rounds``, the
    default): shallower trees, fewer SSM forwards a pass than whole trees, and the same output."""
    import time

    from offload_infer.speculate import Drafter

    real = Drafter._launch

    def slow(self, states, asks):
        time.sleep(0.05)
        return real(self, states, asks)

    monkeypatch.setattr(Drafter, "_launch", slow)
    ref = [t for step in Engine(sharp, [], max_sequence_length=256).generate(PROMPT, 60) for t in step]
    calls = {}
    for weigh in (False, True):
        stats = GenerationStats()
        engine = Engine(sharp, [sharp], TreeConfig(budget=16, weigh_rounds=weigh), max_sequence_length=256)
        assert [t for step in engine.generate(PROMPT, 60, stats=stats) for t in step] == ref
        calls[weigh] = stats.ssm_calls
    assert min(calls[False][:-1]) >= 16, calls  # a level per round, the whole budget deep (the last: what is left)
    assert max(calls[True][2:]) <= 8, calls  # once both costs are measured (after two passes)


def test_max_depth_caps_the_tree(sharp):
    stats = GenerationStats()
    ref = [t for step in Engine(sharp, [], max_sequence_length=256).generate(PROMPT, 40) for t in step]
    engine = Engine(sharp, [sharp], TreeConfig(budget=64, max_depth=5), max_sequence_length=256)
    assert [t for step in engine.generate(PROMPT, 40, stats=stats) for t in step] == ref
    assert max(stats.tokens_per_pass) == 6  # 5 accepted + the bonus token


def test_calibrated_trees_are_lossless(tiny_dirs):
    """A random SSM against the LLM, trees of budget 8 shaped by the calibration as it learns: greedy
    output is the LLM's own, and sampled outputs (top-k 2, four tokens: three of them from verified
    trees of depth 2 and their bonus tokens) follow the LLM's own joint distribution (chi-square)."""
    from offload_infer.sampling import SamplingParams

    llm = load_model(resolve(str(tiny_dirs["llama"][0])), progress=False).model
    ssm = load_model(resolve(str(tiny_dirs["qwen2"][0])), progress=False).model
    ref = [t for step in Engine(llm, [], max_sequence_length=256).generate(PROMPT, 60) for t in step]
    engine = Engine(llm, [ssm], TreeConfig(budget=16), max_sequence_length=256)
    assert [t for step in engine.generate(PROMPT, 60) for t in step] == ref
    assert engine.drafters[0].calibration.records > 0

    n, new = 3000, 4
    params = dict(max_new_tokens=new, temperature=1.0, top_k=2, ignore_eos=True)
    expected = joint_distribution(llm, PROMPT, new, SamplingParams(**params).sampling)
    engine = Engine(llm, [ssm], TreeConfig(budget=8), max_sequence_length=64, max_batch_size=64, max_batch_tokens=1024)
    ids = [engine.add_request(PROMPT, SamplingParams(**params, seed=s)) for s in range(n)]
    while engine.has_unfinished():
        engine.step()
    assert engine.drafters[0].calibration.records > 1000
    assert_outputs_follow([tuple(engine.sequence(i).output) for i in ids], expected)


def test_growth_weighs_a_level_against_the_cost_of_a_drafting_round(sharp):
    """With the measured cost of a drafting round (as a fraction of the LLM pass), best-first growth stops
    when another level would lower tokens per second: a chain the SSM is sure of goes on while a round costs
    little, stops earlier as rounds cost more, and stops after one level when a round costs two passes."""
    from offload_infer.speculate import Drafter

    depths = {}
    for cost in (None, 0.001, 0.2, 2.0):
        d = Drafter(sharp, sharp.vocab_size, TreeConfig(budget=64), 64, 16)
        st = d.admit(200, PROMPT)
        tree = d.draft([st], [100], [64], level_cost=cost)[0]
        depths[cost] = (max(tree.depths), st.calls)
    assert depths[None] == depths[0.001] == (64, 65)  # the backlog's forward, then 64 levels
    assert depths[2.0] == (2, 2)
    assert 2 < depths[0.2][0] <= 64
