"""Quality checks of trained parts, scored on held-out synthetic data with the dataset's analyzers."""
