"""Serving the tuned model: an OpenAI-compatible chat API on Ray Serve (`fjordtune serve`)."""
