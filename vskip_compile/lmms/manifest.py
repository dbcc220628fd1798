"""Entry point `lmms_eval.models` -> `vskip`: lmms-eval finds the model without LMMS_EVAL_PLUGINS.

Loaded by lmms-eval only (it imports lmms_eval), from pyproject's entry point.
"""

from __future__ import annotations


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vskip", simple_class_path="vskip_compile.lmms.models.vskip.VSkip")]
