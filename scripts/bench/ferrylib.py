"""Helpers shared by scripts/bench, scripts/finder and scripts/nightly (standard library only).

Finding the binaries and model configs, building ferry-train's and ferry-infer's command line, writing random-token
data in the llm.c format ferry reads, running a command under a timeout without ever raising (with
or without its peak RSS), reading metrics.jsonl and ferry-infer's metrics JSON, machine facts, and
a plain-text/Markdown table. The peer scripts (peer_*.py) import torch; this module never does.
"""
import json
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = float(1 << 30)
LLMC_MAGIC = 20240520


def build_dir():
    return os.environ.get("FERRY_BUILD_DIR") or os.path.join(ROOT, "build")


def tool(name):
    """Path of a ferry binary under the build dir's bin/, or None when it was not built."""
    p = os.path.join(build_dir(), "bin", name)
    return p if os.access(p, os.X_OK) else None


def python_exe():
    """The Python that has torch: $FERRY_PYTHON, the repo's .venv, else python3."""
    env = os.environ.get("FERRY_PYTHON")
    if env:
        return env
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.access(venv, os.X_OK) else (shutil.which("python3") or "python3")


def config_path(shape):
    """configs/models/<shape>.json, or `shape` itself when it names a .json file."""
    return shape if shape.endswith(".json") else os.path.join(ROOT, "configs", "models", shape + ".json")


def model_config(shape):
    """configs/models/<shape>.json as a dict, or the JSON file `shape` names."""
    with open(config_path(shape)) as f:
        return json.load(f)


# Bookkeeping keys of a saved config.json that are not LlamaConfig arguments.
HF_CONFIG_DROP_KEYS = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype")


def hf_config_dict(path):
    """The config.json at `path` as keyword arguments for transformers.LlamaConfig (without
    HF_CONFIG_DROP_KEYS)."""
    with open(path) as f:
        d = json.load(f)
    for k in HF_CONFIG_DROP_KEYS:
        d.pop(k, None)
    return d


def ferry_cmd(tool_path, model, device, offload, dtype, sets=None, overrides=(), seed=None, dry_run=False,
              plan_json=None, extra=()):
    """A ferry-train or ferry-infer command line (the flags both take): model, placement and dtype,
    then `sets` (a dict, in its order) and `overrides` ("KEY=VALUE" strings, e.g. a script's
    --ferry-set; last, so they win) as --set, then --plan-json FILE (ferry-train) and `extra`
    (the tool's own flags, e.g. ferry-infer's --job)."""
    cmd = [tool_path, "--model-config", model, "--offload", offload, "--" + dtype, "--device", device]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if dry_run:
        cmd.append("--dry-run")
    for k, v in (sets or {}).items():
        cmd += ["--set", "%s=%s" % (k, v)]
    for kv in overrides:
        cmd += ["--set", kv]
    if plan_json:
        cmd += ["--plan-json", plan_json]
    return cmd + list(extra)


def train_run_sets(steps, seq, batch, data, output_dir):
    """The --set keys of a measured training run: `steps` steps of batch x seq tokens from `data`,
    metrics.jsonl in `output_dir`, no final checkpoint, no TensorBoard."""
    return dict(steps=steps, max_length=seq, batch_size=batch, data=data, output_dir=output_dir,
                save_final="false", tensorboard="false")


def llama_params(c):
    """Parameter count of a LLaMA config dict (untied embedding and lm_head, no biases)."""
    h, L, V, I = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    nh = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or h // nh
    attn = h * nh * hd * 2 + h * kv * hd * 2
    block = attn + 3 * h * I + 2 * h
    head = V * h * (1 if c.get("tie_word_embeddings") else 2) + h
    return L * block + head


