"""Functions of the easyvqa task: documents from the `easy-vqa` package's local files.

The YAML's data file holds one row naming the split; `process_docs` replaces it by that
split's questions, read from the installed easy-vqa package (no hub, no download), in the
order of `vskip_compile.zoo.easyvqa.test_set()`: doc_id i is that list's question i.
The prompt is the bare question: the model's chat template puts the image first, exactly
as `zoo.easyvqa.build_inputs` (training and `evaluate`) does.
"""

from __future__ import annotations

from typing import Any

SPLITS = ("test", "train")


def load_docs(split: str) -> list[dict[str, Any]]:
    """Questions of one easy-VQA split as task documents."""
    from vskip_compile.zoo import easyvqa

    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; expected one of {', '.join(SPLITS)}")
    samples = easyvqa.test_set() if split == "test" else easyvqa.train_set()
    return [
        {"question_id": i, "image_path": path, "question": question, "answer": answer}
        for i, (path, question, answer) in enumerate(samples)
    ]


def process_docs(dataset):
    """The split-marker dataset (one row {"split": ...}) -> that split's questions."""
    import datasets

    splits = set(dataset["split"])
    if len(splits) != 1:
        raise ValueError(f"easyvqa data file must name exactly one split, got {sorted(splits)}")
    return datasets.Dataset.from_list(load_docs(splits.pop()))


def doc_to_visual(doc) -> list:
    from vskip_compile.zoo import easyvqa

    return [easyvqa.open_image(doc["image_path"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict[str, float]:
    """Exact match of the stripped answer, as `zoo.easyvqa.evaluate` scores it."""
    return {"exact_match": float(results[0].strip() == doc["answer"])}
