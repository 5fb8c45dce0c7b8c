"""The shipped recipes, installed as package data (see qtrain.config.shipped)."""
