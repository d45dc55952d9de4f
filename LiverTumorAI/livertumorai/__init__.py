"""LiverTumorAI engine: liver and liver-tumor analysis of abdominal CT.

The engine imports neither `slicer` nor Qt. Its public entry point is
:func:`livertumorai.pipeline.segment_ct`; the console script `livertumorai` wraps it.
"""

__version__ = "0.1.0"
