"""Prequential evaluation: protocol, ranking metrics, baselines, datasets, synthetic streams."""
