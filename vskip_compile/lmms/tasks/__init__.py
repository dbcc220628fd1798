"""lmms-eval task YAMLs shipped with vskip-compile (a folder for --include_path)."""
