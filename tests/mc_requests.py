"""Random multiple-choice shaped (context, continuation) token requests for scorer tests."""

from __future__ import annotations

import random


def mc_requests(seed: int, *, num: int, max_context: int, choices: tuple[int, int], max_continuation: int,
                one_token_every_other: bool = False, vocab: int = 500) -> tuple[list[list[int]], list[list[int]]]:
    """`num` contexts of 2..max_context-1 tokens, each with choices[0]..choices[1]-1 continuations of
    1..max_continuation-1 tokens (every other one a single token with `one_token_every_other`)."""
    rng = random.Random(seed)
    ctxs, conts = [], []
    for _ in range(num):
        ctx = [rng.randrange(3, vocab) for _ in range(rng.randrange(2, max_context))]
        for k in range(rng.randrange(*choices)):
            ctxs.append(ctx)
            short = one_token_every_other and k % 2
            conts.append([rng.randrange(3, vocab) for _ in range(1 if short else rng.randrange(1, max_continuation))])
    return ctxs, conts