def write_tokens(path, n_tokens, vocab, seed=1234):
    """Random tokens in the llm.c format: 256 int32 header (magic, version 1 = uint16, count)."""
    if os.path.exists(path) and os.path.getsize(path) == 1024 + 2 * n_tokens:
        return path
    assert vocab <= 65536, "uint16 token file"
    rng = random.Random(seed)
    header = [LLMC_MAGIC, 1, n_tokens] + [0] * 253
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<256i", *header))
        chunk = 1 << 16
        for start in range(0, n_tokens, chunk):
            k = min(chunk, n_tokens - start)
            f.write(struct.pack("<%dH" % k, *[rng.randrange(vocab) for _ in range(k)]))
    os.replace(tmp, path)
    return path


def run(cmd, timeout, log_path=None, env=None):
    """Runs cmd; returns dict(rc, seconds, out, timed_out). Never raises for a failing command."""
    t0 = time.time()
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, env=full_env,
                           text=True, errors="replace")
        res = dict(rc=p.returncode, out=p.stdout, timed_out=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        res = dict(rc=124, out=out, timed_out=True)
    except OSError as e:
        res = dict(rc=127, out=str(e), timed_out=False)
    res["seconds"] = time.time() - t0
    if log_path:
        with open(log_path, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n" + res["out"])
    return res


def run_measured(cmd, log_path, timeout):
    """Runs cmd with stdout and stderr to log_path (after a "$ cmd" line), killed after `timeout`
    seconds. Returns dict(rc, host_peak: the child's peak RSS in bytes from wait4, seconds,
    timed_out); rc is -9 for a killed child, 127 when cmd cannot start. Never raises for a failing
    command."""
    t0 = time.time()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        except OSError as e:
            f.write(str(e) + "\n")
            return dict(rc=127, host_peak=0, seconds=time.time() - t0, timed_out=False)
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), p.kill()))
        timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
    return dict(rc=os.waitstatus_to_exitcode(status), host_peak=ru.ru_maxrss * 1024, seconds=time.time() - t0,
                timed_out=killed.is_set())


def error_line(path, limit=300):
    """Why a ferry tool's run failed, from its log: the last line the tool wrote as its error
    ("ferry-train: ...", which stderr may put before stdout's last lines), else the last line."""
    with open(path, errors="replace") as f:
        lines = [l.strip() for l in f if l.strip()]
    for l in reversed(lines):
        if re.match(r"^ferry-[a-z-]+: ", l):
            return l[:limit]
    return lines[-1][:limit] if lines else "no output"


def failure_reason(res, what=""):
    """One line saying why a run failed: timeout, or the last non-empty output line."""
    if res["timed_out"]:
        return "timed out"
    lines = [l.strip() for l in res["out"].splitlines() if l.strip()]
    tail = lines[-1] if lines else "no output"
    return ("%s exit %d: %s" % (what, res["rc"], tail)).strip()[:300]


