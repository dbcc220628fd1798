"""The offline easy-VQA task (easyvqa.yaml) and its functions (utils.py)."""
