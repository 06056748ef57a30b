"""Placeholder package; see README's feature table for its status."""
