"""Data: formats into conversations, ChatML tokens with label masks, packing, the prepared cache."""
