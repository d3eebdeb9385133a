"""The translate lab's encoder-decoder: a toy grammar, attention cells (cells/), beam search, BLEU."""
