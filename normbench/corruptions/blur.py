"""Blur corruptions: gaussian, glass, defocus, motion and zoom blur."""
