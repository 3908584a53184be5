"""Data: the procedural scenes world, Real-ESRGAN degradations, task datasets."""
