"""Geometric corruptions: elastic_transform."""