def read_metrics(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    return rows


def fresh_output(path):
    """Removes a previous run's `path` (a JSON file a tool is about to write), so that a run that
    fails leaves none to be read; returns path."""
    if os.path.exists(path):
        os.remove(path)
    return path


def read_json(path, default=None):
    """The JSON file at path, or `default` when it is missing or not JSON (a failed run writes
    none): peers' and bounds' --json, ferry-infer's --metrics-json (keys in src/infer/runner.h),
    ferry-bench-infer's --json (src/infer/bench_main.cpp)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def median(xs):
    return statistics.median(xs) if xs else None


def spread(xs):
    """(p90 - p10) / median of step times, a noise figure."""
    if len(xs) < 2:
        return 0.0
    s = sorted(xs)
    lo = s[int(0.1 * (len(s) - 1))]
    hi = s[int(round(0.9 * (len(s) - 1)))]
    m = statistics.median(s)
    return (hi - lo) / m if m else 0.0


def summarize_steps(rows, warmup):
    """Median step time and peaks after `warmup` steps (all steps when too few)."""
    use = rows[warmup:] if len(rows) > warmup else rows
    times = [r["step_ms"] for r in use]
    return dict(
        steps=len(rows),
        step_ms=median(times),
        step_ms_spread=spread(times),
        tokens_per_s=median([r.get("tokens_per_s", 0) for r in use]),
        gpu_alloc_peak=max([r.get("gpu_alloc_peak", 0) for r in rows] or [0]),
        gpu_reserved_peak=max([r.get("gpu_reserved_peak", 0) for r in rows] or [0]),
        h2d_bytes=median([r.get("h2d_bytes", 0) for r in use]),
        d2h_bytes=median([r.get("d2h_bytes", 0) for r in use]),
        cpu_adam_ms=median([r.get("cpu_adam_ms", 0) for r in use]),
        cpu_tasks_ms=median([r.get("cpu_tasks_ms", 0) for r in use]),
        tail_ms=median([r.get("tail_ms", 0) for r in use]),
        stall_ms=median([r.get("stall_ms", 0) for r in use]),
        rollbacks=sum(r.get("rollbacks", 0) for r in rows),
        skipped=sum(1 for r in rows if r.get("skipped")),
        losses=[r.get("loss") for r in rows],
    )


def git_commit():
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_mem_bytes():
    """MemTotal from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def gpu_info():
    """dict(card, driver, mem_bytes) from nvidia-smi, or None without a usable GPU."""
    if os.environ.get("FERRY_BENCH_NO_GPU") or not shutil.which("nvidia-smi"):
        return None
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0 or not p.stdout.strip():
        return None
    name, driver, mem = [x.strip() for x in p.stdout.strip().splitlines()[0].split(",")]
    return dict(card=name, driver=driver, mem_bytes=int(float(mem)) * (1 << 20))


def parse_size(s):
    """'24GiB', '24G', '24GB' (GB = 1e9), '1.5TiB', a plain number of bytes."""
    t = s.strip().lower().replace(" ", "")
    units = [("tib", 1 << 40), ("gib", 1 << 30), ("mib", 1 << 20), ("tb", 10 ** 12), ("gb", 10 ** 9), ("mb", 10 ** 6),
             ("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20)]
    for u, mult in units:
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(float(t))


def table(headers, rows, markdown=False):
    """rows: lists of strings. Plain text: aligned columns; markdown: a pipe table."""
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        return "\n".join(out)
    w = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def fmt_gb(b):
    return "-" if b is None else "%.2f GB" % (b / 1e9)


def fmt_ms(ms):
    return "-" if ms is None else ("%.0f ms" % ms if ms >= 100 else "%.1f ms" % ms)


def ferry_log(msg):
    import sys
    print("[ferry] " + msg, file=sys.stderr, flush=True)


def write_report(out, stem, record, text):
    """out/<stem>.json (the record) and out/<stem>.md (the printed text), logged."""
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(text + "\n")
    ferry_log("wrote %s/%s.json and %s.md" % (out, stem, stem))


def add_model_bench_args(ap):
    """The measurement flags scripts/bench_model.sh forwards to both of its sides (model_bench_flags)."""
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="default fp16 on cuda, fp32 on cpu")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--iters", type=int, default=20, help="timed layer runs")
    ap.add_argument("--model-iters", type=int, default=5, help="timed whole-model runs")
    ap.add_argument("--warmup", type=int, default=3)


def model_bench_flags(a):
    """add_model_bench_args' values as command-line flags, for ferry-bench-model and model_hf.py."""
    f = ["--seq", str(a.seq), "--batch", str(a.batch), "--device", a.device, "--iters", str(a.iters),
         "--model-iters", str(a.model_iters), "--warmup", str(a.warmup)]
    return f + (["--dtype", a.dtype] if a.dtype else [])


def fmt_bytes(b):
    """GiB from 1 GiB up, MiB below."""
    return "%.2f GiB" % (b / GIB) if b >= GIB else "%.1f MiB" % (b / float(1 << 20))
