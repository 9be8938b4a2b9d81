"""Strategy search on Ray Tune: resampling x loss weighting x freeze x learning rate, with ASHA."""
from tuning.results import results_table
from tuning.search import SearchResult, run_search
from tuning.space import default_space, load_space

__all__ = ["SearchResult", "default_space", "load_space", "results_table", "run_search"]
