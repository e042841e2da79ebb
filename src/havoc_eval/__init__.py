"""havoc_eval: perplexity and bits-per-byte, the lm-evaluation-harness model `havoc`, and `havoc bench`."""
