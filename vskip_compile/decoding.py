"""The decode loop: first logits and a `step(tokens) -> logits` callable in, new tokens out.

Every path that generates (the token-dropping baselines, the eval harness's shared-prefix
runner, the ONNX runner's host loop) calls `decode_loop`; what differs between them is only
how one step runs, which the caller's `step` closes over. It works on torch tensors and numpy
arrays alike (only `argmax`, `==`, `|`, `*` and `.all()`), so the ONNX runner, which imports no
torch, shares it. CompiledVLM's decode (runtime.py) calls it too, its sampling and stopping
rules coming in through `pick` and `stop` (vskip_compile.sampling).
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
    stop: Callable[[Any], Any] | None = None,
    on_token: Callable[[Any, Any], None] | None = None,
) -> list[Any]:
    """New tokens, one [B] array per step (n <= max_new_tokens; stops once every row has
    finished: emitted an eos id, or `stop` said so).

    logits [B, V]: the prefill's last row; step(tokens [B]) -> logits [B, V] of the next
    position (called only when another token is needed); pick: greedy or a sampler; stop(tokens
    [B]) -> [B] bool, rows whose stopping rules (stop strings, criteria) end after this token;
    on_token(tokens, finished) sees each step (a streamer). With pad_token_id, a row that has
    finished gets pad_token_id from then on, as HF does."""
    tokens: list[Any] = []
    done = None
    while True:
        token = pick(logits if not tokens else step(tokens[-1]))  # [B]
        if pad_token_id is not None and done is not None:
            token = token * ~done + pad_token_id * done  # finished rows: pad
        tokens.append(token)
        finished = is_eos(token, eos)
        if stop is not None:
            finished = finished | stop(token)
        done = finished if done is None else done | finished
        if on_token is not None:
            on_token(token, done)
        if len(tokens) == max_new_tokens or bool(done.all()):
            return tokens
