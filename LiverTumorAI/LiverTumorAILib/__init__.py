"""Helpers of the LiverTumorAI Slicer module, kept apart from the widget.

- `process`: the engine's child process, its JSON progress lines and process-tree cancel
  (standard library only).
- `run`: one engine run on a volume node, from start to results in the scene.
- `scene`: MRML scene updates (segmentation, tables, chart); needs `slicer` (the Slicer
  application or the `slicer-core` package), never Qt.
- `dependencies`: checks and installs torch and the other packages inside Slicer.

Submodules are imported on use, so `process` and `dependencies` work without `slicer`.
"""
