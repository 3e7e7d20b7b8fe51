"""What to compute: the recipe dataclasses (defaults and validation) and recipe files."""
