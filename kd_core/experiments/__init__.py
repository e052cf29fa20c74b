"""Experiments: named recipes (the one way from a recipe to a run) and studies over them."""
