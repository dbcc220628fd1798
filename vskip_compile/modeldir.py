"""Model directories (config.json, safetensors weights, processor files): checked, then loaded.

transformers reports a corrupt config.json, a truncated model.safetensors or a missing tokenizer
file as a traceback that names no file (or, for tokenizer files, as a wrong image-token count
much later). Every command and API that loads a model directory goes through `load`
(`vskip_compile.load`; `load_model` / `load_processor` where only one half is needed), which
checks the files first and raises ModelDirError naming the file. The processor classes that
transformers cannot auto-load (the zoo's easy-VQA one) are named in PROCESSORS, here only.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .errors import ModelDirError

# Processor classes that are not in transformers' auto mapping: name -> (module, class).
PROCESSORS = {"EasyVQAQwen3VLProcessor": ("vskip_compile.zoo.easyvqa_processor", "EasyVQAQwen3VLProcessor")}
# A tokenizer needs its config and one vocabulary file (fast, sentencepiece, or BPE vocab).
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read it ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: corrupt, not JSON ({e})") from e
    if not isinstance(value, dict):
        raise ModelDirError(f"{path}: corrupt, a JSON object expected, got {type(value).__name__}")
    return value


def check(model_dir: str | Path) -> dict[str, Any]:
    """Refuse a model directory whose config.json or weights are missing or corrupt; returns the config."""
    d = Path(model_dir)
    if not d.exists():
        raise ModelDirError(f"{d}: no such model directory")
    if not d.is_dir():
        raise ModelDirError(f"{d}: not a directory (a model directory holds config.json and model.safetensors)")
    if not (d / "config.json").is_file():
        raise ModelDirError(f"{d}: no model at this path, not a Hugging Face model directory (no config.json)")
    config = _json(d / "config.json")
    arch = config.get("architectures")
    if arch is not None and (not isinstance(arch, list) or not all(isinstance(a, str) for a in arch)):
        raise ModelDirError(f"{d / 'config.json'}: 'architectures' must be a list of class names, got {arch!r}")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelDirError(f"{index}: corrupt, no 'weight_map'")
        shards = sorted({d / str(f) for f in weight_map.values()})
    else:
        shards = [d / "model.safetensors"]
    for shard in shards:
        _check_safetensors(shard)
    return config


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose data covers every tensor it lists."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelDirError(f"{path}: missing (the model's weights)")
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise ModelDirError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def check_processor(model_dir: str | Path) -> None:
    """Refuse a directory without the tokenizer files a processor needs (else the tokenizer
    loads without the model's special tokens and the image-token count is wrong later)."""
    d = Path(model_dir)
    if not (d / "tokenizer_config.json").is_file():
        raise ModelDirError(f"{d}: tokenizer_config.json missing (the processor's tokenizer cannot be loaded)")
    _json(d / "tokenizer_config.json")
    if not any((d / name).is_file() for name in TOKENIZER_VOCAB):
        raise ModelDirError(f"{d}: no tokenizer vocabulary ({' or '.join(TOKENIZER_VOCAB)} missing)")


def load_model(model_dir: str | Path, dtype=None):
    """The model class config.json's `architectures` names (else AutoModelForImageTextToText),
    offline, in eval mode; dtype None = transformers' default."""
    import transformers

    d = Path(model_dir)
    config = check(d)
    name = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, name, None) if name else transformers.AutoModelForImageTextToText
    if cls is None:
        raise ModelDirError(f"{d / 'config.json'}: names no transformers class in 'architectures' ({name!r})")
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        model = cls.from_pretrained(d, local_files_only=True, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' refusals of a bad config or weights
        raise ModelDirError(f"{d}: cannot load the model ({type(e).__name__}: {' '.join(str(e).split())})") from e
    return model.eval()


def load_processor(model_dir: str | Path):
    """The processor saved in model_dir (its own class when transformers cannot auto-load it)."""
    d = Path(model_dir)
    check_processor(d)
    cls = None
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (d / name).is_file():
            cls = _json(d / name).get("processor_class")
            break
    try:
        if cls in PROCESSORS:
            module, attr = PROCESSORS[cls]
            return getattr(importlib.import_module(module), attr).from_pretrained(d, local_files_only=True)
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelDirError(f"{d}: cannot load the processor ({type(e).__name__}: {' '.join(str(e).split())})") from e


def load(model_dir: str | Path, dtype=None):
    """(model, processor) of a model directory, offline, the model in eval mode; every file is
    checked before either loads. dtype None = transformers' default."""
    check(model_dir)
    check_processor(model_dir)
    return load_model(model_dir, dtype), load_processor(model_dir)
