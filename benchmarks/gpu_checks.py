"""The GPU checks of issues 2 and 3 in one short run, for a session that is lent a GPU.

1. numerics: `memory_chunked` on the device in float32 and under bf16 autocast against
   `memory_recurrent` on the CPU in float64 (outputs and the gradients of every input), L = 1, 2, 3.
2. models: causality and streaming equivalence of every variant on the device (float32).
3. memory speed: one `NeuralMemory` forward + backward at the issue-2 settings (dim 384, 4 heads,
   depth 2, expansion 4, chunk 64, batch 2), T = 4096 and 32768: seconds (median of 3) and peak
   device memory; titans-pytorch too when it is installed (`pip install -e '.[bench]'`).
4. model speed: one training step (bf16 autocast, AdamW) of the `170m` configuration of every
   variant at T = 2K, 8K, 32K: tokens/s and peak device memory. Cells that would not finish inside
   --cell-budget seconds are reported as such (the chunk loop is sequential in T).

--graphs runs parts 2 and 4 with the memory's chunk loops replayed as CUDA graphs
(`titans.memory.graph_chunks`); part 1 checks the graphed loops on CUDA in any case.

Writes <out>.json and <out>.md (default benchmarks/results/gpu_checks_<device name>), and prints the
markdown. A check that fails is reported and the run goes on; the exit status is 1 if any failed.

    python benchmarks/gpu_checks.py --deadline 150 --cell-budget 25  # on the GPU: 114 s on an H100
    python benchmarks/gpu_checks.py --device cpu --quick # the same code paths, small, on the CPU
    python benchmarks/gpu_checks.py --skip memory --graphs --deadline 240 --cell-budget 40
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from memory_speed import BATCH, DIM, build  # benchmarks/memory_speed.py: the issue-2 settings
from memory_speed import step as memory_step

from titans.memory import graph_chunks, memory_chunked, memory_recurrent
from titans.model import VARIANTS, TitansConfig, TitansLM


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device: str, *args) -> float:
    """Seconds of one fn(*args), the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# ------------------------------------------------------------------------------------ 1. numerics
