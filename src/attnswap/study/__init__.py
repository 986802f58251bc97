"""``attnswap study``: the papers' claims at small scale, with seeds, ablations and error bars.

One idea per file: ``arms`` (what each study compares), ``runner`` (training every arm per seed,
deterministically, and writing the files), ``scale`` (the 1/√d analysis at initialization),
``aggregate`` (mean/std, paired differences, the table), ``plot`` (curves with a band over seeds).
"""

from .arms import STUDIES, Arm, Study, study_arms
from .runner import run_study

__all__ = ["run_study", "STUDIES", "Arm", "Study", "study_arms"]
