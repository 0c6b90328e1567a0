"""Data at scale: prepare throughput and memory, and what training from prepared data costs.

    python bench/bench_prepare.py                          # 10 MB and 100 MB (make bench)
    python bench/bench_prepare.py --sizes 10M,100M,1G,5G   # the issue's sizes (~25 min, 12 GB disk)

For generated word-salad corpora (lines, blank lines, some non-ASCII) of each size:
  prepare   `prepare.py` (char at every size; byte and BPE up to --bpe-max), MB/s of source text
            and peak RSS of the main process and of the largest worker;
  train     `train.py data=prepared` for 5 steps of the debug model (compilation cache warm):
            wall time from launch to exit and peak RSS, so RSS growth with corpus size shows;
  loader    `perf/data_wait_fraction` of 40 steps of the default CPU Transformer on the largest
            corpus (host time waiting for a batch / wall time);
  nanoGPT   its prepare.py recipe on the 100 MB corpus: read the whole file, tiktoken's
            encode_ordinary, write uint16, with the same BPE vocabulary as chainrule's (tiktoken's
            GPT-2 files need a download; this compares the method, not the vocabulary). Needs
            `pip install tiktoken`; skipped without it.
Figures go to bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PY = sys.executable


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> None:
    """About `n_bytes` of word salad, written 32 MB at a time."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(20000)]
    words = np.array(words + ["The", "ROMEO:", "é", "naïve", "—", ",", "."], dtype=object)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            n = min(32 << 20, n_bytes - written) // 6 + 1
            seps = np.where(rng.random(n) < 0.08,
                            np.where(rng.random(n) < 0.1, "\n\n", "\n"), " ").astype(object)
            text = "".join((words[rng.integers(0, len(words), n)] + seps).tolist())
            text = text[: n_bytes - written]
            f.write(text)
            written += len(text.encode("utf-8"))


def timed_run(args: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the process, output) of a command under GNU time."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *args], cwd=REPO, text=True,
                         capture_output=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    rss = float(re.findall(r"MAXRSS (\d+)", out.stderr)[-1]) / 1024
    return wall, rss, out.stdout


PREPARE = """
import json, resource, sys, time
from pathlib import Path
from chainrule.data import TextDataConfig
from chainrule.data.text import prepare_text_data
if __name__ == "__main__":
    config = TextDataConfig(source="text_file", path=sys.argv[1], tokenizer=sys.argv[2],
                            bpe_vocab_size=4096, prepare_workers=2)
    start = time.perf_counter()
    prepare_text_data(config, Path(sys.argv[3]))
    print(json.dumps({"seconds": time.perf_counter() - start,
        "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def bench_prepare(corpus: Path, tokenizer: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # measured from scratch, never reused
    script = out.parent / "prepare_bench.py"
    script.write_text(PREPARE)
    result = subprocess.run([PY, str(script), str(corpus), tokenizer, str(out)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    mb = corpus.stat().st_size / 2**20
    return {"tokenizer": tokenizer, "mb": mb, **figures, "mb_per_s": mb / figures["seconds"]}


def bench_train(prepared: Path, run_dir: Path, steps: int = 5, extra: list[str] = ()) -> dict:
    args = [PY, "train.py", "debug=smoke", "data=prepared", f"data.path={prepared}",
            f"trainer.steps={steps}", "logger=none", f"hydra.run.dir={run_dir}", *extra]
    timed_run(args)  # warms the compilation cache
    shutil.rmtree(run_dir)
    wall, rss, _ = timed_run(args)
    return {"launch_to_exit_s": wall, "peak_rss_mb": rss}


def bench_loader(prepared: Path, run_dir: Path) -> dict:
    args = [PY, "train.py", "experiment=shakespeare_char_cpu", "data=prepared",
            f"data.path={prepared}", "data.sequence_length=128", "trainer.steps=40",
            "trainer.log_every=10", "trainer.eval_every=1000", "trainer.checkpoint_every=1000",
            "logger=none", f"hydra.run.dir={run_dir}"]
    timed_run(args)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    waits = [r["perf/data_wait_fraction"] for r in rows if "perf/data_wait_fraction" in r]
    return {"data_wait_fraction": waits[1:] or waits}


NANOGPT = """
import json, resource, sys, time, numpy as np, tiktoken
sys.path.insert(0, sys.argv[3])
from tiktoken_of import to_tiktoken
from chainrule.data.tokenizers import load_tokenizer
enc = to_tiktoken(load_tokenizer(sys.argv[2]))
start = time.perf_counter()
with open(sys.argv[1], encoding="utf-8") as f:
    data = f.read()
n = len(data)
train, val = data[: int(n * 0.9)], data[int(n * 0.9):]
ids = [np.array(enc.encode_ordinary(part), np.uint16) for part in (train, val)]
for part, name in zip(ids, ("train", "val")):
    part.tofile(f"{sys.argv[4]}/{name}.bin")
print(json.dumps({"seconds": time.perf_counter() - start,
                  "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TIKTOKEN_OF = '''
def bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))

def to_tiktoken(tok):
    """chainrule's byte-level BPE as a tiktoken Encoding (ranks = ids = merge order)."""
    import tiktoken
    inverse = {v: k for k, v in bytes_to_unicode().items()}
    vocab = tok._tok.get_vocab()
    ranks = {bytes(inverse[c] for c in s): i for s, i in vocab.items() if s != "<|endoftext|>"}
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    return tiktoken.Encoding("chainrule", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})
'''


def bench_nanogpt(corpus: Path, tokenizer_json: Path, work: Path) -> dict | None:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None
    (work / "tiktoken_of.py").write_text(TIKTOKEN_OF)
    (work / "nanogpt.py").write_text(NANOGPT)
    out = work / "nanogpt_out"
    out.mkdir(exist_ok=True)
    result = subprocess.run([PY, str(work / "nanogpt.py"), str(corpus), str(tokenizer_json),
                             str(work), str(out)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    mb = corpus.stat().st_size / 2**20
    return {**figures, "mb_per_s": mb / figures["seconds"]}


def size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M")
    parser.add_argument("--bpe-max", default="100M", help="largest corpus prepared with BPE")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="chainrule-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{os.cpu_count()} cores, {os.uname().machine}", "sizes": {}}
    for label in args.sizes.split(","):
        corpus = work / f"corpus_{label}.txt"
        if not corpus.exists():
            write_corpus(corpus, size(label))
        row = results["sizes"][label] = {}
        kinds = ["char", "byte"] + (["bpe"] if size(label) <= size(args.bpe_max) else [])
        for kind in kinds:
            out = work / f"prepared_{label}_{kind}"
            row[f"prepare_{kind}"] = bench_prepare(corpus, kind, out)
            print(label, kind, json.dumps(row[f"prepare_{kind}"]), flush=True)
        row["train"] = bench_train(work / f"prepared_{label}_char", work / f"run_{label}")
        print(label, "train", json.dumps(row["train"]), flush=True)
        if label == "100M" and "bpe" in kinds:
            row["nanogpt_tiktoken"] = bench_nanogpt(
                corpus, work / f"prepared_{label}_bpe" / "tokenizer.json", work)
            print(label, "nanogpt", json.dumps(row["nanogpt_tiktoken"]), flush=True)
    largest = args.sizes.split(",")[-1]
    results["loader"] = bench_loader(work / f"prepared_{largest}_char", work / "run_loader")
    print("loader", json.dumps(results["loader"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepare.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
