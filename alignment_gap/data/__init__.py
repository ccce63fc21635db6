"""Data: the synthetic world, tokenizer, TFDS builders and grain pipelines."""
