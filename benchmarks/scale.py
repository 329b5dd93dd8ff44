"""Convert at real Qwen3.5 shapes: wall time and peak RSS beside ``mlx_lm.convert``.

Builds a random-weight model of a real shape in a work directory (kept for reruns),
then runs each row as its own process and samples the resident memory of its whole
process tree (sum of VmRSS over the process and its descendants) every 0.1 s. A row
that passes ``--cap-gb`` is killed before the kernel's OOM killer would be, and
reported as such. Random weights make quality meaningless here; cost is real.

    uv run python benchmarks/scale.py                       # 0.8B shape: mlx_lm, optiq static
    uv run python benchmarks/scale.py --shape 4b --rows mlx_lm,static
    uv run python benchmarks/scale.py --rows default        # optiq's default convert

Rows (``--rows``; each registered with ``@row``): ``mlx_lm`` (``mlx_lm.convert -q``), ``static`` (``optiq convert --method
static``), ``default`` (``optiq convert --target-bpw 4.5``), ``bits48`` (the default
with ``--candidate-bits 4,8``), ``eval`` (``optiq eval`` of the 4-bit quant against the
model on the bundled held-out text, against the compute bound of both forward passes)
and ``eval_mlx_lm`` (its mlx-lm peer, ``benchmarks/eval_mlx_lm.py``, on the first 64 tokens),
``kv_cache`` (``optiq kv-cache`` on the 4-bit quant, ``--target-bits 4.5
--candidate-bits 4,8``; mlx-lm has no KV sensitivity search, so no peer row: its
``--kv-bits`` is one width the user picks);
generation on the 4-bit quant: ``serve`` (one request to
``optiq serve``: a 256-token prompt, 64 tokens; ``benchmarks/serve_once.py``),
``serve_batch`` (8 requests at once, 32-token prompts, 64 tokens each: aggregate decode
tok/s), ``generate_mlx_lm`` (``mlx_lm generate`` on the quant) and ``generate_mlx_lm_bf16`` (on
the bf16 model), both with a 16-token prompt (stock mlx-lm's CPU prefill of 256 tokens
took over 15 minutes); their notes give prefill s, decode tok/s and the decode's
memory-bandwidth bound (weight bytes / the copy bandwidth measured in the run);
``lora`` / ``lora_mlx_lm`` (5 LoRA steps on the 4-bit quant,
batch 1, rank 8 on q_proj/v_proj of the last 16 blocks, ~120-token records cut from the
bundled calibration text; ``mlx_lm lora`` stopped after 7 minutes), ``lora_plan`` (the
training ceiling map up to 1024 tokens under 6 GB).

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
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def layer_params(cfg: dict) -> list[int]:
    """Matmul parameters of each decoder block of a qwen3_5 config (full or linear attention, + MLP)."""
    H, L, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kd, vd = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    mlp = 3 * H * inter
    full = H * (2 * nq * hd) + 2 * H * nkv * hd + nq * hd * H
    linear = H * (2 * nk * kd + nv * vd) + H * nv * vd + 2 * H * nv + nv * vd * H
    every = cfg["full_attention_interval"]
    return [(full if (i + 1) % every == 0 else linear) + mlp for i in range(L)]


def sensitivity_flops(cfg: dict, tokens: int, widths: int) -> float:
    """Matmul FLOPs of the streamed Fisher pass (see module doc) for a qwen3_5 config."""
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    blocks = 2 * tokens * sum(layer_params(cfg)) * (1 + 1 + 2 + widths)  # forward, recompute, backward, projections
    head = 2 * tokens * V * H * (2 + 1 + widths)  # two logit passes, gradient, projections
    return float(blocks + head)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def kv_flops(cfg: dict, tokens: int, widths: int, chosen_pass: bool) -> tuple[float, float]:
    """Matmul FLOPs of ``optiq kv-cache`` (sensitivity pass, chosen-config pass) for a qwen3_5
    config: the reference through every block, each variant from its first quantized layer
    on (K and V of every KV layer at each width, and the two uniform configs from the first
    KV layer), the head once per variant and once for the reference; the chosen config gets
    a pass of its own only when it is not one of the uniform ones."""
    per = layer_params(cfg)
    kv = [i for i in range(len(per)) if (i + 1) % cfg["full_attention_interval"] == 0]
    head = 2 * tokens * cfg["vocab_size"] * cfg["hidden_size"]
    ref = 2 * tokens * sum(per) + head
    whole = 2 * tokens * sum(per[kv[0]:]) + head
    sens = ref + sum(2 * widths * (2 * tokens * sum(per[k:]) + head) for k in kv) + 2 * whole
    return float(sens), float(ref + whole) if chosen_pass else 0.0


def forward_flops(cfg: dict, tokens: int) -> float:
    """Matmul FLOPs of one full-precision forward of ``tokens`` (blocks and head)."""
    return 2.0 * tokens * (sum(layer_params(cfg)) + cfg["vocab_size"] * cfg["hidden_size"])


def run(cmd: list[str], cap: int, log: Path, timeout: float | None = None) -> dict:
    t0, cpu0 = time.monotonic(), _children_cpu()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        peak, killed, timed_out = 0, False, False
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if peak > cap:
                proc.kill()
                killed = True
                break
            if timeout is not None and time.monotonic() - t0 > timeout:
                proc.kill()
                timed_out = True
                break
            time.sleep(0.1)
        rc = proc.wait()
    # CPU seconds of the row's process tree: on a shared machine wall time also counts waiting
    return dict(seconds=time.monotonic() - t0, cpu=_children_cpu() - cpu0, peak=peak, rc=rc, killed=killed, timed_out=timed_out, log=log)


@dataclass
class Ctx:
    """What a row needs: the shape, its config, the bf16 model, the work dir, the GEMM rate."""

    shape: str
    cfg: dict
    model: Path
    workdir: Path
    rate: float
    cap: int
    _bandwidth: float | None = None

    def bandwidth(self) -> float:
        """Copy bandwidth measured now (once per run): the generation rows' decode bound."""
        if self._bandwidth is None:
            self._bandwidth = copy_bandwidth()
        return self._bandwidth

    def quant(self) -> Path:
        """The model's 4-bit quant from ``mlx_lm.convert -q`` (built once, reused): what
        eval, kv-cache, lora and serve rows run on, as a user would."""
        out = self.workdir / f"qwen3_5-{self.shape}-q4"
        if not (out / "config.json").exists():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(self.model), "-q",
                            "--mlx-path", str(tmp)], check=True, stdout=subprocess.DEVNULL)
            os.replace(tmp, out)
        return out

    def out(self, name: str) -> Path:
        out = self.workdir / f"out-{self.shape}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        return out


