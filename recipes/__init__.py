"""The shipped recipes, installed as package data (see qtrain.shipped_recipes)."""
