"""LoRA training benchmark: ``optiq lora`` vs ``mlx_lm.lora``, and by_bits vs constant rank.

1. Speed and memory. The same quantized model, data and settings (rank 8 on every linear
   layer of every block, scale 20, Adam 1e-5, batch 4, same iterations) are trained by
   stock ``mlx_lm.lora`` (its Python API: ``mlx_lm.lora.train_model``) and by OptiQ, each in
   its own process. Reported per tool:

   * tokens/s: trained (loss) tokens per second of training-step time, as both tools
     define it; "steady" leaves out the first report window (compilation, warm-up);
   * peak MLX memory: ``mx.get_peak_memory()`` over training, reset right before it;
   * max RSS of the whole process (``getrusage`` in the worker), model loading included.

   Both processes preload the system OpenBLAS (``import optiq.core``), so the difference
   is what each does with it: mlx-lm trains the bf16 model through MLX's CPU quantized
   matmul and the token-by-token Gated DeltaNet loop; OptiQ computes in fp32 with
   dequantize + GEMM and the chunked Gated DeltaNet recurrence.

2. Ablation on the bundled model's OptiQ quant (``optiq-tiny-optiq``, shipped in optiq-core,
   built by ``tools/build_bundled_quant.py``: 4.5 bpw from 3/4/5/6/8 bits, so the adapted
   layers span five widths): validation loss after a fixed number of steps for ``by_bits``
   against ``constant`` rank with the same trainable-parameter budget (the two constant
   ranks that bracket it), over several seeds, and by_sensitivity at its own count. The
   task is new to the model: arithmetic prompt/completion records with the prompt masked,
   a fresh record for every step, a disjoint validation set.

Run:  uv run python benchmarks/lora_train.py            (both parts, ~25 min on 2 cores; the
                                                         mlx-lm run alone is ~8 min)
      uv run python benchmarks/lora_train.py --quick    (small sizes, a few minutes)
      --skip-speed                                      (the ablation alone, ~14 min)
      --quant DIR reuses an existing ``optiq convert`` output instead of converting again;
      --ablation-quant DIR / --ablation-convert ARGS run the ablation on another quant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------- setup


class ConvertFailed(RuntimeError):
    """``optiq convert`` did not produce the quant the benchmark was asked to measure."""


def quantized_model(base: Path, out: Path, convert_args: list[str]) -> tuple[Path, str]:
    """The model's OptiQ quant (``optiq convert`` with ``convert_args``).

    A failed convert stops the benchmark: numbers measured on some other model would be
    reported under the wrong name.
    """
    out.mkdir(parents=True, exist_ok=True)
    quant = out / ("quant" + "_".join(a.strip("-") for a in convert_args))
    cmd = [sys.executable, "-m", "optiq.cli.main", "convert", str(base), "-o", str(quant), *convert_args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ConvertFailed(f"`{' '.join(cmd)}` did not finish in 30 minutes") from None
    if r.returncode != 0 or not (quant / "config.json").exists():
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConvertFailed(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {why}")
    return quant, f"optiq convert {' '.join(convert_args) or '(defaults)'}"


def make_data(base: Path, out: Path, n_train: int, n_valid: int, tokens: int) -> Path:
    """Text records of about ``tokens`` tokens (never more) from the model's held-out text."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(base)
    words = (base / "heldout.txt").read_text().split()
    recs, i = [], 0
    while len(recs) < n_train + n_valid:
        n = 8
        while i + n < len(words) and len(tok.encode(" ".join(words[i : i + n + 8]))) < tokens - 1:
            n += 8
        recs.append(" ".join(words[i : i + n]))
        i = (i + n) % max(len(words) - n, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in recs[:n_train]))
    (out / "valid.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in recs[n_train:]))
    return out


# ---------------------------------------------------------------------------- workers


def make_arith_data(out: Path, n_train: int, n_valid: int) -> Path:
    """Prompt/completion arithmetic ("What is 23 times 4?" -> "23 * 4 = 92"): a task the
    bundled model has never seen, with fresh records for every step (no overfitting) and a
    disjoint validation set."""
    import random

    def rec(rng):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        op, sym, r = rng.choice([("plus", "+", a + b), ("minus", "-", a - b), ("times", "*", a * b)])
        return {"prompt": f"What is {a} {op} {b}?", "completion": f"{a} {sym} {b} = {r}"}

    out.mkdir(parents=True, exist_ok=True)
    train_rng, valid_rng = random.Random(0), random.Random(12345)
    (out / "train.jsonl").write_text("".join(json.dumps(rec(train_rng)) + "\n" for _ in range(n_train)))
    (out / "valid.jsonl").write_text("".join(json.dumps(rec(valid_rng)) + "\n" for _ in range(n_valid)))
    return out


def worker_optiq(cfg: dict) -> dict:
    import optiq.core  # noqa: F401
    from optiq.train.lora import LoraOptions, train_lora
    from optiq.train.trainer import NullReporter, TrainArgs

    windows = []

    class Capture(NullReporter):
        def on_report(self, r):
            windows.append((r.step, r.tokens_per_second, r.loss))

    opts = LoraOptions(
        data=Path(cfg["data"]), output=Path(cfg["out"]), model=cfg["model"], rank=cfg["rank"],
        rank_scaling=cfg["scaling"], target_modules=cfg.get("keys") or "all-linear", num_layers=-1,
        scale=20.0, mask_prompt=cfg.get("mask_prompt", False),
        overwrite=True,
        train=TrainArgs(iters=cfg["iters"], batch_size=cfg["batch_size"], learning_rate=cfg["lr"],
                        max_seq_length=cfg["max_seq_length"], val_batches=cfg["val_batches"],
                        steps_per_eval=cfg["iters"], steps_per_report=cfg["report"],
                        save_every=cfg["iters"], seed=cfg["seed"]),
    )
    lines = []
    r = train_lora(opts, echo=lines.append, reporter=Capture())
    state = json.loads((Path(cfg["out"]) / "trainer_state.json").read_text())
    params = next(int(x.split()[2].replace(",", "")) for x in lines if x.startswith("trainable parameters"))
    return {
        "windows": windows, "tokens": state["trained_tokens"], "seconds": state["train_seconds"],
        "peak_memory": r.peak_memory, "val_loss": r.val_losses[-1][1], "val0": r.val_losses[0][1],
        "trainable": params,
    }


def worker_mlx_lm(cfg: dict) -> dict:
    import types

    import optiq.core  # noqa: F401  (same OpenBLAS preload as the OptiQ worker)
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    windows, vals = [], []

    class Capture(TrainingCallback):
        def on_train_loss_report(self, info):
            windows.append((info["iteration"], info["tokens_per_second"], info["train_loss"],
                            info["peak_memory"]))

        def on_val_loss_report(self, info):
            vals.append(info["val_loss"])

    args = dict(CONFIG_DEFAULTS)
    args.update(
        model=cfg["model"], train=True, data=cfg["data"], num_layers=-1,
        batch_size=cfg["batch_size"], iters=cfg["iters"], val_batches=cfg["val_batches"],
        learning_rate=cfg["lr"], steps_per_report=cfg["report"], steps_per_eval=cfg["iters"],
        save_every=cfg["iters"], adapter_path=cfg["out"], max_seq_length=cfg["max_seq_length"],
        seed=cfg["seed"],
        lora_parameters={"rank": cfg["rank"], "dropout": 0.0, "scale": 20.0, "keys": cfg["keys"]},
    )
    args = types.SimpleNamespace(**args)
    model, tokenizer = load(cfg["model"])
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    train_model(args, model, train_set, valid_set, training_callback=Capture())
    wall = time.perf_counter() - t0
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "windows": [(s, t, l) for s, t, l, _ in windows], "peak_memory": int(mx.get_peak_memory()),
        "val_loss": vals[-1] if vals else None, "val0": vals[0] if vals else None,
        "trainable": trainable, "wall": wall,
    }


