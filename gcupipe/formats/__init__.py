"""Output formats (modelslim, gcu, compressed-tensors): writers, readers, inspect."""
