"""Convert at real Qwen3.5 shapes: wall time and peak RSS beside ``mlx_lm.convert``.

Builds a random-weight model of a real shape in a work directory (kept for reruns),
then runs each row as its own process and samples the resident memory of its whole
process tree (sum of VmRSS over the process and its descendants) every 0.1 s. A row
that passes ``--cap-gb`` is killed before the kernel's OOM killer would be, and
reported as such. Random weights make quality meaningless here; cost is real.

    uv run python benchmarks/scale.py                       # 0.8B shape: mlx_lm, optiq static
    uv run python benchmarks/scale.py --shape 4b --rows mlx_lm,static
    uv run python benchmarks/scale.py --rows default        # optiq's default convert

Rows: ``mlx_lm`` (``mlx_lm.convert -q``), ``static`` (``optiq convert --method
static``), ``default`` (``optiq convert --target-bpw 4.5``), ``bits48`` (the default
with ``--candidate-bits 4,8``).

For the optiq rows it also prints the memory plan's estimate (``memory_plan_bytes``)
beside the measured peak, the time of each stage, and the sensitivity pass against its
compute bound: the pass's matmul FLOPs (forward to record block inputs, the per-block
recomputed forward and its backward, one projection GEMM per candidate width, and the
vocabulary-sized head: two logit passes, its gradient and its projections) divided by
the fp32 GEMM rate measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # the smallest real Qwen3.5 shape: 752M parameters, 1.5 GB bf16
    "0.8b": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                 linear_num_key_heads=16, linear_num_value_heads=16),
    # a 4B-class shape: ~4B parameters, ~8 GB bf16
    "4b": dict(hidden_size=2560, num_hidden_layers=32, intermediate_size=9216,
               num_attention_heads=16, num_key_value_heads=4, head_dim=256,
               linear_num_key_heads=16, linear_num_value_heads=32),
}
COMMON = dict(model_type="qwen3_5", vocab_size=248320, tie_word_embeddings=True,
              full_attention_interval=4, linear_key_head_dim=128, linear_value_head_dim=128,
              linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=32768,
              attention_bias=False, hidden_act="silu",
              rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25),
              torch_dtype="bfloat16", dtype="bfloat16")


def build(shape: str, out: Path) -> Path:
    """A random-weight model of ``shape`` in bf16 (built in bf16: never the fp32 model)."""
    if (out / "config.json").exists():
        return out
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import save_config, save_model

    from optiq.core.mlx_lm_seam import model_classes
    from optiq.core.model_io import bundled_model_path
    from optiq.core.tiny_models import copy_tokenizer_files, layer_types

    cfg = {**COMMON, **SHAPES[shape]}
    cfg["layer_types"] = layer_types(cfg)
    model_class, args_class = model_classes(json.loads(json.dumps(cfg)))
    mx.random.seed(0)
    model = model_class(args_class.from_dict(json.loads(json.dumps(cfg))))

    def init(path, v):
        if path.endswith("A_log"):
            return v.astype(mx.float32)
        if v.ndim >= 2:
            return (mx.random.normal(v.shape) * v.shape[-1] ** -0.5).astype(mx.bfloat16)
        return v.astype(mx.bfloat16)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.update(tree_map_with_path(init, model.parameters()))
    save_model(tmp, model)  # evaluates shard by shard
    save_config(cfg, config_path=tmp / "config.json")
    copy_tokenizer_files(bundled_model_path(), tmp)
    os.replace(tmp, out)
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (processes, not threads)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):  # children of every thread
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def gemm_rate(n: int = 2048, repeat: int = 5) -> float:
    """fp32 GEMM FLOP/s on this machine now (best of ``repeat``; OpenBLAS preloaded by optiq.core)."""
    code = (
        "import optiq.core, time, mlx.core as mx\n"
        f"a = mx.random.normal(({n}, {n})); b = mx.random.normal(({n}, {n})); mx.eval(a, b)\n"
        "best = 1e9\n"
        f"for _ in range({repeat}):\n"
        "    t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)\n"
        f"print(2 * {n}**3 / best)\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def sensitivity_flops(cfg: dict, tokens: int, widths: int) -> float:
    """Matmul FLOPs of the streamed Fisher pass (see module doc) for a qwen3_5 config."""
    H, L, V, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kd, vd = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    mlp = 3 * H * inter
    full = H * (2 * nq * hd) + 2 * H * nkv * hd + nq * hd * H
    linear = H * (2 * nk * kd + nv * vd) + H * nv * vd + 2 * H * nv + nv * vd * H
    n_full = L // cfg["full_attention_interval"]
    block_params = n_full * (full + mlp) + (L - n_full) * (linear + mlp)
    blocks = 2 * tokens * block_params * (1 + 1 + 2 + widths)  # forward, recompute, backward, projections
    head = 2 * tokens * V * H * (2 + 1 + widths)  # two logit passes, gradient, projections
    return float(blocks + head)


def run(cmd: list[str], cap: int, log: Path) -> dict:
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if peak > cap:
                proc.kill()
                killed = True
                break
            time.sleep(0.1)
        rc = proc.wait()
    return dict(seconds=time.monotonic() - t0, peak=peak, rc=rc, killed=killed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.8b")
    ap.add_argument("--rows", default="mlx_lm,static")
    ap.add_argument("--workdir", type=Path, default=Path("runs/scale"))
    ap.add_argument("--cap-gb", type=float, default=20.0)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    model = args.workdir / f"qwen3_5-{args.shape}"
    if args.build_only:
        build(args.shape, model)
        return
    # built in a child process, so this process stays small while rows run
    subprocess.run([sys.executable, __file__, "--shape", args.shape, "--workdir", str(args.workdir),
                    "--build-only"], check=True)
    print(f"model: {model} (built or reused in {time.monotonic() - t0:.0f} s)")
    optiq = [sys.executable, "-m", "optiq.cli.main", "convert", str(model)]
    rows = {
        "mlx_lm": [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(model), "-q"],
        "static": optiq + ["--method", "static", "--target-bpw", "4.5"],
        "default": optiq + ["--target-bpw", "4.5"],
        "bits48": optiq + ["--target-bpw", "4.5", "--candidate-bits", "4,8"],
    }
    rate = gemm_rate()
    cfg = {**COMMON, **SHAPES[args.shape]}
    print(f"fp32 GEMM rate now: {rate / 1e9:.0f} GFLOP/s")
    print(f"\n| {args.shape} shape | wall s | peak RSS GB | plan GB | stages s | sensitivity vs bound | result |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.rows.split(","):
        out = args.workdir / f"out-{args.shape}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = rows[name] + (["--mlx-path", str(out)] if name == "mlx_lm" else ["-o", str(out), "--force"])
        r = run(cmd, int(args.cap_gb * 2**30), args.workdir / f"{args.shape}-{name}.log")
        what = f"killed at the {args.cap_gb:g} GB cap" if r["killed"] else ("ok" if r["rc"] == 0 else f"exit {r['rc']}")
        plan = stages = bound = "-"
        meta_file = out / "optiq_metadata.json"
        if name != "mlx_lm" and r["rc"] == 0 and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            secs = meta.get("seconds", {})
            plan = f"{meta.get('memory_plan_bytes', 0) / 2**30:.2f}"
            stages = ", ".join(f"{k} {v:.0f}" for k, v in secs.items() if k in ("load", "sensitivity", "write"))
            if meta.get("method") == "optiq" and meta.get("calibration"):
                widths = len(meta["candidate_bits"])
                t_bound = sensitivity_flops(cfg, int(meta["calibration"]["tokens"]), widths) / rate
                bound = f"{secs.get('sensitivity', 0):.0f} s vs {t_bound:.0f} s ({secs.get('sensitivity', 0) / t_bound:.1f}x)"
        print(f"| {name} | {r['seconds']:.1f} | {r['peak'] / 2**30:.2f} | {plan} | {stages} | {bound} | {what} |", flush=True)


if __name__ == "__main__":
    main()
