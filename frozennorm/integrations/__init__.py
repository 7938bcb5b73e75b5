"""frozennorm in other frameworks' training loops (each submodule imports its framework).

* :mod:`frozennorm.integrations.ultralytics` — Ultralytics YOLO trainers with frozen BatchNorm.
"""
