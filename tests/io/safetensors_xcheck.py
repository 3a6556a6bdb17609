"""Cross-checks ferry's safetensors reader and writer against the Python safetensors package, and
its HF checkpoint reader and writer against transformers' LlamaForCausalLM (where importable).

Usage: safetensors_xcheck.py ST_XCHECK_BINARY. Exits 1 on any failure; otherwise 77 (ctest:
skipped) when a section could not run (safetensors or numpy missing: all of them; torch: the BF16
ones and the HF one; transformers: the HF one), so a missing package never reads as a pass.
"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file as np_save
except ImportError as e:  # pragma: no cover
    print(f"skipped: {e}")
    sys.exit(77)
try:
    import torch
    from safetensors.torch import save_file as torch_save
except ImportError:
    torch = None

tool = sys.argv[1]
failures = []
skipped = []


def skip(section, why):
    skipped.append(section)
    print(f"skipped: {section} ({why})")


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def expected(dt):
    k = np.arange(6)
    if dt == "BOOL":
        return (k % 2).astype(bool).reshape(2, 3)
    if dt.startswith("F") or dt == "BF16":
        return ((k - 2) * 0.5).reshape(2, 3)
    if dt.startswith("U"):
        return (k * 40).reshape(2, 3)
    return (k * 40 - 100).reshape(2, 3)


with tempfile.TemporaryDirectory() as d:
    # 1. ferry writes, Python reads.
    path = os.path.join(d, "ferry.safetensors")
    subprocess.run([tool, "write", path], check=True)
    with safe_open(path, framework="np") as f:
        check(f.metadata() == {"format": "pt", "origin": "ferry"}, f"metadata {f.metadata()}")
        names = set(f.keys())
        check(names == {f"x_{dt}" for dt in list(NP) + ["BF16"]} | {"empty"}, f"names {names}")
        for dt, npt in NP.items():
            a = f.get_tensor(f"x_{dt}")
            check(a.dtype == npt and a.shape == (2, 3), f"x_{dt}: {a.dtype} {a.shape}")
            check(np.array_equal(a, expected(dt).astype(npt)), f"x_{dt} values {a}")
        e = f.get_tensor("empty")
        check(e.shape == (0, 3) and e.dtype == np.float32, f"empty {e.shape} {e.dtype}")
    if torch is None:
        skip("ferry's BF16 read by torch", "torch is not importable")
    else:
        with safe_open(path, framework="pt") as f:
            b = f.get_tensor("x_BF16")
            check(b.dtype == torch.bfloat16 and torch.equal(b.float(), torch.tensor(expected("BF16"), dtype=torch.float32)),
                  f"x_BF16 {b}")

    # 2. Python writes, ferry reads.
    rng = np.random.default_rng(0)
    arrays = {f"p_{dt}": (rng.standard_normal((3, 5)) * 100).astype(npt) for dt, npt in NP.items()}
    arrays["p_scalar"] = np.array(1.5, dtype=np.float32)
    arrays["p_empty"] = np.zeros((4, 0), dtype=np.float16)
    path2 = os.path.join(d, "python.safetensors")
    np_save(arrays, path2, metadata={"format": "np", "k": "v"})
    out = json.loads(subprocess.run([tool, "dump", path2], check=True, capture_output=True, text=True).stdout)
    check(out["metadata"] == {"format": "np", "k": "v"}, f"metadata {out['metadata']}")
    check(set(out["tensors"]) == set(arrays), f"names {set(out['tensors'])}")
    for name, a in arrays.items():
        t = out["tensors"][name]
        want_dt = {v: k for k, v in NP.items()}[a.dtype.type]
        check(t["dtype"] == want_dt and tuple(t["shape"]) == a.shape, f"{name}: {t['dtype']} {t['shape']}")
        check(bytes.fromhex(t["hex"]) == a.tobytes(), f"{name} bytes")
    if torch is None:
        skip("torch-written BF16 read by ferry", "torch is not importable")
    else:
        path3 = os.path.join(d, "torch.safetensors")
        tb = torch.randn(7, 3).to(torch.bfloat16)
        torch_save({"w": tb, "h": torch.randn(2, 2).half()}, path3)
        out = json.loads(subprocess.run([tool, "dump", path3], check=True, capture_output=True, text=True).stdout)
        check(out["tensors"]["w"]["dtype"] == "BF16" and out["tensors"]["w"]["shape"] == [7, 3], "torch bf16 header")
        check(bytes.fromhex(out["tensors"]["w"]["hex"]) == tb.view(torch.int16).numpy().tobytes(), "torch bf16 bytes")

    # 3. Files Python rejects, ferry rejects too (a truncated one).
    raw = open(path2, "rb").read()
    cut = os.path.join(d, "cut.safetensors")
    open(cut, "wb").write(raw[:-3])
    r = subprocess.run([tool, "dump", cut], capture_output=True, text=True)
    check(r.returncode == 1 and "truncated" in r.stderr, f"truncated file: rc {r.returncode} {r.stderr}")

    # 4. HF checkpoints: transformers -> ferry (validated, same values) -> transformers (same logits).
    try:
        import transformers
    except ImportError:
        transformers = None
    if torch is None or transformers is None:
        skip("HF checkpoints", f"{'torch' if torch is None else 'transformers'} is not importable")
    else:
        for tied in (False, True):
            torch.manual_seed(0)
            cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
            model = transformers.LlamaForCausalLM(cfg).eval()
            hf = os.path.join(d, f"hf_tied{int(tied)}")
            model.save_pretrained(hf, max_shard_size="20KB")
            r = subprocess.run([tool, "hf-write", hf], capture_output=True, text=True)
            check(r.returncode == 0, f"ferry reading transformers checkpoint (tied={tied}): {r.stderr}")
            if r.returncode != 0:
                continue
            read = json.loads(r.stdout)
            params = dict(model.named_parameters())
            check(set(read) == set(params), f"tensor names differ: {set(read) ^ set(params)}")
            for name, p in params.items():
                if name not in read:
                    continue
                want = p.detach().double().numpy()
                got = np.array(read[name]["values"], dtype=np.float64)
                if not check(tuple(read[name]["shape"]) == want.shape and got.size == want.size,
                             f"{name}: ferry read shape {read[name]['shape']}, transformers has {list(want.shape)}"):
                    continue
                # The checkpoint is F32 and ferry reads it into fp32: element for element equal.
                got = got.reshape(want.shape)
                check(np.array_equal(got, want), f"{name}: ferry read other values (max |diff| {np.abs(got - want).max()})")
            again = transformers.LlamaForCausalLM.from_pretrained(os.path.join(hf, "ferry"), dtype=torch.float32)
            ids = torch.randint(0, 61, (1, 9))
            with torch.no_grad():
                want = model.to(torch.bfloat16).float()(ids).logits
                got = again(ids).logits
            check(torch.allclose(got, want, atol=1e-5, rtol=1e-5), f"logits after ferry round trip (tied={tied})")
            check(os.path.exists(os.path.join(hf, "ferry", "model.safetensors.index.json")), "ferry sharded output")

if failures:
    print("FAILED", len(failures), "failures")
    sys.exit(1)
if skipped:
    print("SKIPPED", len(skipped), "sections:", "; ".join(skipped))
    sys.exit(77)
print("OK")
