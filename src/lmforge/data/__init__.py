"""Data layer: corpus → tokenizer → packed token memmaps → batches. Knows nothing of models."""
