"""Data layer: sources, checks of referenced volumes, (later) sampling, targets and loading."""
