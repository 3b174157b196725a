"""Shared test settings: the hypothesis profiles.

The property-based tests (``tests/test_properties.py``) run a few examples each by
default, so that the whole hypothesis set stays well under a minute on CI. A larger
run is one environment variable away:

    BACKPROP_HYPOTHESIS_PROFILE=nightly pytest tests/test_properties.py

``ci`` (the default) draws a fixed, derandomized set of examples; ``dev`` draws new
ones each run; ``nightly`` draws many more, for a scheduled job.
"""

from __future__ import annotations

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without hypothesis
    pass
else:
    _common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_common)
    settings.register_profile("dev", max_examples=40, **_common)
    settings.register_profile("nightly", max_examples=600, **_common)
    settings.load_profile(os.environ.get("BACKPROP_HYPOTHESIS_PROFILE", "ci"))
