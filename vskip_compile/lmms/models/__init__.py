"""What lmms-eval's LMMS_EVAL_PLUGINS loader reads: model name -> class in models/<name>.py."""

AVAILABLE_MODELS = {"vskip": "VSkip"}
