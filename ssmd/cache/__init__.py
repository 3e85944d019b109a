"""`ssmd cache`: warm Redis from an exported snapshot and apply the change stream."""
