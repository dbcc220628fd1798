"""The decode loop: first logits and a `step(tokens) -> logits` callable in, new tokens out.

Every path that generates (the token-dropping baselines, the eval harness's shared-prefix
runner, the ONNX runner's host loop) calls `decode_loop`; what differs between them is only
how one step runs, which the caller's `step` closes over. It works on torch tensors and numpy
arrays alike (only `argmax`, `==`, `|`, `*` and `.all()`), so the ONNX runner, which imports no
torch, shares it. (CompiledVLM._greedy in runtime.py is still its own loop: it is being turned
into a sampling loop elsewhere and folds into this one at that merge.)
"""

from __future__ import annotations

from typing import Any, Callable


def greedy(logits: Any) -> Any:
    """[B, V] -> [B]: the most likely token of each row."""
    return logits.argmax(-1)


def is_eos(tokens: Any, eos: Any) -> Any:
    """[B] bool: rows whose token is one of the eos ids (eos: an array / tensor of ids, or None)."""
    if eos is None:
        return tokens != tokens  # all False, same array kind
    return (tokens[:, None] == eos.reshape(1, -1)).any(-1)


def decode_loop(
    logits: Any,
    step: Callable[[Any], Any],
    max_new_tokens: int,
    eos: Any = None,
    pad_token_id: int | None = None,
    pick: Callable[[Any], Any] = greedy,
) -> list[Any]:
    """New tokens, one [B] array per step (n <= max_new_tokens; stops once every row has
    emitted an eos id).

    logits [B, V]: the prefill's last row; step(tokens [B]) -> logits [B, V] of the next
    position (called only when another token is needed); pick: greedy or a sampler. With
    pad_token_id, a row that has finished gets pad_token_id from then on, as HF does."""
    token = pick(logits)  # [B]
    tokens = [token]
    done = is_eos(token, eos)  # [B]
    while len(tokens) < max_new_tokens and not bool(done.all()):
        token = pick(step(token))  # [B]
        if pad_token_id is not None:
            token = token * ~done + pad_token_id * done  # finished rows: pad
        tokens.append(token)
        done = done | is_eos(token, eos)
    return tokens
