"""The benchmarks run on CPU (tiny shapes), so they cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine.py"


def test_bench_tiny_runs(tmp_path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert results["engine_32_lora_tok_s"] > 0 and results["baseline_mixed_tok_s"] > 0


def test_nf4_sass_counts_the_gemv_loop() -> None:
    """bench/nf4_sass.py compiles the GEMV for sm_90 without a GPU and finds its loop (a decode has byte permutes)."""
    script = BENCH.parent / "nf4_sass.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles for the GPU, runs nothing
    done = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True, env=env)
    summary, mix = done.stdout.splitlines()[-2:]
    assert float(summary.split(",")[-1].split()[0]) > 3  # instructions per weight: at least the decode's
    assert "PRMT" in mix and "FFMA" in mix


def test_event_delivery_bench_runs() -> None:
    script = BENCH.parent / "event_delivery.py"
    done = subprocess.run([sys.executable, str(script), "--streams", "4", "--steps", "20"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    assert [line.split(":")[0].strip() for line in done.stdout.splitlines()] == ["per event", "mailbox"] * 2


def test_prompt_turns_bench_runs() -> None:
    script = BENCH.parent / "prompt_turns.py"
    done = subprocess.run(
        [sys.executable, str(script), "--requests", "200"], check=True, capture_output=True, text=True
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and all(" p50 " in line for line in lines), lines


def test_lora_kernels_bench_tiny_runs(tmp_path) -> None:
    """bench/lora_kernels.py --tiny launches every kind of LoRA kernel the step has, on CPU under the interpreter."""
    out = tmp_path / "lora.json"
    done = subprocess.run([sys.executable, str(BENCH.parent / "lora_kernels.py"), "--tiny", "--rows", "1,3", "--out",
                           str(out)], check=True, capture_output=True, text=True)  # fmt: skip
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["1 rows", "3 rows"]
    assert set(json.loads(out.read_text())["3"]) >= {"norm_shrink_ms", "o_shrink_ms", "act_shrink_ms", "expand_ms"}


def test_tokenizer_flood_bench_runs(tmp_path, embedded_cache_dir) -> None:
    """bench/tokenizer_flood.py, shortened: the engine's steps alone and beside two kinds of tokenizer job, on the
    threads and in the workers."""
    out = tmp_path / "flood.json"
    # Two of the four jobs: each job is the same code around another template. Not the decodes: a flood of them on
    # the engine's threads holds the GIL, so that one case alone took ~22 s of the bench's ~50 (10 ids, two cores).
    jobs = ("chat_of_2", "encode_hi")
    flags = ["--rows", "1", "--tokens", "3", "--messages", "2", "--jobs", ",".join(jobs)]
    command = [sys.executable, str(BENCH.parent / "tokenizer_flood.py"), *flags, "--cache-dir", str(embedded_cache_dir)]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())
    assert results["alone_ms"] > 0
    assert all(results[f"{job}_{where}_ms"] > 0 for job in jobs for where in ("on_threads", "in_processes"))


def test_segmented_lora_bench_tiny_runs(tmp_path) -> None:
    """bench/segmented_lora.py --tiny runs a wide step's LoRA deltas in both forms, on CPU under the interpreter."""
    out = tmp_path / "segmented.json"
    flags = ["--tiny", "--tokens", "40", "--decode", "8", "--slots", "4", "--run", "16", "--out", str(out)]
    subprocess.run([sys.executable, str(BENCH.parent / "segmented_lora.py"), *flags], check=True, capture_output=True)
    (result,) = json.loads(out.read_text())["results"]
    assert {"dense_ms", "segmented_ms"} <= set(result) and result["tokens"] == 40


def test_masks_bench_runs(tmp_path, embedded_cache_dir) -> None:
    """bench/masks.py, shortened: each way of filling the masks of one and two rows of each grammar."""
    out = tmp_path / "masks.json"
    flags = ["--rows", "1,2", "--steps", "2", "--rounds", "1", "--vocab", "smollm2", "--threads", "2", "--executor"]
    command = [sys.executable, str(BENCH.parent / "masks.py"), *flags, "--cache-dir", str(embedded_cache_dir)]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert [(r["grammar"], r["rows"]) for r in results] == [("json", 1), ("json", 2), ("words", 1), ("words", 2)]
    assert all(r[way] > 0 for r in results for way in ("serial", "threads", "auto", "executor"))
