"""Training data: chat formatting, loss masks, batching."""
