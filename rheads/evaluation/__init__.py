"""Evaluation tools: niah_eval.py (`rheads eval niah`, needle-in-a-haystack over cache configurations through
the engine), causality.py (`rheads eval causality`, the paper's head-masking test), grid.py (the grid, scoring,
resume and statistics helpers both share).

Empty on purpose: nothing here is imported unless asked for (rheads.engine never imports it)."""
