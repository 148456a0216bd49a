"""InternVL2 checkpoints: what a directory is (`formats`), converting between the original hub layout and
transformers' InternVL (`convert`), loading either as a transformers model (`loading`), finding one from
`--model` (`resolve`), and writing random-weight ones for tests and benchmarks (`tokenizer`, `tiny`).

Import from the submodules; this package imports nothing heavy itself, so `raylens.checkpoints.formats`
stays cheap for CPU-only workers.
"""
