"""Real pretrained models, built offline from packages on the package index."""
