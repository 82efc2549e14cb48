"""Measurement: how good a network is and what it costs, apart from the stage that orchestrates it.

- quality: `metrics` (Dice, IoU, HD95, surface Dice per case), `casewise` (a network over a test split,
  case by case, and its collapse check), `stats` (bootstrap intervals and paired tests of the reports),
  `quality` (one network's quality, size and FLOPs as the evaluate stage reports them).
- cost: `profiling` (parameters, FLOPs, timing primitives, the machine's peak), `runtimes` (the registry of
  deployed forms: eager torch, ONNX Runtime, OpenVINO, torch.compile), `cost` (every form of every network
  timed in one interleaved pass per runtime).

The evaluate stage (pipeline/stages/evaluate.py) only orchestrates these and logs what they return.
"""
