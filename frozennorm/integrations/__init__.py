"""frozennorm in other frameworks' training loops (each submodule imports its framework).

* :mod:`frozennorm.integrations.ultralytics` — Ultralytics YOLO trainers with frozen BatchNorm.
* :mod:`frozennorm.integrations.mmengine` — mmengine/mmdet configs: the ``FrozenStatsBN``
  norm types and an optimizer-wrapper constructor that treats frozen layers as BatchNorm.
"""
