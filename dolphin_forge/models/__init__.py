"""Model loading: the embedded default model, safe loading, tokenizer set-up."""
