"""Size of a compiled XLA program, read from its HLO text.

Used to check that S2D's compiled update does not grow with depth (tests/
test_s2d_scale.py) and to report it (benchmarks/s2d_overhead.py):

    hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
    hlo_stats.program_size(hlo)  # {'instructions': ..., 'heavy': ..., 'distinct': ...}

* instructions: every HLO instruction in every computation.
* heavy: top-level (ENTRY) matmuls, custom calls (solvers, library matmul fusions),
  loops and conditionals -- the operations whose count should stay flat in depth.
* distinct: computations (fusion bodies, loop bodies, ...) that differ after removing
  names and metadata; XLA compiles each distinct one once.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
_HEAVY = re.compile(r" (dot|custom-call|while|conditional)\(|kind=kCustom")
_NAME = re.compile(r"%[\w.\-]+")
_METADATA = re.compile(r",? metadata=\{[^}]*\}")


def computations(hlo: str) -> dict[str, list[str]]:
  """{computation name ('ENTRY' for the entry): its instruction lines}."""
  comps, cur = {}, None
  for line in hlo.splitlines():
    m = _HEADER.match(line)
    if m:
      cur = "ENTRY" if m.group(1) else m.group(2)
      comps[cur] = []
    elif line.startswith("}"):
      cur = None
    elif cur and " = " in line:
      comps[cur].append(line.strip())
  if "ENTRY" not in comps:
    raise ValueError("hlo_stats: no ENTRY computation in the HLO text (pass "
                     "`compiled.as_text()` of a jitted function)")
  return comps


def _normalized(body: list[str]) -> str:
  return "\n".join(_NAME.sub("%", _METADATA.sub("", x)) for x in body)


def program_size(hlo: str) -> dict[str, int]:
  """{'instructions', 'heavy', 'distinct'} of a compiled HLO module (module doc)."""
  comps = computations(hlo)
  heavy = sum(1 for line in comps["ENTRY"] if _HEAVY.search(line))
  distinct = {_normalized(b) for name, b in comps.items() if name != "ENTRY"}
  return dict(instructions=sum(len(b) for b in comps.values()), heavy=heavy,
              distinct=len(distinct))