@dataclass
class Row:
    """One command to time, and how to read what it measured once it has run."""

    cmd: list[str]
    notes: Callable[[dict], str] = lambda result: ""
    timeout: float | None = None  # seconds; the row is stopped there and reported as such


ROWS: dict[str, Callable[[Ctx], Row]] = {}


def row(name: str):
    """Register a row: a function of the context returning the :class:`Row` to run."""

    def register(fn: Callable[[Ctx], Row]) -> Callable[[Ctx], Row]:
        ROWS[name] = fn
        return fn

    return register


OPTIQ = [sys.executable, "-m", "optiq.cli.main"]


# ------------------------------------------------------------------ convert rows
@row("mlx_lm")
def _mlx_lm(ctx: Ctx) -> Row:
    return Row([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(ctx.model), "-q",
                "--mlx-path", str(ctx.out("mlx_lm"))])


def _convert(ctx: Ctx, name: str, flags: list[str]) -> Row:
    out = ctx.out(name)
    return Row(OPTIQ + ["convert", str(ctx.model), *flags, "-o", str(out), "--force"],
               lambda r: convert_notes(ctx, out, r))


def convert_notes(ctx: Ctx, out: Path, r: dict) -> str:
    """Plan estimate, stage times and the sensitivity pass against its compute bound."""
    meta_file = out / "optiq_metadata.json"
    if r["rc"] != 0 or not meta_file.exists():
        return ""
    meta = json.loads(meta_file.read_text())
    secs = meta.get("seconds", {})
    notes = [f"plan {meta.get('memory_plan_bytes', 0) / 2**30:.2f} GB"]
    notes += [f"{k} {v:.0f} s" for k, v in secs.items() if k in ("load", "sensitivity", "write")]
    if meta.get("method") == "optiq" and meta.get("calibration"):
        widths = len(meta["candidate_bits"])
        t_bound = sensitivity_flops(ctx.cfg, int(meta["calibration"]["tokens"]), widths) / ctx.rate
        s = secs.get("sensitivity", 0)
        notes.append(f"sensitivity {s:.0f} s vs bound {t_bound:.0f} s ({s / t_bound:.1f}x)")
    return "; ".join(notes)