def run_worker(kind: str, cfg: dict) -> dict:
    """Run one training in a fresh process; adds its max RSS (bytes) and wall time."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(HERE), "--worker", kind, f.name],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    os.unlink(f.name)
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_wall"] = wall
    result["max_rss"] = result["self_max_rss"]
    return result


def _steady(windows: list) -> float:
    """Mean tokens/s of the report windows after the first (compilation and warm-up)."""
    rest = windows[1:] or windows
    return sum(t for _, t, *_ in rest) / len(rest) if rest else float("nan")


# ---------------------------------------------------------------------------- parts


def shared_keys(model: Path, rank: int) -> list[str]:
    """Linear layers (paths inside a block) both tools adapt at ``rank``: every linear whose
    smaller side is at least the rank (OptiQ clamps the rank of narrower ones, mlx-lm
    does not, so those would make the runs differ)."""
    import optiq.core  # noqa: F401
    from optiq.core.model_io import load_model
    from optiq.train.targets import find_targets

    sel = find_targets(load_model(model).model, "all-linear", -1)
    return sorted({t.name for t in sel.targets if t.max_rank >= rank})


def speed(args, model: Path, data: Path, tmp: Path) -> list[dict]:
    keys = shared_keys(model, 8)
    cfg = dict(model=str(model), data=str(data), rank=8, iters=args.iters, batch_size=args.batch_size,
               lr=1e-5, max_seq_length=args.max_seq_length, val_batches=2, report=args.report, seed=0,
               keys=keys)
    rows = []
    for kind, scaling in (("mlx-lm", None), ("optiq", "constant"), ("optiq", "by_bits")):
        c = dict(cfg, out=str(tmp / f"speed_{kind}_{scaling}"), scaling=scaling)
        print(f"[speed] {kind} {scaling or ''} ...", flush=True)
        r = run_worker(kind, c)
        overall = (sum(t for _, t, *_ in r["windows"]) / len(r["windows"])) if r["windows"] else 0
        rows.append({
            "tool": "mlx_lm.lora" if kind == "mlx-lm" else f"optiq lora ({scaling})",
            "trainable": r["trainable"], "steady_tps": _steady(r["windows"]),
            "first_window_tps": r["windows"][0][1] if r["windows"] else float("nan"),
            "mean_window_tps": overall, "peak_gb": r["peak_memory"] / 1e9,
            "rss_gb": (r["max_rss"] or 0) / 1e9, "wall_s": r["process_wall"],
            "val_loss": r["val_loss"],
        })
    return rows


def resolve_float(model: Path) -> Path:
    """The float model a quant was made from (optiq convert records it; the bundled quant
    records the bundled name), else the bundled one."""
    from optiq.core.model_io import resolve_model_path

    meta = model / "optiq_metadata.json"
    if meta.exists():
        src = resolve_model_path(json.loads(meta.read_text()).get("source_model"))
        if src.exists():
            return src
    return resolve_model_path(None)


def ablation(args, model: Path, tmp: Path) -> dict:
    import optiq.core  # noqa: F401
    from optiq.core.model_io import load_model
    from optiq.train.ranks import plan_ranks, read_quant_info
    from optiq.train.targets import find_targets

    data = make_arith_data(tmp / "arith", n_train=args.ablation_iters * args.batch_size, n_valid=64)
    lm = load_model(model)
    sel = find_targets(lm.model, "all-linear", -1)
    quant = read_quant_info(model, lm.config)
    plan = plan_ranks(sel.targets, rank=args.rank, scaling="by_bits", quant=quant)
    budget = plan.trainable_parameters
    per_rank = {}
    for r in range(1, 4 * args.rank):
        per_rank[r] = plan_ranks(sel.targets, rank=r, scaling="constant").trainable_parameters
    lo = max((r for r, p in per_rank.items() if p <= budget), default=1)
    hi = min((r for r, p in per_rank.items() if p >= budget), default=lo)
    del lm
    configs = [("by_bits", args.rank, budget)] + [("constant", r, per_rank[r]) for r in sorted({lo, hi})]
    if quant is not None and quant.has_sensitivity:  # extra arm, at its own parameter count
        sens = plan_ranks(sel.targets, rank=args.rank, scaling="by_sensitivity", quant=quant)
        configs.append(("by_sensitivity", args.rank, sens.trainable_parameters))
    results = {}
    for scaling, rank, params in configs:
        losses = []
        for seed in args.seeds:
            print(f"[ablation] {scaling} rank {rank} seed {seed} ...", flush=True)
            c = dict(model=str(model), data=str(data), rank=rank, scaling=scaling,
                     iters=args.ablation_iters, batch_size=args.batch_size, lr=args.ablation_lr,
                     max_seq_length=128, val_batches=-1, report=args.ablation_iters,
                     seed=seed, mask_prompt=True, out=str(tmp / f"abl_{scaling}_{rank}_{seed}"))
            r = run_worker("optiq", c)
            assert r["trainable"] == params, (r["trainable"], params)
            losses.append(r["val_loss"])
            results.setdefault("val0", r["val0"])
        results[(scaling, rank)] = {"params": params, "losses": losses}
    from optiq.train.data import load_jsonl
    from optiq.train.trainer import evaluate

    ref = load_model(resolve_float(model))
    valid = load_jsonl(data / "valid.jsonl", ref.tokenizer, max_seq_length=128, mask_prompt=True)
    results["float_val"] = evaluate(ref.model, valid, args.batch_size, 128)
    results["ranks"] = {plan.ranks[t.path] for t in sel.targets}
    results["bits"] = sorted({plan.bits[t.path] for t in sel.targets})
    return results


def ablation_model(args, quant) -> tuple[Path, str]:
    """--ablation-quant, else a conversion with --ablation-convert, else the bundled quant
    (else optiq convert defaults, which is how the bundled quant is built)."""
    from optiq.core.model_io import bundled_quant_path, has_bundled_quant

    if args.ablation_quant is None and args.ablation_convert is None and has_bundled_quant():
        return bundled_quant_path(), "the bundled OptiQ quant (optiq-tiny-optiq)"
    return quant(args.ablation_quant, (args.ablation_convert or "").split())


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None, help="base model dir (default: bundled)")
    ap.add_argument("--quant", type=Path, default=None,
                    help="speed part: use this quantized model dir (default: optiq convert defaults)")
    ap.add_argument("--ablation-quant", type=Path, default=None,
                    help="ablation: use this quantized model dir (default: the bundled OptiQ quant)")
    ap.add_argument("--ablation-convert", default=None,
                    help="ablation: convert the base model with these optiq convert options instead, "
                         "e.g. '--target-bpw 3.5 --candidate-bits 3,4,8'")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--report", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per training record (at most)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ablation-iters", type=int, default=80)
    ap.add_argument("--ablation-lr", type=float, default=2e-4)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast look")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    if args.worker:
        kind, cfg_file = args.worker
        cfg = json.loads(Path(cfg_file).read_text())
        result = worker_mlx_lm(cfg) if kind == "mlx-lm" else worker_optiq(cfg)
        import resource

        result["self_max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return

    if args.quick:
        args.iters, args.report, args.seq_len = 10, 5, 96
        args.ablation_iters, args.seeds = 20, [0]

    import optiq.core  # noqa: F401
    from optiq.core.model_io import resolve_model_path

    args.max_seq_length = args.seq_len + 1  # records never exceed it: nothing truncated

    base = resolve_model_path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="optiq_lora_bench_"))
    try:
        def quant(given: Path | None, convert_args: list[str]) -> tuple[Path, str]:
            if given:
                meta = given / "optiq_metadata.json"
                return given, ("optiq convert (given dir)" if meta.exists() else "given dir")
            print(f"[setup] optiq convert {' '.join(convert_args)} ...", flush=True)
            return quantized_model(base, tmp, convert_args)

        data = make_data(base, tmp / "data", n_train=32, n_valid=8, tokens=args.seq_len)
        print(f"\ndata: 32 train / 8 valid text records of <= {args.seq_len} tokens from "
              f"heldout.txt; batch {args.batch_size}")
        out = {}
        if not args.skip_speed:
            model, how = quant(args.quant, [])
            print(f"speed model: {model} ({how})")
            out["speed_model"] = how
            rows = speed(args, model, data, tmp)
            out["speed"] = rows
            ref = rows[0]
            print(f"\n## Training speed and memory ({args.iters} steps, batch {args.batch_size}, "
                  f"rank 8, scale 20 on {', '.join(shared_keys(model, 8))} in every block)\n")
            print("| tool | trainable params | tok/s (steady) | tok/s (1st window) | vs mlx-lm | "
                  "peak MLX mem (GB) | vs mlx-lm | max RSS (GB) | wall (s) |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['tool']} | {r['trainable']:,} | {r['steady_tps']:,.0f} | "
                      f"{r['first_window_tps']:,.0f} | {r['steady_tps'] / ref['steady_tps']:.2f}x | "
                      f"{r['peak_gb']:.3f} | {r['peak_gb'] / ref['peak_gb']:.2f}x | {r['rss_gb']:.2f} | "
                      f"{r['wall_s']:.0f} |")
        if not args.skip_ablation:
            model, how = ablation_model(args, quant)
            print(f"ablation model: {model} ({how})")
            out["ablation_model"] = how
            res = ablation(args, model, tmp)
            print(f"\n## Ablation: by_bits vs constant rank, {args.ablation_iters} steps x batch "
                  f"{args.batch_size} of fresh arithmetic prompt/completion records (prompt masked), "
                  f"all linear layers, scale 20, lr {args.ablation_lr:g}, seeds {args.seeds}\n")
            print(f"bits of adapted modules: {res['bits']}; by_bits ranks: {sorted(res['ranks'])}; "
                  f"validation loss before training: {res['val0']:.4f} (float model: "
                  f"{res['float_val']:.4f})\n")
            print("| rank scaling | trainable params | val loss (mean) | per seed |")
            print("|---|---|---|---|")
            table = []
            for key, v in res.items():
                if not isinstance(key, tuple):
                    continue
                mean = sum(v["losses"]) / len(v["losses"])
                table.append({"scaling": key[0], "rank": key[1], "params": v["params"],
                              "mean": mean, "losses": v["losses"]})
                print(f"| {key[0]} (rank {key[1]}) | {v['params']:,} | {mean:.4f} | "
                      + ", ".join(f"{x:.4f}" for x in v["losses"]) + " |")
            out["ablation"] = {"val0": res["val0"], "float_val": res["float_val"], "runs": table,
                               "bits": res["bits"]}
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=str))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except ConvertFailed as e:
        sys.exit(f"error: {e}")
