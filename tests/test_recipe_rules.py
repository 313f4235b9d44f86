"""recipe.py and schema.py: each rule a recipe is held to, at its edges (mutation testing: docs/mutants.md)."""
