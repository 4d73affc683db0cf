"""Routing: the profile cache and batched scorer, and the policies that pick a model."""
