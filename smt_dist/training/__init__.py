"""Pieces of the training job (``launch/train.py``): arguments, data, checkpoints, logs."""
