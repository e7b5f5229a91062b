"""Imported by pytest before any test module: gatelab first, as its command line does,
so that its process settings (``gatelab._runtime.short_openmp_waits``) are in force
before torch loads."""

import gatelab  # noqa: F401
