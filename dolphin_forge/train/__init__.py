"""Supervised fine-tuning: the recipe (`sft`) and its helpers (batches, optimizer, checkpoints, metrics, hardware)."""
