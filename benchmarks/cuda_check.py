"""Smoke check and speed table of OptiQ on MLX's CUDA backend (run on a CUDA machine).

Checks that every OptiQ path works with ``mx.default_device() == gpu``: loading (the CPU
layer path must stay off), GPU-vs-CPU logits, stock generation speed for the float and
4-bit model, and the CLI jobs (convert, eval, kv-cache, serve + generate) end to end.

    python benchmarks/cuda_check.py OUT_DIR        (see tools/cuda_check.sh)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optiq.core  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import quantize_model

from optiq.core.model_io import bundled_model_path, load_model

CLI = [sys.executable, "-m", "optiq.cli.main"]


def step(name: str, fn) -> tuple[str, str, float, str]:
    """Run one check; print its row at once (a killed run still shows what finished)."""
    t = time.perf_counter()
    try:
        detail = fn()
        status = "ok"
    except Exception as e:  # report every failure, keep going
        detail, status = f"{type(e).__name__}: {e}"[:300], "FAIL"
    row = (name, status, time.perf_counter() - t, detail)
    print(f"{row[0]:<24} {row[1]:<6} {row[2]:>8.1f}  {row[3]}", flush=True)
    return row


def run_cli(*args: str, timeout: int = 300) -> str:
    p = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"optiq {' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-300:]}")
    return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/optiq-cuda")
    out.mkdir(parents=True, exist_ok=True)
    print(f"mlx {mx.__version__}, default device {mx.default_device()}, cuda {mx.cuda.is_available()}")
    rows = []
    ids = load_model(None, fast_cpu=False).tokenizer.encode((bundled_model_path() / "heldout.txt").read_text())

    def loading():
        lm = load_model(None)
        dtypes = sorted({str(p.dtype) for _, p in tree_flatten(lm.model.parameters())})
        assert mx.default_device() == mx.gpu, "MLX did not pick the GPU"
        assert "mlx.core.bfloat16" in dtypes, f"CPU path applied on GPU: {dtypes}"
        gpu = lm.model(mx.array(ids[:256])[None]).astype(mx.float32)
        with mx.stream(mx.cpu):
            cpu_model = load_model(None, fast_cpu=False).model
            from optiq.core.cpu import cast_floats

            cast_floats(cpu_model)
            ref = cpu_model(mx.array(ids[:256])[None])
            mx.eval(ref)
        diff = float(mx.abs(gpu - ref).max())
        agree = float((gpu.argmax(-1) == ref.argmax(-1)).mean())
        return f"dtypes {dtypes}; GPU bf16 vs CPU fp32 logits max|d| {diff:.3f}, argmax agree {agree:.0%}"

    rows.append(step("load + logits", loading))

    def speed(bits):
        def fn():
            lm = load_model(None)
            if bits:
                quantize_model(lm.model, {}, group_size=64, bits=bits)
            last = None
            for _ in range(2):
                for last in stream_generate(lm.model, lm.tokenizer, ids[:1024], max_tokens=128, sampler=make_sampler(0.0)):
                    pass
            return f"prefill {last.prompt_tps:.0f} tok/s, decode {last.generation_tps:.0f} tok/s (1024-token prompt)"

        return fn

    rows.append(step("generate bf16", speed(None)))
    rows.append(step("generate 4-bit", speed(4)))
    rows.append(step("optiq kv-cache", lambda: run_cli("kv-cache", "--target-bits", "4.5", "-o", str(out / "kv"))))

    def lora():
        import json

        data = out / "lora-data"
        data.mkdir(exist_ok=True)
        paras = [p for p in (bundled_model_path() / "heldout.txt").read_text().split("\n\n") if p.strip()]
        for name, part in (("train", paras[:48]), ("valid", paras[48:64])):
            (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in part))
        return run_cli("lora", "train", "--data", str(data), "--iters", "20", "--batch-size", "4",
                       "--max-seq-length", "256", "--long-records", "truncate", "--steps-per-eval", "10",
                       "--learning-rate", "1e-4", "-o", str(out / "adapter"), "--overwrite", "--quiet")

    rows.append(step("optiq lora train", lora))

    def serve():
        port = "50917"
        log = open(out / "serve.log", "w")
        srv = subprocess.Popen(
            [*CLI, "serve", "--port", port, "--kv-config", str(out / "kv" / "kv_config.json"),
             "--shutdown-grace", "5"],
            stdout=log, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.time() + 120
            while True:
                try:
                    return run_cli("generate", "What is a lawyer?", "--port", port, "--max-tokens", "24", timeout=60)
                except RuntimeError:
                    if time.time() > deadline or srv.poll() is not None:  # see serve.log
                        raise
                    time.sleep(2)
        finally:
            srv.terminate()
            srv.wait(30)

    rows.append(step("optiq serve + generate", serve))
    rows.append(step("optiq convert", lambda: run_cli("convert", "--target-bpw", "4.5", "-o", str(out / "q"), "--force")))
    rows.append(step("optiq eval", lambda: run_cli("eval", str(out / "q"), "--reference", str(bundled_model_path()))))

    print(f"\n{'check':<24} {'status':<6} {'seconds':>8}  detail")
    for name, status, secs, detail in rows:
        print(f"{name:<24} {status:<6} {secs:>8.1f}  {detail}")
    sys.exit(0 if all(r[1] == "ok" for r in rows) else 1)


if __name__ == "__main__":
    main()
