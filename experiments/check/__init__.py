"""``mixerlab check``: a report card for one mixer — its contract, its costs and a quick quality probe.

- `plan`: `CheckPlan`, every setting of a check, validated before anything runs or is written, and `Parts`,
  the finished pieces of a check on disk (a rerun into the same directory reuses them);
- `costs`: time and peak memory vs T (forward, forward+backward) and decoding latency and cache bytes vs
  context, of the mixer beside ``attention`` and ``mamba`` at the same width, each point in a fresh process;
- `quality`: 2-layer models of the mixer, ``attention`` and ``mamba`` trained on short MQAR and induction
  runs, with their accuracy curves;
- `card`: ``check.md``, ``check.json`` and the figures.

The contract itself is `archs.contract` (the registry-wide tests call the same checks).
"""

from experiments.check.plan import CheckPlan, Parts, make_plan

__all__ = ["CheckPlan", "Parts", "make_plan"]
