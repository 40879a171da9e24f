"""The method itself, torch only: config, the block grid, the sparse layer, scoring, selection,
model surgery and the warm-up. Nothing here imports ``torch.distributed``, DeepSpeed or any layer
above it; engines and collectives move tensors around these functions."""
