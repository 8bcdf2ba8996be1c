"""The steps of `benchmarks/gpu_check.sh` that need Python; each subcommand is one step and writes its figures
as JSON under OUT (default /tmp/gpu_check). Run through the shell script; by hand:

    python benchmarks/gpu_check.py env --device cuda
    python benchmarks/gpu_check.py fp16 --device cuda          # pure-fp16 fails, mixed (GradScaler) trains
    python benchmarks/gpu_check.py speed --device cuda --precision mixed
    python benchmarks/gpu_check.py memory --device cuda        # estimate-memory against the measured peaks
    python benchmarks/gpu_check.py report --device cuda        # figures.md / figures.json

Only the standard library at the top: `env` must report what is missing instead of failing to import it.
Settings are sized for one CUDA GPU; with --device cpu they shrink to tiny ones that only test the plumbing.
Environment overrides: GPU_CHECK_PAIR, GPU_CHECK_BATCH, GPU_CHECK_BLOCK, GPU_CHECK_WARMUP, GPU_CHECK_MEASURE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("OUT") or "/tmp/gpu_check")
SCRATCH = Path(os.environ.get("GPU_CHECK_SCRATCH", "/tmp/gpu_check_runs"))  # run directories: large, kept off OUT
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "pandas", "pyarrow", "matplotlib", "rich", "typer",
            "yaml", "pytest", "datasets", "sarkd_diag")
SPEED_MODES = ("fp32", "mixed", "bf16-mixed")
FP16_LR = "5e-6"  # the original scripts' learning rate: pure-fp16 corrupts the weights at step 1, mixed trains


def settings(device: str) -> dict:
    cuda = device.startswith("cuda")
    s = {  # speed: the gpt2 pair (DialoGPT-medium/small shapes); fp16: the embedded default
        "pair": "gpt2" if cuda else "tiny", "batch": 8 if cuda else 2, "block": 128 if cuda else 32,
        "warmup": 3 if cuda else 1, "measure": 10 if cuda else 3,
        "fp16_steps": 30 if cuda else 2, "fp16_batch": 8 if cuda else 2, "fp16_block": 64 if cuda else 32,
    }
    for key in ("pair", "batch", "block", "warmup", "measure"):
        value = os.environ.get(f"GPU_CHECK_{key.upper()}")
        if value:
            s[key] = value if key == "pair" else int(value)
    return s


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "sarkd_diag", *map(str, args)]  # not the console script: it may not be installed


# ------------------------------------------------------------------------------------------------------ env
def cmd_env(args) -> int:
    """What is importable, the torch build and the device; have.env tells the shell which steps can run."""
    print(f"python {platform.python_version()} ({sys.executable}), {platform.platform()}")
    have = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            have[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as exc:  # ImportError, or a broken install
            have[name] = None
            print(f"  {name:14s} MISSING ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        else:
            print(f"  {name:14s} {have[name]}")
    info = {"python": platform.python_version(), "packages": have, "device": args.device, "device_ok": False}
    if have["torch"]:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, cuda available: "
              f"{torch.cuda.is_available()}, {torch.get_num_threads()} CPU threads")
        if args.device.startswith("cuda") and torch.cuda.is_available():
            index = torch.device(args.device).index or 0
            props = torch.cuda.get_device_properties(index)
            info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
            print(f"GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.1f} GiB, bf16 {info['bf16']}, TF32 matmul {info['tf32_matmul']}")
            info["device_ok"] = True
        elif args.device == "cpu":
            info["device_ok"] = True
        else:
            print(f"no CUDA device for --device {args.device}")
    save("env", info)
    flags = {**{f"HAVE_{k}": int(v is not None) for k, v in have.items()}, "HAVE_device": int(info["device_ok"])}
    (OUT / "have.env").write_text("".join(f"{k}={v}\n" for k, v in flags.items()))
    return 0 if info["device_ok"] else 1


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version({"yaml": "PyYAML", "sarkd_diag": "sarkd-diag"}.get(name, name))
    except metadata.PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------------------------- fp16
def cmd_fp16(args) -> int:
    """The same short run on the embedded default in pure-fp16 and in mixed, through the CLI, then `check`."""
    from sarkd_diag import load_run

    s = settings(args.device)
    expected = {"pure-fp16": {"train_exit": 1, "check_exit": 1}, "mixed": {"train_exit": 0, "check_exit": 0}}
    results, ok = {}, True
    for mode in expected:
        run_dir = SCRATCH / f"fp16-{mode}"
        train = cli("train", "--device", args.device, "--precision", mode, "--train-steps", s["fp16_steps"],
                    "--eval-steps", max(1, s["fp16_steps"] // 2), "--eval-max-batches", 5,
                    "--per-device-batch-size", s["fp16_batch"], "--block-size", s["fp16_block"],
                    "--student-lr", FP16_LR, "--output-dir", run_dir, "--overwrite")
        print(f"$ python -m sarkd_diag {' '.join(train[3:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(train, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        print("\n".join("  | " + line for line in lines[-40:]))
        check = subprocess.run(cli("check", run_dir, "--expect", "master-fp32,no-nonfinite-params,completed"),
                               capture_output=True, text=True)
        print(f"$ python -m sarkd_diag check {run_dir} --expect master-fp32,no-nonfinite-params,completed  → exit "
              f"{check.returncode}\n" + "\n".join("  | " + line for line in check.stdout.strip().splitlines()[:4]))
        run = load_run(run_dir) if (run_dir / "config.json").is_file() else None
        summary = (run and run["summary"]) or {}
        if summary:
            (OUT / "runs").mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "summary.json", OUT / "runs" / f"{mode}-summary.json")
        scales = _train(run)["loss_scale"].dropna().tolist() if run else []
        final = summary.get("final", {})
        diagnosis = summary.get("diagnosis") or [{}]
        r = {"train_exit": proc.returncode, "check_exit": check.returncode, "status": summary.get("status"),
             "steps_completed": summary.get("steps_completed"), "seconds": round(seconds, 1),
             "master_dtype": (summary.get("precision") or {}).get("master_dtype"),
             "loss_scaling": (summary.get("precision") or {}).get("loss_scaling"),
             "cause": diagnosis[0].get("cause"), "first_eval_ppl": final.get("first_eval_ppl"),
             "eval_ppl": final.get("eval_ppl"), "skipped_steps": final.get("skipped_steps"),
             "nonfinite_param_events": (summary.get("event_counts") or {}).get("nonfinite_param", 0),
             "final_loss_scale": scales[-1] if scales else None}
        want = dict(expected[mode])
        if mode == "pure-fp16":
            want.update(cause="optimizer_eps_underflow")
        else:
            want.update(status="completed", master_dtype="float32", loss_scaling=True)
        failed = [f"{k}={r[k]!r} (expected {v!r})" for k, v in want.items() if r[k] != v]
        if mode == "mixed" and not (r["eval_ppl"] and r["first_eval_ppl"] and r["eval_ppl"] < r["first_eval_ppl"]):
            failed.append(f"validation perplexity {r['first_eval_ppl']} → {r['eval_ppl']} did not fall")
        r["as_expected"] = not failed
        ok &= not failed
        results[mode] = r
        print(f"{mode}: {'as expected' if not failed else 'NOT as expected: ' + '; '.join(failed)}\n", flush=True)
    for mode, r in results.items():
        print(f"{mode:10s} train exit {r['train_exit']}, check exit {r['check_exit']}, {r['status']} after "
              f"{r['steps_completed']} step(s), masters {r['master_dtype']}, loss scaling {r['loss_scaling']} "
              f"(final scale {r['final_loss_scale']}, {r['skipped_steps']} skipped), cause {r['cause']}, "
              f"ppl {_num(r['first_eval_ppl'])} → {_num(r['eval_ppl'])}, {r['seconds']} s")
    save("fp16", {"device": args.device, "student_lr": FP16_LR, "steps": s["fp16_steps"], "batch": s["fp16_batch"],
                  "block": s["fp16_block"], "modes": results})
    return 0 if ok else 1


def _train(run: dict):
    """The train rows of a run's metrics (a load_run result)."""
    return run["metrics"].query("split == 'train'")


