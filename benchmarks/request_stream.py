"""A stream of easy-VQA requests, one at a time: per-layout graphs vs the polymorphic graph.

    python benchmarks/request_stream.py [--questions 50] [--backend inductor] [--json out.json]

Real traffic has a new prompt length for almost every request. This takes the shipped
easy-VQA Qwen3-VL and its recommended plan, takes `--questions` test questions, each with its
own prompt length (request i has i filler words before its question; --natural-lengths keeps
the questions as they are), and answers them one at a time through
`vskip_compile.compile(model, plan, backend=...)`, once with `specialize="layout"` (a static
prefill graph compiled for each new layout, the old behaviour) and once polymorphic (one graph
for every layout). Wall time includes every compile. Each variant runs in its own subprocess
with a fresh, empty inductor cache directory (TORCHINDUCTOR_CACHE_DIR), so no variant reuses
the other's (or an earlier run's) compiled kernels. Prints one JSON report: total seconds,
prefill graphs compiled, distinct layouts, and whether both variants gave identical answers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def pick_questions(n: int, own_lengths: bool) -> list[tuple[str, str]]:
    """n (image path, question) pairs from the test split, fixed order. own_lengths: request i
    gets i filler words ("please") before its question, so every request has its own prompt
    length (the easy-VQA questions alone have only a handful of lengths)."""
    from vskip_compile.zoo import easyvqa

    samples = easyvqa.test_set()[:n]
    if len(samples) < n:
        raise ValueError(f"the test split has {len(samples)} questions, fewer than {n}")
    return [(path, ("please " * i if own_lengths else "") + question) for i, (path, question, _) in enumerate(samples)]


def run_variant(variant: str, backend: str, questions: list[tuple[str, str]]) -> dict:
    import torch

    import vskip_compile
    from vskip_compile.zoo import easyvqa

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    model, processor = easyvqa.load()
    plan = easyvqa.default_plan()
    cm = vskip_compile.compile(model, plan, backend=backend, specialize="layout" if variant == "per-layout" else None,
                               cache_size=len(questions) + 1)
    answers, lengths, first = [], set(), None
    t0 = time.perf_counter()
    for path, question in questions:
        inputs = easyvqa.build_inputs(processor, path, question)
        lengths.add(inputs["input_ids"].shape[1])
        out = cm.generate(**inputs, max_new_tokens=easyvqa.MAX_NEW_TOKENS)
        answers.append(easyvqa.parse_answer(processor, out[0, inputs["input_ids"].shape[1]:]))
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    info = cm.cache_info()
    return {"variant": variant, "backend": backend, "questions": len(questions), "distinct_lengths": len(lengths),
            "total_s": round(total, 2), "first_request_s": round(first, 2), "prefill_graphs_compiled": info.compiles,
            "decode_graphs_compiled": cm.decode_cache_info().compiles, "answers": answers, "plan": plan.name}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    ap.add_argument("--natural-lengths", action="store_true",
                    help="the questions as they are (few distinct prompt lengths) instead of one length per request")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--variant", choices=["per-layout", "polymorphic"], help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--questions-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:
        with open(args.questions_file) as f:
            questions = [tuple(q) for q in json.load(f)]
        print(json.dumps(run_variant(args.variant, args.backend, questions)))
        return 0

    questions = pick_questions(args.questions, own_lengths=not args.natural_lengths)
    reports = {}
    with tempfile.TemporaryDirectory(prefix="vskip-stream-") as tmp:
        qfile = os.path.join(tmp, "questions.json")
        with open(qfile, "w") as f:
            json.dump(questions, f)
        for variant in ("per-layout", "polymorphic"):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, f"inductor-{variant}"))
            print(f"running {variant} ...", file=sys.stderr)
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--backend", args.backend,
                                  "--questions-file", qfile], env=env, capture_output=True, text=True, check=True)
            reports[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    per, poly = reports["per-layout"], reports["polymorphic"]
    report = {
        "questions": len(questions), "backend": args.backend, "distinct_lengths": poly["distinct_lengths"],
        "per_layout": {k: v for k, v in per.items() if k != "answers"},
        "polymorphic": {k: v for k, v in poly.items() if k != "answers"},
        "speedup_total": round(per["total_s"] / poly["total_s"], 2),
        "identical_answers": per["answers"] == poly["answers"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
