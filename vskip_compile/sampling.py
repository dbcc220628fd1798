"""Per-row sampling and stopping rules for CompiledVLM's decode loop, built from transformers'
own logits processors, warpers and stopping criteria (not re-implemented here).

    rows = Sampler.build(batch=2, options={"do_sample": True, "top_p": 0.9},
                         row_options=[{"seed": 1}, {"seed": 2, "temperature": 0.5}])
    next_token = rows.pick(ids, scores)          # [B]: each row with its own processors and RNG
    done = rows.stop(ids, pads)                  # [B]: stop strings, per-row token budgets

Every row of a batch gets its own LogitsProcessorList, its own torch.Generator (seed) and its
own stopping rules, applied to that row's ids without its left padding: a row sampled in a
mixed batch draws what it draws alone. Processor order is HF generate's: repetition penalty,
then the caller's processors, then (sampling) temperature, top_k, top_p, min_p.

`check_option(name, value)` is the one validity rule for each option; the HTTP layer maps its
ValueError to a 400 naming the field, generate() to a CompileError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

# Options a row may set (generate() keywords, and keys of one row_options dict).
ROW_OPTIONS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop_strings",
               "max_new_tokens")
# Options of a sampled row that default to the model's generation_config when unset, as in HF.
SAMPLING_DEFAULTS = ("temperature", "top_k", "top_p", "min_p")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_option(name: str, value: Any) -> None:
    """ValueError naming `name` when value is not a valid setting (None is always valid: unset).

    temperature > 0 (0 is greedy: say do_sample=False), top_p in (0, 1], top_k >= 0 (0: off),
    min_p in [0, 1], repetition_penalty > 0, seed an integer in 0..2**63-1, stop_strings a
    string or a list of non-empty strings, max_new_tokens >= 1, do_sample a boolean."""
    if value is None:
        return
    if name == "do_sample":
        ok, want = isinstance(value, bool), "a boolean"
    elif name == "temperature":
        ok, want = _is_number(value) and value > 0, "a number > 0 (greedy decoding: do_sample=False)"
    elif name == "top_p":
        ok, want = _is_number(value) and 0 < value <= 1, "a number in (0, 1]"
    elif name == "min_p":
        ok, want = _is_number(value) and 0 <= value <= 1, "a number in [0, 1]"
    elif name == "top_k":
        ok, want = _is_int(value) and value >= 0, "an integer >= 0 (0: no top-k filter)"
    elif name == "repetition_penalty":
        ok, want = _is_number(value) and value > 0, "a number > 0 (1: no penalty)"
    elif name == "seed":
        ok, want = _is_int(value) and 0 <= value < 2**63, "an integer in 0..2**63-1"
    elif name == "max_new_tokens":
        ok, want = _is_int(value) and value >= 1, "an integer >= 1"
    elif name == "stop_strings":
        strings = [value] if isinstance(value, str) else value
        ok = isinstance(strings, (list, tuple)) and bool(strings) and all(isinstance(s, str) and s for s in strings)
        want = "a non-empty string or a non-empty list of non-empty strings"
    else:
        raise ValueError(f"unknown sampling option {name!r}; known: {', '.join(ROW_OPTIONS)}")
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


_STOP_CACHE: dict = {}  # (tokenizer id, stop strings) -> StopStringCriteria, bounded below


class _DecodedStop:
    """Stop strings checked on the decoded text of the generated tokens: for tokenizers whose
    vocabulary HF's StopStringCriteria cannot clean (it assumes a byte-level or SentencePiece
    prefix; the zoo's word-level easy-VQA tokenizer raises in it)."""

    def __init__(self, tokenizer, strings: tuple[str, ...]):
        self.tokenizer, self.strings = tokenizer, strings

    def __call__(self, input_ids, scores):
        import torch

        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.strings) for t in texts])


