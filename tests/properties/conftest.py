"""Hypothesis profiles of the property tests.

``ci`` (the default): derandomized (the same examples on every run and machine), a bounded number of examples, no
deadline (a shared CPU is slow at times). ``dev``: many more examples with fresh randomness; select it with
``HYPOTHESIS_PROFILE=dev python -m pytest tests/properties``.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=600, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
