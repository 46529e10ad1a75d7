"""Shared vocabulary every layer may import: prompts, values, and the configuration tree.

Nothing in here imports another package of the project.
"""