def _stop_criteria(tokenizer, strings: tuple[str, ...]):
    """HF's StopStringCriteria for these strings (or _DecodedStop where it cannot be built),
    kept: its token tables take a while to build for a large vocabulary, and a server sees the
    same stop strings again and again."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    key = (id(tokenizer), strings)
    if key not in _STOP_CACHE:
        if len(_STOP_CACHE) >= 64:
            _STOP_CACHE.pop(next(iter(_STOP_CACHE)))
        try:
            stop = StopStringCriteria(tokenizer, list(strings))
        except ValueError:  # "substring not found" while cleaning the vocabulary
            stop = _DecodedStop(tokenizer, strings)
        _STOP_CACHE[key] = (tokenizer, stop)  # the tokenizer kept: its id stays its own
    return _STOP_CACHE[key][1]


@dataclass
class _Row:
    processors: Any  # LogitsProcessorList (may be empty)
    do_sample: bool
    generator: Any  # torch.Generator or None (torch's global RNG, as HF generate uses)
    stop: Any  # StopStringCriteria or None
    max_new_tokens: int | None  # this row's budget (the batch's when None)


class Sampler:
    """Per-row token choice and stopping rules of one generate call (see the module doc)."""

    def __init__(self, rows: list[_Row], prompt_len: int):
        self.rows = rows
        self.prompt_len = prompt_len  # columns of the prompt (padding included) in the ids passed in
        self.argmax_only = all(not r.do_sample and not len(r.processors) for r in rows)

    @classmethod
    def build(cls, batch: int, options: dict[str, Any], row_options: Sequence[dict[str, Any]] | None = None, *,
              logits_processor=None, tokenizer=None, device=None, prompt_len: int = 0,
              defaults: dict[str, Any] | None = None) -> "Sampler":
        """Rows' settings: `options` (the call's keywords), overridden per row by row_options[i];
        a sampled row's temperature, top_k, top_p and min_p left unset take `defaults` (generate
        passes the model's generation_config: HF generate's defaults, top_k 50 among them).

        ValueError naming the option for an invalid value; stop_strings need the tokenizer
        (HF's StopStringCriteria works on its vocabulary)."""
        import torch
        from transformers import LogitsProcessorList
        from transformers.generation import logits_process as lp

        if row_options is not None and len(row_options) != batch:
            raise ValueError(f"row_options has {len(row_options)} entries for a batch of {batch} rows")
        rows = []
        for i in range(batch):
            own = dict(row_options[i]) if row_options is not None else {}
            unknown = sorted(set(own) - set(ROW_OPTIONS))
            if unknown:
                raise ValueError(f"row_options[{i}]: unknown option(s) {', '.join(unknown)}; known: {', '.join(ROW_OPTIONS)}")
            opts = cls.resolve({**options, **{k: v for k, v in own.items() if v is not None}}, defaults)
            do_sample = bool(opts.get("do_sample"))
            procs = LogitsProcessorList()
            if opts.get("repetition_penalty") not in (None, 1, 1.0):
                procs.append(lp.RepetitionPenaltyLogitsProcessor(float(opts["repetition_penalty"])))
            if logits_processor is not None:
                procs.extend(logits_processor)
            if do_sample:
                if opts.get("temperature") not in (None, 1, 1.0):
                    procs.append(lp.TemperatureLogitsWarper(float(opts["temperature"])))
                if opts.get("top_k") not in (None, 0):
                    procs.append(lp.TopKLogitsWarper(top_k=int(opts["top_k"])))
                if opts.get("top_p") not in (None, 1, 1.0):
                    procs.append(lp.TopPLogitsWarper(top_p=float(opts["top_p"])))
                if opts.get("min_p") not in (None, 0, 0.0):
                    procs.append(lp.MinPLogitsWarper(min_p=float(opts["min_p"])))
            generator = None
            if do_sample and opts.get("seed") is not None:
                generator = torch.Generator(device=device or "cpu").manual_seed(int(opts["seed"]))
            stop = None
            if opts.get("stop_strings") is not None:
                if tokenizer is None:
                    raise ValueError("stop_strings needs tokenizer= (HF's StopStringCriteria reads its vocabulary)")
                strings = (opts["stop_strings"],) if isinstance(opts["stop_strings"], str) else tuple(opts["stop_strings"])
                stop = _stop_criteria(tokenizer, strings)
            rows.append(_Row(procs, do_sample, generator, stop, opts.get("max_new_tokens")))
        return cls(rows, prompt_len)

    @staticmethod
    def resolve(opts: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """One row's options checked (ValueError naming the option) and, when it samples, its
        unset temperature / top_k / top_p / min_p taken from defaults."""
        opts = dict(opts)
        for name in ROW_OPTIONS:
            check_option(name, opts.get(name))
        if not opts.get("do_sample"):
            unused = [k for k in SAMPLING_DEFAULTS if opts.get(k) is not None]
            if unused:
                raise ValueError(f"{', '.join(unused)} set without do_sample=True: greedy decoding would ignore "
                                 f"{'it' if len(unused) == 1 else 'them'}")
        elif defaults:
            for name in SAMPLING_DEFAULTS:
                if opts.get(name) is None and defaults.get(name) is not None:
                    opts[name] = defaults[name]
                    check_option(name, opts[name])
        return opts

    @property
    def trivial(self) -> bool:
        """Plain argmax for every row and no stopping rule: the caller's greedy path applies."""
        return self.argmax_only and all(r.stop is None and r.max_new_tokens is None for r in self.rows)

    def pick(self, ids, scores, pads: Sequence[int]):
        """Next token per row [B] from scores [B, V] and the sequences so far ids [B, S + t]
        (row i read from column pads[i] on: its padding is not its history)."""
        import torch

        if self.argmax_only:
            return scores.argmax(dim=-1)  # the greedy path, batched
        scores = scores.float()  # HF samples from float32 scores
        out = []
        for i, row in enumerate(self.rows):
            s = row.processors(ids[i : i + 1, pads[i]:], scores[i : i + 1]) if len(row.processors) else scores[i : i + 1]
            if row.do_sample:
                probs = torch.nn.functional.softmax(s, dim=-1)
                out.append(torch.multinomial(probs, num_samples=1, generator=row.generator)[0, 0])
            else:
                out.append(s[0].argmax())
        return torch.stack(out)  # [B]

    def stop(self, ids, pads: Sequence[int]):
        """Rows [B] that a stopping rule ends after the last column of ids: a stop string that
        the generated text now ends with, or the row's own token budget."""
        import torch

        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        generated = ids.shape[1] - self.prompt_len
        for i, row in enumerate(self.rows):
            if row.max_new_tokens is not None and generated >= row.max_new_tokens:
                done[i] = True
            elif row.stop is not None and bool(row.stop(ids[i : i + 1, self.prompt_len:], None)[0]):
                done[i] = True
        return done
