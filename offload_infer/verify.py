"""Verification of a token tree against the LLM's logits at every node; pure functions, no model.

Greedy: follow the child equal to the LLM's argmax while there is one (the longest path whose every
token is what the LLM would have chosen), then append the LLM's own next token.

Sampling: at each node draw one token from the LLM's own (temperature/top-k/top-p) distribution
there and move to the child holding that token if the tree has one; stop at the first draw that is
not in the tree and keep it as the next token. Every emitted token is therefore a draw from the LLM's
distribution given exactly the tokens before it, so the output has the LLM's distribution whatever
the tree (lossless by construction), and a seeded run draws the same random numbers, in the same
order, as incremental sampling. Its acceptance at a node is the LLM's probability mass on the
node's children, which suits trees built from the SSMs' most likely tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from offload_infer.sampling import SamplingConfig, select
from offload_infer.tree import TokenTree


def verify(
    tree: TokenTree, logits: Tensor | None, sampling: SamplingConfig, generator: torch.Generator | None = None,
    choice: list[int] | None = None, seen: set[int] | None = None,
) -> tuple[list[int], int]:
    """Accepted node indices (root first) and the token that follows the last of them.

    ``logits`` ``[T, V]`` holds the LLM's next-token logits at every tree node; greedy verification
    may instead be given their argmax per node (``choice``, computed for a whole batch at once). With a
    repetition penalty, ``seen`` holds the committed context's tokens, and each node's logits are
    penalised with those and the tokens on its path.
    """
    if sampling.repetition_penalty != 1.0:
        assert logits is not None and logits.shape[0] == len(tree), "one logit row per tree node"
        context = set(seen or ())
        path = [0]
        while True:
            node = path[-1]
            context.add(tree.tokens[node])
            token = select(logits[node], sampling, generator, context)
            nxt = tree.child(node, token)
            if nxt is None:
                return path, token
            path.append(nxt)
    if sampling.greedy and choice is None:
        assert logits is not None
        choice = logits.argmax(-1).tolist()  # one transfer for the whole tree
    if choice is not None:
        assert len(choice) == len(tree), f"{len(choice)} choices for {len(tree)} nodes"
    else:
        assert logits is not None and logits.shape[0] == len(tree), "one logit row per tree node"
    path = [0]
    while True:
        node = path[-1]
        token = choice[node] if sampling.greedy else select(logits[node], sampling, generator)
        nxt = tree.child(node, token)
        if nxt is None:
            return path, token
        path.append(nxt)
