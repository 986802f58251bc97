"""The model zoo (see ``cases.py``)."""

from .cases import ZOO, ZooCase, by_tag, default_output_of, negatives, positives

__all__ = ["ZOO", "ZooCase", "by_tag", "default_output_of", "negatives", "positives"]
