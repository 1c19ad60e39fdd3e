"""Shipping what was trained: merged model folders (and, later, GGUF files)."""
