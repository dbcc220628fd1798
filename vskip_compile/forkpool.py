"""fork_map: a function over items in forked single-threaded worker processes.

Calibration's ablations and the eval sweep share a large model between workers. A
multiprocessing.Pool pickles the function of every task, so they used to park the model in a
module global before forking. Here `fn` (and the model it closes over) reaches the children
by fork itself, copy-on-write, never pickled; only items, results and errors cross the queues.
"""

from __future__ import annotations

import multiprocessing
import pickle
import traceback
from typing import Any, Callable, Iterable, Iterator


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)  # under CPU contention several single-threaded workers beat one threaded process


def _picklable(e: Exception) -> Exception:
    """e itself when it pickles, else a RuntimeError holding its traceback."""
    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"in a worker process:\n{traceback.format_exc()}")


def fork_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, *, ordered: bool = True,
             init: Callable[[], None] = _single_thread) -> Iterator[Any]:
    """fn(item) for every item, computed by `workers` forked processes (each runs `init` first);
    results in item order, or as they finish with ordered=False. A worker's exception is
    raised here (the remaining workers are stopped)."""
    items = list(items)
    ctx = multiprocessing.get_context("fork")
    tasks, results = ctx.Queue(), ctx.SimpleQueue()  # Queue: a feeder thread, putting never blocks the parent

    def work() -> None:
        init()
        for i, item in iter(tasks.get, None):
            try:
                results.put((i, fn(item), None))
            except Exception as e:  # sent back and raised in the parent
                results.put((i, None, _picklable(e)))

    procs = [ctx.Process(target=work, daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for task in enumerate(items):
        tasks.put(task)
    for _ in procs:
        tasks.put(None)
    waiting: dict[int, Any] = {}
    nxt = 0
    try:
        for _ in items:
            i, out, error = results.get()
            if error is not None:
                raise error
            if not ordered:
                yield out
                continue
            waiting[i] = out
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
