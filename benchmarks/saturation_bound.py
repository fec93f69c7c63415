"""The most output tok/s a server can give at saturation, whatever its concurrency and kernels.

Every request costs the GPU its prefill, compute-bound and the same in both servers (stage 1 adds
nothing measurable), and one decode row per output token, which reads that row's KV bytes. vLLM
runs a step's prefill chunk and its decode attention one after the other, so at saturation

    output tok/s <= out / (ctx / prefill_tok_s + out * row_bytes / HBM bandwidth)

with row_bytes the KV one row of an average decode step reads (`roofline.py`). The weights are left
out: shared by every row of a step, they vanish as the batch grows, which makes this a ceiling.
Stock reads its whole context a row; RocketKV its kept tokens (the default exact decode) or its
page summaries and chosen pages (HSA). The bound also says how few bytes a row may read for a goal
(e.g. 2.5x stock's measured throughput):

    python benchmarks/saturation_bound.py --ctx 32768 --out 2048 --prefill-tok-s 26000 --stock-tok-s 521.3
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_util import LLAMA_8B_CONFIG, plot_series, write_json  # noqa: E402
from roofline import DEFAULT_HBM_TB_S, ModelShape, rocketkv_step_bytes, stock_step_bytes  # noqa: E402

# RocketKV's decode variants: the server settings that give them, and which bytes count (HSA's
# floor scores r channels of each summary row; its kernels read whole rows at 4-token pages)
VARIANTS = {
    "exact over kept tokens (default)": ({}, "total"),
    "HSA, 2-token pages, scored channels": ({"page_size": 2, "dense_below": 0}, "total"),
    "HSA, 4-token pages, whole summary rows": ({"page_size": 4, "dense_below": 0}, "summary_rows_total"),
}


def ceiling_tok_s(row_bytes: float, ctx: int, out: int, prefill_tok_s: float, hbm_tb_s: float) -> float:
    """Output tok/s at saturation with prefill at prefill_tok_s and every decode row reading
    row_bytes at the full HBM bandwidth (weights free)."""
    return out / (ctx / prefill_tok_s + out * row_bytes / (hbm_tb_s * 1e12))


def row_bytes_for(target_tok_s: float, ctx: int, out: int, prefill_tok_s: float, hbm_tb_s: float) -> float | None:
    """The most KV bytes a decode row may read for a server to reach target_tok_s (None: the
    prefill alone takes longer)."""
    decode_s = out / target_tok_s - ctx / prefill_tok_s
    return decode_s * hbm_tb_s * 1e12 / out if decode_s > 0 else None


def stock_row_bytes(shape: ModelShape, ctx: int, out: int) -> int:
    return stock_step_bytes(shape, ctx, 1, out) - shape.weight_bytes()


def rocketkv_row_bytes(shape: ModelShape, ctx: int, out: int, budget: int, settings: dict, counted: str) -> int:
    """counted: rocketkv_step_bytes's "total" (HSA: scored channels) or "summary_rows_total"."""
    return rocketkv_step_bytes(shape, ctx, 1, out, budget, "rocketkv", 16, settings)[counted] - shape.weight_bytes()


def bound_rows(shape: ModelShape, ctx: int, out: int, budgets: list[int], prefill_tok_s: float, hbm_tb_s: float,
               stock_tok_s: float | None) -> list[dict]:
    """One row per budget and RocketKV variant: its ceiling, over stock's ceiling and over stock's
    measured throughput."""
    stock = ceiling_tok_s(stock_row_bytes(shape, ctx, out), ctx, out, prefill_tok_s, hbm_tb_s)
    rows = []
    for budget in budgets:
        for variant, (settings, counted) in VARIANTS.items():
            row_bytes = rocketkv_row_bytes(shape, ctx, out, budget, settings, counted)
            ours = ceiling_tok_s(row_bytes, ctx, out, prefill_tok_s, hbm_tb_s)
            rows.append({
                "budget": budget, "variant": variant, "row_tokens_read": round(row_bytes / shape.kv_bytes_per_token()),
                "ceiling_tok_s": round(ours, 1), "stock_ceiling_tok_s": round(stock, 1),
                "over_stock_ceiling": round(ours / stock, 2),
                "over_stock_measured": round(ours / stock_tok_s, 2) if stock_tok_s else None,
            })
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=LLAMA_8B_CONFIG, help="the model's config.json")
    p.add_argument("--ctx", type=int, default=32768)
    p.add_argument("--out", type=int, default=2048)
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--prefill-tok-s", type=float, default=26000.0,
                   help="prompt tokens/s of the prefill steps (H200, 32K prompts: ~26K in both servers, session 17)")
    p.add_argument("--hbm-tbs", type=float, default=DEFAULT_HBM_TB_S)
    p.add_argument("--stock-tok-s", type=float, default=None, help="stock's measured output tok/s of the same protocol")
    p.add_argument("--goal", type=float, default=2.5, help="the speed-up over --stock-tok-s to size a row's reads for")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of each variant's ceiling against the budget")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    shape = ModelShape.from_file(args.config)
    rows = bound_rows(shape, args.ctx, args.out, args.budgets, args.prefill_tok_s, args.hbm_tbs, args.stock_tok_s)
    print(f"ceiling at saturation, {args.ctx} in / {args.out} out, prefill {args.prefill_tok_s:.0f} tok/s, "
          f"{args.hbm_tbs} TB/s; stock {rows[0]['stock_ceiling_tok_s']} tok/s")
    print("| budget | RocketKV decode | KV tokens a row reads | ceiling tok/s | over stock's ceiling | over stock measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        measured = f"{r['over_stock_measured']}x" if r["over_stock_measured"] else "-"
        print(f"| {r['budget']} | {r['variant']} | {r['row_tokens_read']:,} | {r['ceiling_tok_s']} | "
              f"{r['over_stock_ceiling']}x | {measured} |")
    payload = {"ctx": args.ctx, "out": args.out, "prefill_tok_s": args.prefill_tok_s, "hbm_tb_s": args.hbm_tbs,
               "stock_tok_s": args.stock_tok_s, "rows": rows}
    if args.stock_tok_s:
        allowed = row_bytes_for(args.goal * args.stock_tok_s, args.ctx, args.out, args.prefill_tok_s, args.hbm_tbs)
        payload["goal_row_tokens"] = round(allowed / shape.kv_bytes_per_token()) if allowed else None
        print(f"{args.goal}x stock's {args.stock_tok_s} tok/s needs a row to read at most "
              f"{payload['goal_row_tokens'] or 0:,} tokens' KV a step" if allowed else
              f"{args.goal}x stock's {args.stock_tok_s} tok/s is past the prefill alone")
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        series = {v: (args.budgets, [r["ceiling_tok_s"] for r in rows if r["variant"] == v]) for v in VARIANTS}
        series["stock ceiling"] = (args.budgets, [rows[0]["stock_ceiling_tok_s"]] * len(args.budgets))
        if args.stock_tok_s:
            series[f"{args.goal}x stock measured"] = (args.budgets, [args.goal * args.stock_tok_s] * len(args.budgets))
        plot_series(args.plot, series, "budget (tokens)", "output tok/s ceiling at saturation",
                    f"{args.ctx // 1024}K in / {args.out} out", xlog=True)
    return payload


if __name__ == "__main__":
    main()
