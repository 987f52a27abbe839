"""Comparisons as data: two measured numbers, their ratio, a target; rendered as JSON and markdown.

Every comparison reports ``ours`` (Imager's side) and ``theirs`` (the alternative, or the machine's
peak for utilisation) in the same unit, and ``ratio = ours / theirs`` computed from exactly those
two numbers. A target is a bound on the ratio (``>=`` for throughputs and utilisation, ``<=`` for
memory and FID); ``met`` is the plain comparison of the measured ratio with it, nothing rounded.
A comparison may carry an ``interval`` of its ratio (the FID rows: a 95 % jackknife interval,
:mod:`benchmarks.stats`); it is shown beside the ratio and does not change ``met``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# What each ratio = ours / theirs should meet; None: reported without a target.
TARGETS: dict[str, tuple[Literal[">=", "<="], float] | None] = {
    "training_speed": (">=", 1.5),  # Imager ≥ 1.5× diffusers' training images/s
    "training_utilisation": (">=", 0.55),  # ≥ 55 % of the fp32 matmul peak
    "training_memory": ("<=", 1.0),  # peak training memory ≤ diffusers'
    "sampling_speed": (">=", 1.5),  # ≥ 1.5× diffusers' images/s at 20 steps
    "sampling_fid": ("<=", 1.05),  # DPM-Solver++ 20 steps within 5 % of 1000-step DDPM FID
    "sampling_fid_sde": ("<=", 1.05),  # the same for its SDE variant
    "sampling_convergence": ("<=", 1.05),  # "20 steps is almost converged": within 5 % of its own 1000-step FID
    "embedding_cache": (">=", 10.0),  # cache ≥ 10× on-the-fly steps/s
    "data_loading": None,  # reported, no target
    # quality at equal compute, Imager's default vs arch: diffusers: ≥ 20 % lower evaluator FID, ≥ 20 % higher R-precision
    "quality_fid_base": ("<=", 0.8),
    "quality_r_precision_base": (">=", 1.2),
    "quality_fid": ("<=", 0.8),  # the cascade
    "quality_r_precision": (">=", 1.2),
    "quality_compute": None,  # training wall time of the two: shows the compute was equal
    # the web app vs the library call it wraps: the server adds little to what a user waits
    "ui_first_preview": ("<=", 1.5),
    "ui_base_image": ("<=", 1.1),
    "ui_final_image": ("<=", 1.1),
    "ui_throughput": (">=", 0.9),
    "ui_memory": ("<=", 1.5),
    # LoRA against full fine-tuning of the same base model: what it costs (reported, no target)
    "finetune_speed": None,
    "finetune_memory": None,
    "finetune_trainable": None,
    "finetune_file": None,
    # the data stages on Ray: 2 workers vs 1, and 1 worker vs one process (reported, no target)
    **{f"ray_{row}_{stage}": None for row in ("scaling", "overhead") for stage in ("download", "shard", "embed")},
}
MET, NOT_MET, NO_TARGET = "✅ met", "❌ not met", "—"


@dataclass
class Comparison:
    key: str  # one of TARGETS
    title: str  # e.g. "Training step"
    unit: str  # of ours and theirs, e.g. "images/s"
    ours_label: str
    ours: float
    theirs_label: str
    theirs: float
    percent: bool = False  # show the ratio as a percentage (utilisation)
    interval: tuple[float, float] | None = None  # (low, high) of the ratio: its 95 % interval
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ours / self.theirs if self.theirs else float("inf")

    @property
    def target(self) -> tuple[str, float] | None:
        return TARGETS[self.key]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target
        return self.ratio >= bound if op == ">=" else self.ratio <= bound

    def to_json(self) -> dict[str, Any]:
        target = None if self.target is None else {"op": self.target[0], "value": self.target[1]}
        return {
            "title": self.title,
            "unit": self.unit,
            "ours": {"label": self.ours_label, "value": self.ours},
            "theirs": {"label": self.theirs_label, "value": self.theirs},
            "ratio": self.ratio,
            "ratio_definition": "ours / theirs",
            "ratio_interval_95": None if self.interval is None else list(self.interval),
            "target": target,
            "met": self.met,
            "details": self.details,
        }

    # ------------------------------------------------------------------------------- markdown

    def _ratio_text(self, value: float) -> str:
        return f"{100 * value:.1f} %" if self.percent else f"{value:.2f}×"

    def row(self) -> list[str]:
        target = "—" if self.target is None else f"{'≥' if self.target[0] == '>=' else '≤'} {self._ratio_text(self.target[1])}"
        mark = NO_TARGET if self.met is None else (MET if self.met else NOT_MET)
        return [
            self.title,
            f"{_num(self.ours)} {self.unit} ({self.ours_label})",
            f"{_num(self.theirs)} {self.unit} ({self.theirs_label})",
            self._ratio_text(self.ratio) + ("" if self.interval is None else
                                             f" ({self._ratio_text(self.interval[0])}–{self._ratio_text(self.interval[1])})"),
            target,
            mark,
        ]


HEADER = ["Comparison", "Imager", "Baseline", "Ratio", "Target", "Met"]
REPRODUCE = ("`python -m benchmarks` (or `make bench`) writes its results to benchmarks/results/latest.json and "
             "latest.md (git-ignored); with `--publish` it also writes docs/benchmarks.json and docs/benchmarks.md.")


def _num(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[list[str]]:
        return [c.row() for c in self.comparisons]

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "comparisons": {c.key: c.to_json() for c in self.comparisons},
            "notes": self.notes,
        }

    def _rounds(self) -> str:
        if self.settings.get("only") == ["distributed"]:
            return "Each side run once (the data stages take seconds to minutes each)"
        return f"Medians over {self.settings['repeats']} repeats after {self.settings['warmup']} warm-up rounds"

    def markdown(self) -> str:
        m = self.machine
        device = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores_usable']} usable of {m['cpu_cores']} cores, {m['torch_threads']} torch threads)"
        lines = [
            "# Imager benchmarks",
            "",
            f"Measured by `python -m benchmarks` on **{device}**; torch {m['torch']}, diffusers {m['diffusers']}, "
            f"{m['platform']}. {self._rounds()}{' (quick smoke run: tiny sizes, not representative)' if self.settings.get('quick') else ''}.",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "|".join(["---"] * len(HEADER)) + "|",
        ]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self.rows()]
        legend = "Ratio = Imager / baseline, measured in the same run; Met compares it, unrounded, with the target."
        if any(c.interval for c in self.comparisons):
            legend += " In parentheses: the ratio's 95 % interval (jackknife over prompts and reference images)."
        lines += ["", legend, "", REPRODUCE, ""]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        return "\n".join(lines)
