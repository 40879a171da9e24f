"""SMT inside other people's training code: ``prepare`` (any engine), the Trainer, and saving
that keeps the training (merge on save)."""
