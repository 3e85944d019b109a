"""Deterministic simulator that drives ssmd.core through seeded warm/stream races and crashes."""