def _num(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _size(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------------- speed
def cmd_speed(args) -> int:
    """One precision of the gpt2 pair through `distill` (probes at the default, standard): each step timed from
    the end of the previous one, after torch.cuda.synchronize; median over the steps after the warm-up."""
    import torch

    sys.path.insert(0, str(HERE))
    from pairs import PAIRS

    from sarkd_diag import distill, load_run
    from sarkd_diag.presentation.ui import TrainingDisplay

    s = settings(args.device)
    cuda = args.device.startswith("cuda")
    started = time.perf_counter()
    teacher, student = PAIRS[s["pair"]]()
    print(f"{s['pair']} pair: teacher {teacher}, student {student} ({time.perf_counter() - started:.1f} s)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Clock(TrainingDisplay):
        def __init__(self):
            super().__init__(quiet=True)
            self.stamps: list[float] = []

        def update(self, step: int, row: dict) -> None:
            sync()
            self.stamps.append(time.perf_counter())
            super().update(step, row)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = s["warmup"] + s["measure"]
    run_dir = SCRATCH / f"speed-{args.precision}"
    clock = Clock()
    result = distill(teacher_model=teacher, student_model=student, precision=args.precision, device=args.device,
                     train_steps=steps, eval_steps=10**6, eval_max_batches=1, block_size=s["block"],
                     per_device_batch_size=s["batch"], output_dir=str(run_dir), overwrite=True, display=clock)
    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    run = load_run(result.run_dir)
    summary, tokens_per_s = run["summary"], _train(run)["tokens_per_s"].tolist()
    tokens = s["batch"] * s["block"]
    seconds = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:], strict=True)]
    seconds = seconds[s["warmup"] - 1:]  # the stamps close steps 1..N: these are steps warmup+1 .. N
    figures = {
        "device": args.device, "pair": s["pair"], "precision": args.precision, "batch": s["batch"],
        "block": s["block"], "warmup": s["warmup"], "measured_steps": len(seconds),
        "status": summary["status"], "exit_code": result.exit_code,
        "step_ms": round(1000 * statistics.median(seconds), 2) if seconds else None,
        "tokens_per_s": round(tokens / statistics.median(seconds), 1) if seconds else None,
        "trainer_tokens_per_s": round(statistics.median(tokens_per_s[s["warmup"]:]), 1)
        if len(tokens_per_s) > s["warmup"] else None,
        # CUDA: the allocator's peak over the whole run (loading, evaluation, steps); CPU: the process's peak RSS
        "peak_mib": round(peak_mib if cuda else summary["final"]["peak_memory_mb"], 1),
        "peak_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (CPU)",
    }
    shutil.rmtree(run_dir, ignore_errors=True)  # the gpt2 student's checkpoint and optimizer state: GBs
    save(f"speed-{args.precision}", figures)
    print(f"{args.precision:10s} {figures['tokens_per_s']} tokens/s (median step {figures['step_ms']} ms over "
          f"{len(seconds)} steps after {s['warmup']} warm-up; the trainer's own reading "
          f"{figures['trainer_tokens_per_s']} tokens/s), batch {s['batch']} × block {s['block']}, "
          f"peak {figures['peak_mib']:.0f} MiB ({figures['peak_kind']}), run {figures['status']}")
    return 0 if figures["status"] == "completed" and figures["tokens_per_s"] else 1


