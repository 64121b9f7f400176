"""Test-run settings: under CI (``CI`` set) hypothesis is derandomized, so a red run is reproducible
and never depends on the luck of the draw; local runs keep exploring new examples."""
from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
