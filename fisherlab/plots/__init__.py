"""Figures (matplotlib only): analysis of run files and training histories."""
