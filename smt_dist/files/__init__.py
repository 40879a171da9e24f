"""What SMT reads and writes: adapters, the base's safetensors, the streaming merge, the job's own
state, atomic writes and JSON reads. Nothing here unpickles."""