row("static")(lambda ctx: _convert(ctx, "static", ["--method", "static", "--target-bpw", "4.5"]))
row("default")(lambda ctx: _convert(ctx, "default", ["--target-bpw", "4.5"]))
row("bits48")(lambda ctx: _convert(ctx, "bits48", ["--target-bpw", "4.5", "--candidate-bits", "4,8"]))


# ------------------------------------------------------------------ eval rows
def eval_flops(cfg: dict, tokens: int, models: int = 2) -> float:
    """Matmul FLOPs of ``models`` forward passes over ``tokens``, the vocabulary-sized head included."""
    return models * forward_flops(cfg, tokens)


def _log_text(ctx: Ctx, name: str) -> str:
    log = ctx.workdir / f"{ctx.shape}-{name}.log"
    return log.read_text() if log.exists() else ""


@row("eval")
def _eval(ctx: Ctx) -> Row:
    """``optiq eval QUANT --reference MODEL`` on the bundled held-out text (7,680 tokens)."""

    def notes(r: dict) -> str:
        text = _log_text(ctx, "eval")
        got = dict(re.findall(r"^(perplexity|mean KL|reference):\s+(.*)$", text, re.M))
        tokens = re.search(r"\((\d+) tokens, windows", text)
        if r["rc"] != 0 or not tokens:
            return ""
        bound = eval_flops(ctx.cfg, int(tokens.group(1))) / ctx.rate
        return (f"{tokens.group(1)} tokens; perplexity {got.get('perplexity')}, reference {got.get('reference', '').split('(')[-1].rstrip(')')}; "
                f"mean KL {got.get('mean KL', '').split(' ')[0]}; {r['seconds']:.0f} s vs compute bound {bound:.0f} s "
                f"({r['seconds'] / bound:.2f}x); CPU {r['cpu']:.0f} s (the bound uses 2 cores: {2 * bound:.0f} CPU s)")

    return Row(OPTIQ + ["eval", str(ctx.quant()), "--reference", str(ctx.model)], notes)


@row("eval_mlx_lm")
def _eval_mlx_lm(ctx: Ctx) -> Row:
    """The mlx-lm peer (benchmarks/eval_mlx_lm.py): stock bf16 CPU compute, so 64 tokens only."""
    from optiq.core.evaluate import default_eval_text

    def notes(r: dict) -> str:
        lines = [ln for ln in _log_text(ctx, "eval_mlx_lm").splitlines() if ln.startswith("{")]
        if r["rc"] != 0 or not lines:
            return ""
        j = json.loads(lines[-1])
        full = 7680 * j["s_per_token"]
        bound = eval_flops(ctx.cfg, 7680) / ctx.rate
        return (f"{j['tokens']} tokens only; perplexity {j['perplexity']:.4f}, reference {j['reference_perplexity']:.4f}; "
                f"mean KL {j['mean_kl']:.6f}; scoring {j['score_s']:.0f} s ({j['s_per_token']:.3f} s/token: "
                f"~{full:.0f} s for 7,680 tokens, {full / bound:.1f}x the fp32 compute bound {bound:.0f} s)")

    script = Path(__file__).with_name("eval_mlx_lm.py")
    return Row([sys.executable, str(script), str(ctx.quant()), str(ctx.model), str(default_eval_text())], notes)


# ------------------------------------------------------------------ kv-cache row
# mlx-lm has no KV sensitivity search (its --kv-bits is one uniform width for every layer,
# chosen by the user), so this row has no mlx-lm peer.
@row("kv_cache")
def _kv_cache(ctx: Ctx) -> Row:
    out = ctx.out("kv_cache")
    return Row(OPTIQ + ["kv-cache", str(ctx.quant()), "--target-bits", "4.5", "--candidate-bits", "4,8",
                        "-o", str(out)], lambda r: kv_notes(ctx, out, r))


