"""havoc_training: data pipeline (and, with later issues, the trainer, checkpoints and fine-tuning)."""
