"""Compress to a budget: ``run.py search`` searches a recipe's keys with Optuna (layer 4).

``space.py`` validates the recipe's ``search:`` section, ``study.py`` runs the trials (ordinary
pipeline runs, in parallel, resumable), ``cache.py`` shares the stages trials have in common,
``results.py`` writes search.html, the Pareto trials' recipes and the terminal table.
"""

from compress.search._registry import PRUNERS, SAMPLERS
from compress.search.space import SearchConfig, SearchSpec, parse_search
from compress.search.study import run_search

__all__ = ["PRUNERS", "SAMPLERS", "SearchConfig", "SearchSpec", "parse_search", "run_search"]
