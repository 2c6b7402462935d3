"""`memplan measure -- COMMAND`: measure the user's own training command, unchanged (docs/measure-wrap.md).

  memplan.measure.wrap.site      the injected sitecustomize (first on the command's PYTHONPATH; chains to the
                                 site's own)
  memplan.measure.wrap.hooks     inside the command's processes: global optimizer / module / autograd hooks, memory
                                 per phase, what the run shows of its setup, written to a job folder
  memplan.measure.wrap.detect    those observations -> TrainingSetup fields, each detected or named unknown
  memplan.measure.wrap.job       the parent: run the command, compose one record (memplan.measure.record)
"""
from memplan.measure.wrap.job import SOURCE, compose, describe, measure_command, run_command

__all__ = ["SOURCE", "compose", "describe", "measure_command", "run_command"]
