"""Data: the procedural paired dataset and its analyzers, media codecs, records, importers, tfds
builders, grain pipelines and the latent cache."""