def kv_notes(ctx: Ctx, out: Path, r: dict) -> str:
    """Stage times, the chosen bits and measured KL, and each pass against its compute bound."""
    sens_file, cfg_file = out / "kv_sensitivity.json", out / "kv_config.json"
    if r["rc"] != 0 or not sens_file.exists():
        return ""
    sens, cfg = json.loads(sens_file.read_text()), json.loads(cfg_file.read_text())
    tokens = sens["seq_len"] * sens["n_samples"]
    measured = sens["measured_kl_of_whole_configs"]
    t_sens, t_chosen = sens["seconds"], sens["seconds_chosen_config"]
    b_sens, b_chosen = (f / ctx.rate for f in kv_flops(ctx.cfg, tokens, len(sens["candidate_bits"]), t_chosen > 0))
    bits = sorted({(e["k_bits"], e["v_bits"]) for e in cfg["layers"]})
    chosen = "uniform K%d/V%d" % bits[0] if len(bits) == 1 else ", ".join(
        f"L{e['layer']} K{e['k_bits']}/V{e['v_bits']}" for e in cfg["layers"])
    fwd = forward_flops(ctx.cfg, tokens) / ctx.rate
    own = f"chosen-config pass {t_chosen:.0f} s vs bound {b_chosen:.0f} s" if t_chosen > 0 else "no chosen-config pass (uniform)"
    return (f"sensitivity {t_sens:.0f} s vs bound {b_sens:.0f} s ({t_sens / b_sens:.1f}x); {own}; one forward of the "
            f"{tokens} tokens: bound {fwd:.0f} s; chosen {chosen} (achieved {cfg['achieved_bits']:.3f} bits), "
            f"measured KL {measured['chosen']:.3g}; no mlx-lm peer (no KV sensitivity search)")


# ------------------------------------------------------------------ generation rows
PROMPT_TOKENS = 256  # the serve row's prompt
PEER_PROMPT_TOKENS = 16  # stock mlx_lm's prompt: its CPU prefill of 256 tokens took over 15 minutes
GEN_TOKENS = 64
BATCH_REQUESTS = 8  # the serve_batch row: requests decoded together
BATCH_PROMPT_TOKENS = 32