# --------------------------------------------------------------------------------------------------- memory
def cmd_memory(args) -> int:
    """`estimate-memory` for the speed step's pair and batch, divided by the peaks that step measured."""
    sys.path.insert(0, str(HERE))
    from pairs import PAIRS

    s = settings(args.device)
    teacher, student = PAIRS[s["pair"]]()
    command = cli("estimate-memory", "--teacher-model", teacher, "--student-model", student, "--block-size",
                  s["block"], "--per-device-batch-size", s["batch"], "--modes", ",".join(SPEED_MODES), "--json")
    print(f"$ python -m sarkd_diag {' '.join(command[3:])}", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr)
        return 1
    report = json.loads(proc.stdout)
    rows, headline = [], None
    for mode in report["modes"]:
        measured = load(f"speed-{mode['mode']}")
        peak = measured["peak_mib"] * 2**20 if measured else None
        ratio = mode["total"] / peak if peak else None
        rows.append({"mode": mode["mode"], "estimate_bytes": mode["total"], "measured_bytes": peak,
                     "measured_kind": measured["peak_kind"] if measured else None, "ratio": ratio})
        print(f"{mode['mode']:10s} estimate {_size(mode['total']):>10s}   measured {_size(peak):>10s}"
              f"   estimate / measured {_num(ratio, '.3f')}")
        if mode["mode"] == "mixed":
            headline = ratio
    if not args.device.startswith("cuda"):
        print("(CPU: the measured figure is the process's peak RSS, torch itself included: not comparable)")
    print(f"estimate-memory ratio (mixed, estimate / max_memory_allocated): {_num(headline, '.3f')}")
    save("memory", {"device": args.device, "pair": s["pair"], "batch": s["batch"], "block": s["block"],
                    "modes": rows, "mixed_ratio": headline})
    return 0 if headline is not None else 1


