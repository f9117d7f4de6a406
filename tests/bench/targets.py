"""The targets the benchmarks hold their figures to, printed next to each figure.

A figure that misses its target says ``BELOW TARGET`` on its own line, and every benchmark ends
with one summary line naming each miss, so a run read in a hurry cannot pass one off as met.
Figures are noisy on a shared machine; a miss is worth a second run before it is worth a fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AT_MOST, AT_LEAST, EXACTLY = "<=", ">=", "=="


@dataclass
class Targets:
    """Collects verdicts over one benchmark run."""

    missed: list[str] = field(default_factory=list)
    checked: int = 0

    def check(self, what: str, value: float, target: float, unit: str = "", *, compare: str = AT_MOST) -> str:
        """``(target <= 0.5 s: met)`` or ``(target <= 0.5 s: BELOW TARGET)``; a miss is remembered."""
        met = {AT_MOST: value <= target, AT_LEAST: value >= target, EXACTLY: value == target}[compare]
        self.checked += 1
        goal = f"{compare} {target:g}{' ' + unit if unit else ''}"
        if not met:
            self.missed.append(f"{what}: {value:g}{' ' + unit if unit else ''} (target {goal})")
        return f"(target {goal}: {'met' if met else 'BELOW TARGET'})"

    def summary(self) -> str:
        if not self.missed:
            return f"all {self.checked} figures with a target met it"
        return f"BELOW TARGET, {len(self.missed)} of {self.checked}: " + "; ".join(self.missed)
