"""Data, CoDi and baseline objectives, training loop, evaluation."""