# --------------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    """figures.md (README-ready) and figures.json from what the steps wrote."""
    env, fp16, memory = load("env") or {}, load("fp16"), load("memory")
    speeds = {m: load(f"speed-{m}") for m in SPEED_MODES}
    steps = [line.split("\t") for line in (OUT / "steps.tsv").read_text().splitlines()] \
        if (OUT / "steps.tsv").is_file() else []
    card = env.get("gpu") or f"CPU ({platform.processor() or platform.machine()}), plumbing check only"
    lines = [f"`bash benchmarks/gpu_check.sh` on {card}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"transformers {(env.get('packages') or {}).get('transformers')}, {time.strftime('%Y-%m-%d')}:", ""]
    first = next((v for v in speeds.values() if v), None)
    if first:
        lines += [f"| {first['pair']} pair, batch {first['batch']} × block {first['block']} | "
                  + " | ".join(SPEED_MODES) + " |", "|---" * (len(SPEED_MODES) + 1) + "|"]
        estimates = {r["mode"]: r for r in (memory or {}).get("modes", [])}

        def row(title, fn):
            cells = [fn(speeds[m], estimates.get(m)) if speeds[m] else "failed" for m in SPEED_MODES]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")

        row(f"tokens/s (median of {first['measured_steps']} steps after {first['warmup']} warm-up)",
            lambda s, e: f"{s['tokens_per_s']:,.0f}")
        row("step time", lambda s, e: f"{s['step_ms']:.1f} ms")
        row(f"peak memory, {first['peak_kind']}", lambda s, e: _size(s["peak_mib"] * 2**20))
        row("`estimate-memory` total", lambda s, e: _size(e["estimate_bytes"]) if e else "n/a")
        row("estimate / measured", lambda s, e: f"{e['ratio']:.2f}×" if e and e["ratio"] else "n/a")
        lines.append("")
    if fp16:
        lines.append(f"Embedded default, {fp16['steps']} steps at --student-lr {fp16['student_lr']}, batch "
                     f"{fp16['batch']} × block {fp16['block']}:")
        lines.append("")
        for mode, r in fp16["modes"].items():
            lines.append(f"- `{mode}`: exit {r['train_exit']}, {r['status']} after {r['steps_completed']} step(s), "
                         f"masters {r['master_dtype']}, cause {r['cause'] or 'none'}, validation perplexity "
                         f"{_num(r['first_eval_ppl'])} → {_num(r['eval_ppl'])}"
                         + (f", final loss scale {r['final_loss_scale']:g}, {r['skipped_steps']} skipped step(s)"
                            if r["final_loss_scale"] is not None else "")
                         + ("" if r["as_expected"] else " — NOT AS EXPECTED"))
        lines.append("")
    if steps:
        lines.append("Steps: " + ", ".join(f"{name} {status} ({sec} s)" for name, status, sec in steps))
    text = "\n".join(lines) + "\n"
    (OUT / "figures.md").write_text(text)
    save("figures", {"env": env, "fp16": fp16, "speed": speeds, "memory": memory,
                     "steps": [dict(zip(("step", "status", "seconds"), s, strict=True)) for s in steps]})
    print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("env", "fp16", "speed", "memory", "report"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="mixed", choices=SPEED_MODES)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    return globals()[f"cmd_{args.command}"](args)


if __name__ == "__main__":
    sys.exit(main())
