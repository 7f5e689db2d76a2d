"""The retrieval-head profiler and its profile format: profile.py (the versioned format, fit checks,
shipped-profile lookup), profiler.py (the profiler), importers.py (published scores), report.py (figures).

Empty on purpose: import the module you need (rheads.engine imports only profile.py)."""