def copy_bandwidth(mb: int = 512, repeat: int = 5) -> float:
    """Memory bandwidth now, STREAM-style: bytes read + written per second by a large
    numpy copy (best of ``repeat``)."""
    code = (
        "import time, numpy as np\n"
        f"a = np.ones({mb} << 18, np.float32); b = np.empty_like(a); np.copyto(b, a)\n"
        "best = 1e9\n"
        f"for _ in range({repeat}):\n"
        "    t = time.perf_counter(); np.copyto(b, a); best = min(best, time.perf_counter() - t)\n"
        "print(2 * a.nbytes / best)\n"
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def prompt_file(ctx: Ctx, tokens: int) -> Path:
    """A plain-text prompt of ``tokens`` tokens under the model's tokenizer (written once)."""
    from tokenizers import Tokenizer

    out = ctx.workdir / f"prompt-{tokens}.txt"
    if not out.exists():
        tok = Tokenizer.from_file(str(ctx.model / "tokenizer.json"))
        words = ("the quick brown fox jumps over the lazy dog while a model reads "
                 "one long prompt to measure its prefill").split()
        text, i = "", 0
        while len(tok.encode(text).ids) < tokens:
            text, i = f"{text} {words[i % len(words)]}".strip(), i + 1
        out.write_text(text)
    return out


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def bound_note(ctx: Ctx, model: Path) -> str:
    """Decode's memory-bandwidth bound: each token reads every weight byte once."""
    bw = ctx.bandwidth()
    return (f"bandwidth bound {bw / weight_bytes(model):.1f} tok/s "
            f"({weight_bytes(model) / 1e6:.0f} MB of weights / {bw / 1e9:.1f} GB/s copy bandwidth)")


@row("serve")
def _serve(ctx: Ctx) -> Row:
    """One request to a real ``optiq serve`` on the quant: prefill of the 256-token prompt,
    then GEN_TOKENS decoded (benchmarks/serve_once.py prints the usage as JSON)."""
    q = ctx.quant()
    log = ctx.workdir / f"{ctx.shape}-serve.log"

    def notes(r: dict) -> str:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")] if log.exists() else []
        if r["rc"] != 0 or not lines:
            return ""
        u = json.loads(lines[-1])
        return (f"prompt {u['prompt_tokens']} tokens: prefill {u['prefill_s']:.1f} s; decode "
                f"{u['decode_tok_s']:.1f} tok/s over {u['completion_tokens']} tokens; {bound_note(ctx, q)}")

    return Row([sys.executable, str(Path(__file__).with_name("serve_once.py")), str(q),
                "--prompt-file", str(prompt_file(ctx, PROMPT_TOKENS)), "--max-tokens", str(GEN_TOKENS)],
               notes)


@row("serve_batch")
def _serve_batch(ctx: Ctx) -> Row:
    """BATCH_REQUESTS requests at once to ``optiq serve`` on the quant (batched decode:
    each step multiplies BATCH_REQUESTS rows through every layer), BATCH_PROMPT_TOKENS-token
    prompts, GEN_TOKENS each; aggregate decode tok/s."""
    q = ctx.quant()
    log = ctx.workdir / f"{ctx.shape}-serve_batch.log"

    def notes(r: dict) -> str:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")] if log.exists() else []
        if r["rc"] != 0 or not lines:
            return ""
        u = json.loads(lines[-1])
        return (f"{u['concurrency']} requests of {u['prompt_tokens']} prompt tokens: slowest first token "
                f"{u['prefill_s']:.1f} s; aggregate decode {u['decode_tok_s']:.1f} tok/s "
                f"({u['completion_tokens']} tokens each)")

    return Row([sys.executable, str(Path(__file__).with_name("serve_once.py")), str(q),
                "--prompt-file", str(prompt_file(ctx, BATCH_PROMPT_TOKENS)), "--max-tokens", str(GEN_TOKENS),
                "--concurrency", str(BATCH_REQUESTS)], notes)


def _mlx_lm_generate(ctx: Ctx, name: str, model: Path) -> Row:
    """Stock ``mlx_lm generate`` (its own timing lines: prompt and generation tokens/s)."""
    log = ctx.workdir / f"{ctx.shape}-{name}.log"

    def notes(r: dict) -> str:
        text = log.read_text() if log.exists() else ""
        p = re.search(r"Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec", text)
        g = re.search(r"Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", text)
        if not (p and g):
            return ""
        return (f"prompt {p.group(1)} tokens (short: see PEER_PROMPT_TOKENS): prefill "
                f"{int(p.group(1)) / float(p.group(2)):.1f} s; decode {float(g.group(2)):.2f} tok/s over "
                f"{g.group(1)} tokens; {bound_note(ctx, model)}")

    prompt = prompt_file(ctx, PEER_PROMPT_TOKENS).read_text()
    return Row([sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", prompt,
                "--max-tokens", str(GEN_TOKENS), "--ignore-chat-template"], notes)


row("generate_mlx_lm")(lambda ctx: _mlx_lm_generate(ctx, "generate_mlx_lm", ctx.quant()))
row("generate_mlx_lm_bf16")(lambda ctx: _mlx_lm_generate(ctx, "generate_mlx_lm_bf16", ctx.model))


# ------------------------------------------------------------------ LoRA rows
LORA_STEPS = 5
LORA_TOKENS = 120  # tokens per record (EOS included)
LORA_TIMEOUT = 420.0  # mlx_lm.lora on the CPU: one step took over 20 minutes here


def lora_data(ctx: Ctx) -> Path:
    """``train.jsonl`` of ~120-token text records cut from the bundled calibration text
    (tokenized with the model's tokenizer), written once into the work dir."""
    out = ctx.workdir / "lora-data"
    if (out / "train.jsonl").exists():
        return out
    from transformers import AutoTokenizer

    from optiq.core.calibration import BUNDLED_CALIBRATION, load_records, render_record

    tok = AutoTokenizer.from_pretrained(str(ctx.quant()))
    ids = [t for r in load_records(BUNDLED_CALIBRATION) for t in tok.encode(render_record(r, tok))]
    n = LORA_TOKENS - 2  # the trainers append EOS; the tokenizer may merge at a cut
    texts = [tok.decode(ids[i:i + n]) for i in range(0, len(ids) - n, n)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


LORA_SETTINGS = ["--batch-size", "1", "--num-layers", "16", "--iters", str(LORA_STEPS), "--learning-rate", "1e-5"]


@row("lora")
def _lora(ctx: Ctx) -> Row:
    out = ctx.out("lora")
    cmd = OPTIQ + ["lora", "train", str(ctx.quant()), "--data", str(lora_data(ctx)), "-o", str(out),
                   "--rank", "8", "--target-modules", "q_proj,v_proj", *LORA_SETTINGS,
                   "--steps-per-report", "1", "--quiet"]

    def notes(r: dict) -> str:
        state = out / "trainer_state.json"
        if not state.exists():
            return ""
        st = json.loads(state.read_text())
        return (f"{st['step']} steps, {st['tokens_per_second']:.1f} tok/s, "
                f"peak MLX {st['peak_memory_gb']:.2f} GB, {st['trained_tokens']} tokens in {st['train_seconds']:.0f} s")

    return Row(cmd, notes)


@row("lora_mlx_lm")
def _lora_mlx_lm(ctx: Ctx) -> Row:
    """``mlx_lm lora --train`` with the same settings (rank 8 on q_proj/v_proj via a config)."""
    out = ctx.out("lora_mlx_lm")
    out.mkdir(parents=True)
    cfg = out / "lora.yaml"
    cfg.write_text("lora_parameters:\n  rank: 8\n  scale: 20.0\n  dropout: 0.0\n"
                   '  keys: ["self_attn.q_proj", "self_attn.v_proj"]\n')
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "--train", "--model", str(ctx.quant()),
           "--data", str(lora_data(ctx)), "--adapter-path", str(out), "-c", str(cfg), *LORA_SETTINGS,
           "--steps-per-report", "1", "--max-seq-length", "2048"]

    def notes(r: dict) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", Path(r["log"]).read_text(errors="replace"))
        steps = re.findall(r"^\s*(\d+)\s+[\d.]+\s+\S+\s+([\d,.]+)\s+([\d.]+)k", text, re.M)
        if not steps:
            return f"no step finished in {r['seconds']:.0f} s (< {LORA_TOKENS / r['seconds']:.2f} tok/s)"
        rates = [float(s[1].replace(",", "")) for s in steps]
        return f"{len(steps)} steps, {sum(rates) / len(rates):.1f} tok/s (mean of its per-step reports)"

    return Row(cmd, notes, timeout=LORA_TIMEOUT)


@row("lora_plan")
def _lora_plan(ctx: Ctx) -> Row:
    """The training ceiling map up to 1024 tokens, under 6 GB."""
    cmd = OPTIQ + ["lora", "train", str(ctx.quant()), "--plan", "--max-memory", "6", "--max-seq-length", "1024",
                   "--rank", "8", "--num-layers", "16", "--batch-size", "1"]

    def notes(r: dict) -> str:
        text = Path(r["log"]).read_text(errors="replace")
        rows = re.findall(r"^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) ", text, re.M)
        best = re.search(r"longest sequence length under .*", text)
        return "; ".join([f"{n}: {p} GB, {t} tok/s" for n, _, p, t in rows] + ([best[0]] if best else []))

    return Row(cmd, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.8b")
    ap.add_argument("--rows", default="mlx_lm,static", help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--workdir", type=Path, default=Path("runs/scale"))
    ap.add_argument("--cap-gb", type=float, default=20.0)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    unknown = [n for n in args.rows.split(",") if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
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
    rate = gemm_rate()
    ctx = Ctx(args.shape, {**COMMON, **SHAPES[args.shape]}, model, args.workdir, rate, int(args.cap_gb * 2**30))
    print(f"fp32 GEMM rate now: {rate / 1e9:.0f} GFLOP/s")
    print(f"\n| {args.shape} shape | wall s | peak RSS GB | result | notes |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.rows.split(","):
        spec = ROWS[name](ctx)
        r = run(spec.cmd, ctx.cap, args.workdir / f"{args.shape}-{name}.log", spec.timeout)
        what = (f"killed at the {args.cap_gb:g} GB cap" if r["killed"] else
                f"stopped at {spec.timeout:g} s" if r["timed_out"] else ("ok" if r["rc"] == 0 else f"exit {r['rc']}"))
        print(f"| {name} | {r['seconds']:.1f} | {r['peak'] / 2**30:.2f} | {what} | {spec.notes(r)} |", flush=True)


if __name__ == "__main__":
    main()
