"""Experiments that reproduce and extend the papers, each writing results, a summary and plots."""