def memory_inputs(L: int, T: int, g: torch.Generator):
    B, H, D, E = 2, 2, 16, 2
    q, k = (F.normalize(torch.randn(B, H, T, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    alpha = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.1
    eta = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.9
    theta = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.3
    dims = [D] + [D * E] * (L - 1) + [D]
    weights = tuple(torch.randn(H, dims[i], dims[i + 1], generator=g, dtype=torch.float64) / dims[i] ** 0.5
                    for i in range(L))
    ln = None if L == 1 else (1 + 0.1 * torch.randn(H, D, generator=g, dtype=torch.float64),
                              0.1 * torch.randn(H, D, generator=g, dtype=torch.float64))
    return [q, k, v, alpha, eta, theta, *weights], ln


def run_memory_fn(fn, tensors, ln, L, device, dtype, autocast, chunk):
    xs = [t.detach().to(device, dtype).requires_grad_() for t in tensors]
    ln_x = None if ln is None else tuple(t.detach().to(device, dtype).requires_grad_() for t in ln)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
        y, _ = fn(*xs[:6], tuple(xs[6:6 + L]), chunk_size=chunk, ln=ln_x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    grads = torch.autograd.grad((y * w).sum(), xs + list(ln_x or ()))
    return y, grads


def check_numerics(device: str, quick: bool) -> list[dict]:
    """The deep memory's recurrence amplifies rounding (benchmarks/sensitivity.py;
    docs/training.md): with these random inputs at T = 200 and L = 3 even the float32 token loop on the
    CPU is O(1) away from float64 (an H100 run measured that, 2026-11-26), so the check runs at
    T = 64 (4 chunks), where float32 is meaningful, and a row passes when the device's error is
    within `limit` or within 4x the error of the CPU float32 token loop (`cpu_fp32_loop_err`)."""
    rows, g = [], torch.Generator().manual_seed(0)
    T, chunk = (37, 8) if quick else (64, 16)
    for L in (1, 2, 3):
        tensors, ln = memory_inputs(L, T, g)
        ref_y, ref_g = run_memory_fn(memory_recurrent, tensors, ln, L, "cpu", torch.float64, False, chunk)
        loop_y, loop_g = run_memory_fn(memory_recurrent, tensors, ln, L, "cpu", torch.float32, False, chunk)
        floor = max(rel(loop_y, ref_y), *(rel(a, b) for a, b in zip(loop_g, ref_g)))
        modes = [("float32", False, 1e-3), ("bf16 autocast", True, 2e-2)]
        if device.startswith("cuda"):  # the chunk loops replayed as CUDA graphs (graph_chunks)
            modes += [("float32 graphs", False, 1e-3), ("bf16 autocast graphs", True, 2e-2)]
        for mode, autocast, limit in modes:
            graph_chunks("graphs" in mode)
            try:
                y, grads = run_memory_fn(memory_chunked, tensors, ln, L, device, torch.float32, autocast,
                                         chunk)
            finally:
                graph_chunks(False)
            err_y = rel(y, ref_y)
            err_g = max(rel(a, b) for a, b in zip(grads, ref_g))
            bound = max(limit, 4 * floor)
            rows.append({"check": f"memory L={L} {mode}", "rel_err_y": err_y, "rel_err_grads": err_g,
                         "cpu_fp32_loop_err": floor, "limit": limit, "ok": err_y <= bound and err_g <= bound})
    return rows


# ------------------------------------------------------------------------------------- 2. models
def check_models(device: str) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        cfg = TitansConfig.from_preset("tiny", variant=variant, dim=32, n_layers=2, n_heads=2, mlp_hidden=64,
                                       chunk_size=4, segment_len=8, window=8, n_persistent=2)
        model = TitansLM(cfg).to(device)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (2, 41), generator=g).to(device)
        with torch.no_grad():
            whole, _ = model(tokens)
            causal = 0.0
            for p in (0, 7, 8, 13, 27):
                changed = tokens.clone()
                changed[:, p + 1:] = torch.randint(0, 256, changed[:, p + 1:].shape, generator=g).to(device)
                causal = max(causal, (model(changed)[0][:, :p + 1] - whole[:, :p + 1]).abs().max().item())
            state, parts = None, []
            cuts = [0, 1, 3, 10, 11, 19, 24, 41]
            for a, b in zip(cuts[:-1], cuts[1:]):
                out, state = model(tokens[:, a:b], state)
                parts.append(out)
            stream = rel(torch.cat(parts, 1), whole)
        rows.append({"check": f"{variant} causal / streaming", "max_abs_change_before_p": causal,
                     "streaming_rel_err": stream, "ok": causal <= 1e-5 and stream <= 1e-4})
    return rows


# ------------------------------------------------------------------------------- 3. memory speed
def memory_speed(device: str, quick: bool) -> list[dict]:
    rows = []
    lengths = (256, 512) if quick else (4096, 32768)
    impls = ["titans"]
    try:
        import titans_pytorch  # noqa: F401

        impls.append("titans-pytorch")
    except ImportError:
        pass
    for impl in impls:
        for T in lengths:
            torch.manual_seed(0)
            module = build(impl).to(device)
            x = torch.randn(BATCH, T, DIM, device=device, requires_grad=True)
            try:
                timed(memory_step, device, module, x)  # warm-up
                reset_peak(device)
                times = [timed(memory_step, device, module, x) for _ in range(3)]
                rows.append({"check": f"memory speed {impl} T={T}", "seconds": statistics.median(times),
                             "tokens_per_s": BATCH * T / statistics.median(times), "peak_gb": peak_gb(device),
                             "ok": True})
            except Exception as e:  # e.g. out of memory for the peer at 32K
                rows.append({"check": f"memory speed {impl} T={T}", "error": str(e).splitlines()[0][:120],
                             "ok": impl != "titans"})
    return rows


# -------------------------------------------------------------------------------- 4. model speed
def model_speed(device: str, quick: bool, budget: float, deadline: float, on_row,
                variants=VARIANTS, lengths=None) -> list[dict]:
    """Length-major (every variant at 2K, then at 8K, ...), so a short deadline still covers every
    variant at the shorter lengths. A cell is skipped when its step, predicted from the variant's
    tokens/s at the previous length, would exceed `budget` seconds or end after `deadline`
    (time.perf_counter())."""
    rows = []
    preset, default = ("tiny", (64, 128)) if quick else ("170m", (2048, 8192, 32768))
    lengths = lengths or default
    speed: dict[str, float] = {}  # tokens/s of each variant at the previous length
    for T in lengths:
        for variant in variants:
            name = f"model speed {preset} {variant} T={T}"
            if variant in speed and speed[variant] <= 0:
                continue  # it failed at a shorter length
            guess = T / speed[variant] if variant in speed else None
            left = deadline - time.perf_counter()
            if guess is not None and (guess > budget or 2 * guess > left):
                why = "budget" if guess > budget else "deadline"
                on_row(rows, {"check": name, "skipped": f"{why}: one step would take about {guess:.0f} s",
                              "ok": True})
                continue
            if left <= 0:
                on_row(rows, {"check": name, "skipped": "deadline", "ok": True})
                continue
            try:
                model, opt, tokens = model_step_inputs(preset, variant, T, device)
                reset_peak(device)
                # the warm-up step is also a first timing, which decides on the next length
                finite: list[bool] = []
                record = lambda *a, out=finite: out.append(train_step(*a))  # noqa: E731
                seconds = timed(record, device, model, opt, tokens)
                if seconds < budget / 3:
                    seconds = timed(record, device, model, opt, tokens)
                speed[variant] = T / seconds
                on_row(rows, {"check": name, "seconds": seconds, "tokens_per_s": T / seconds,
                              "peak_gb": peak_gb(device), "grad_finite": all(finite), "ok": True})
            except Exception as e:
                traceback.print_exc()
                speed[variant] = 0.0
                on_row(rows, {"check": name, "error": str(e).splitlines()[0][:120], "ok": False})
            finally:
                model = opt = None
    return rows


def model_step_inputs(preset: str, variant: str, T: int, device: str):
    """(model, AdamW, tokens (1, T + 1)) for one timed training step, seeded."""
    torch.manual_seed(0)
    model = TitansLM(TitansConfig.from_preset(preset, variant=variant)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, torch.randint(0, model.config.vocab_size, (1, T + 1), device=device)


def train_step(model, opt, tokens) -> bool:
    """One step; a non-finite gradient (the memory variants' outer gradient overflows at long T from
    init under the paper's rule: 170m lmm at 8K on an H200) skips the update, as a trainer does, so
    a second timed step runs on finite weights. Returns whether the gradient was finite."""
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
    if finite:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return finite


def to_markdown(device_name: str, parts: dict[str, list[dict]]) -> str:
    """One table per part, with the columns its rows have."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = [f"Device: {device_name}; torch {torch.__version__}."]
    for part, rows in parts.items():
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("check", "ok")]
        lines += ["", f"**{part}**", "", "| check | ok | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['check']} | {'yes' if r['ok'] else '**no**'} | "
                         + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU run of the same code paths)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: numerics,models,memory,model")
    p.add_argument("--cell-budget", type=float, default=60.0, help="seconds one model-speed step may take")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds for the whole run (0: none); model-speed cells that would end later are "
                        "skipped")
    p.add_argument("--variants", default=",".join(VARIANTS), help="model speed: these variants")
    p.add_argument("--lengths", default=None,
                   help="model speed: these sequence lengths (default 2048,8192,32768; quick: 64,128)")
    p.add_argument("--graphs", action="store_true",
                   help="models and model speed with the memory's chunk loops as CUDA graphs (graph_chunks)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    try:
        model_lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        p.error(f"--lengths {args.lengths}: expected comma-separated integers")
    if model_lengths and min(model_lengths) < 1:
        p.error(f"--lengths {args.lengths}: lengths must be >= 1")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    device = args.device
    # float32 checks mean float32: no TF32 in cuDNN's convolutions (matmuls default to full float32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    out = Path(args.out or f"benchmarks/results/gpu_checks_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}")
    start = time.perf_counter()
    deadline = start + args.deadline if args.deadline else float("inf")
    results: dict[str, list[dict]] = {}

    def save() -> str:  # after every part and every model-speed cell: a killed run keeps its results
        rows = [r for part_rows in results.values() for r in part_rows]
        text = to_markdown(name, results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                        "rows": rows}, indent=1))
        return text

    def on_row(rows: list[dict], row: dict) -> None:
        rows.append(row)
        results["model"] = rows
        print(f"  {row}", file=sys.stderr, flush=True)
        save()

    parts = {"numerics": lambda: check_numerics(device, args.quick), "models": lambda: check_models(device),
             "memory": lambda: memory_speed(device, args.quick),
             "model": lambda: model_speed(device, args.quick, args.cell_budget, deadline, on_row,
                                           args.variants.split(","), model_lengths)}
    for part, run in parts.items():
        if part in args.skip.split(","):
            continue
        graph_chunks(args.graphs and part in ("models", "model"))
        t0 = time.perf_counter()
        try:
            results[part] = run()
        except Exception:
            traceback.print_exc()
            error = traceback.format_exc().splitlines()[-1][:160]
            results[part] = [{"check": part, "error": error, "ok": False}]
        if args.graphs and part in ("models", "model"):
            for row in results[part]:
                row["check"] += " (graphs)"
        graph_chunks(False)
        print(f"{part}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        save()
    print(save())
    rows = [r for part_rows in results.values() for r in part_rows]
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
