"""Run the tasks under every method and budget in one vLLM engine, score and summarise them.

Every configuration is a per-request `extra_args` (rocketkv_mode, rocketkv_budget), so all
prompts of all configurations go through a single `LLM.generate` call: one engine, one
model load, the scheduler batching across methods.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from rocketkv_vllm.config import MODES
from rocketkv_vllm.eval.tasks import Sample, make_samples, score

@dataclass(frozen=True)
class Config:
    """A method (a rocketkv_mode; mt is HSA alone here, nothing evicted: the paper's "HSA
    only" ablation too) at a budget; "full" runs once, without one."""

    method: str
    budget: int | None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"

    def extra_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"rocketkv_mode": self.method}
        if self.budget is not None:
            args["rocketkv_budget"] = self.budget
        return args


def configs(methods: Iterable[str], budgets: Iterable[int]) -> list[Config]:
    out = []
    for method in methods:
        if method not in MODES:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(MODES)}")
        out += [Config(method, None)] if method == "full" else [Config(method, b) for b in budgets]
    return out


@dataclass(frozen=True)
class Row:
    method: str
    budget: int | None
    task: str
    length: int
    score: float
    samples: int


def build_samples(tokenizer, tasks: Iterable[str], lengths: Iterable[int], num_samples: int, seed: int) -> list[tuple[int, Sample]]:
    return [(length, s) for task in tasks for length in lengths for s in make_samples(task, tokenizer, length, num_samples, seed)]


def run(llm, samples: list[tuple[int, Sample]], cfgs: list[Config], progress: bool = True) -> tuple[list[Row], list[dict]]:
    """Generate every (config, sample) greedily in one call; per-(config, task, length) scores
    and every prediction."""
    from vllm import SamplingParams

    jobs = [(cfg, length, s) for cfg in cfgs for length, s in samples]
    params = [SamplingParams(temperature=0, max_tokens=s.max_new_tokens, extra_args=cfg.extra_args()) for cfg, _, s in jobs]
    outputs = llm.generate([s.prompt for _, _, s in jobs], params, use_tqdm=progress)
    grouped: dict[tuple, list[float]] = defaultdict(list)
    predictions = []
    for (cfg, length, s), out in zip(jobs, outputs):
        text = out.outputs[0].text
        value = score(s, text)
        grouped[(cfg.method, cfg.budget, s.task, length)].append(value)
        predictions.append({"config": cfg.label, "task": s.task, "length": length, "turn": s.turn,
                            "answers": list(s.answers), "prediction": text, "score": value})
    rows = [Row(m, b, t, n, round(statistics.fmean(v), 2), len(v)) for (m, b, t, n), v in grouped.items()]
    return rows, predictions


def summary(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Average score over tasks and lengths: {method: {budget or "-": score}}."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r.method]["-" if r.budget is None else str(r.budget)].append(r.score)
    return {m: {b: round(statistics.fmean(v), 2) for b, v in by.items()} for m, by in acc.items()}


def markdown_table(rows: list[Row]) -> str:
    """Methods x budgets, the score averaged over tasks and lengths (per-task scores: the JSON)."""
    table = summary(rows)
    budgets = sorted({b for by in table.values() for b in by if b != "-"}, key=int)
    lines = ["| method | " + " | ".join(budgets or ["-"]) + " |", "|---" * (1 + max(1, len(budgets))) + "|"]
    for method, by in table.items():
        cells = [f"{by['-']:.1f}"] * max(1, len(budgets)) if "-" in by else [f"{by[b]:.1f}" if b in by else "" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str, title: str) -> None:
    """Score vs budget per method (average over the single-turn tasks; multi-turn beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("single-turn tasks (average)", [r for r in rows if r.task != "multi_turn"]),
              ("multi-turn", [r for r in rows if r.task == "multi_turn"])]
    panels = [(name, rs) for name, rs in panels if rs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, rs) in zip(axes[0], panels):
        for method, by in summary(rs).items():
            if "-" in by:
                ax.axhline(by["-"], color="black", linestyle="--", label=f"{method} ({by['-']:.1f})")
                continue
            budgets = sorted(by, key=int)
            ax.plot([int(b) for b in budgets], [by[b] for b in budgets], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token budget")
        ax.set_ylabel("score (RULER string match, %)")
        ax.set_title(name)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in sorted(rows, key=lambda r: (r.method, r.budget or 0, r.task, r.length))]
