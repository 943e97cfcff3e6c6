"""Data: the shapes generator, ingest of your own data, datasets, samplers and transforms."""
