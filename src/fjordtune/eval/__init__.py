"""Evaluation: lm-eval tasks scored through Ray Data, with sanity checks."""
