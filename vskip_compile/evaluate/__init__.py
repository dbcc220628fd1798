"""Evaluation: easy-VQA accuracy vs decoder-prefill FLOPs for plans and baselines.

One module per concern:

    harness      questions as (image prefix, question suffix) batches, cached vision outputs
    shared       shared_generate: greedy answers of a batch sharing each image's prefix
    methods      Method (a plan or a token drop at a budget), build_methods
    sweep        every method on every question (forked workers), verify_against_unbatched
    timing       prefill time on each method's real implementation
    report       results.json / .csv / pareto.png, the text table, NOTES
    experiments  calibrate_easyvqa / evaluate_easyvqa: what `vskip calibrate` / `vskip eval` run

    h = harness.Harness(model, processor, easyvqa.test_set())
    rows = sweep.sweep(h, methods.build_methods(model, budgets, plans_dir, ...))
    report.write_results(rows, out_dir, meta)
"""
