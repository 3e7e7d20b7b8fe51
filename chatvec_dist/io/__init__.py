"""Reading checkpoints: headers, indexes, Hub resolution, byte ranges."""
