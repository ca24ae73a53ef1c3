"""Where a run's metrics go: ``metrics.jsonl`` always, TensorBoard when asked.

Every logged step is one record (a dict of numbers, lists of per-layer
numbers, dicts of named numbers, or None for a value not measured). The JSON
Lines file keeps it whole; with ``log.tensorboard=true`` the numbers are also
written as TensorBoard scalars under ``<run>/tensorboard/`` (with
``tensorboardX``, no TensorFlow needed), so a run can be watched live with
``tensorboard --logdir outputs/``: a list becomes ``key/0``, ``key/1``, ...,
a dict ``key/name``, and None is left out.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any


def scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
  """The record's finite numbers as ``(tag, value)``; per-layer lists and
  named dicts are split into one tag each.

  Example:
    >>> list(scalars({"loss": 2.0, "beta": [1.0, None], "step": 3, "ok": True}))
    [('loss', 2.0), ('beta/0', 1.0)]
  """
  for key, value in record.items():
    if key == "step" or isinstance(value, (bool, str)) or value is None:
      continue
    if isinstance(value, (list, tuple)):
      yield from scalars({f"{key}/{i}": v for i, v in enumerate(value)})
    elif isinstance(value, dict):
      yield from scalars({f"{key}/{k}": v for k, v in value.items()})
    elif isinstance(value, (int, float)) and math.isfinite(value):
      yield key, float(value)


class MetricWriter:
  """Appends records to ``metrics.jsonl`` and, if asked, to TensorBoard.

  A run resumed from step ``start`` (> 0) purges TensorBoard's events from
  that step on, as the JSON Lines file drops the lines after its checkpoint.
  """

  def __init__(self, run_dir: pathlib.Path, *, tensorboard: bool = False,
               start: int = 0):
    self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "log.tensorboard=true needs tensorboardX: pip install -e "
            "'.[experiments]' (or pip install tensorboardX).") from e
      self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                               purge_step=start or None)

  def write(self, step: int, record: dict[str, Any]) -> None:
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for tag, value in scalars(record):
        self._tb.add_scalar(tag, value, step)
      self._tb.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
