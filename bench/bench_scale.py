"""Real-size data: encoding into the cache, its size on disk, and what a warm cache costs a run.

    .venv/bin/python bench/bench_scale.py --n 20000 --small 2000       # ~6 min on 2 shared cores

On ``--n`` generated conversations (bench/gen.py, OpenAI records in a JSONL file) with the
SmolLM2 tokenizer and examples/templates/chatml-tools.jinja, strategy ``all``, max_length 2048:

- encode into a fresh cache folder with 1 process, then with 2 (``num_proc``): wall time,
  conversations/s, and peak resident memory of the whole process tree (parent + workers, sampled
  from /proc every 0.2 s); the two folders must be byte-identical;
- bytes per token of the cache on disk;
- warm start, in a fresh process per set: ``cached_encode`` (fingerprint: sha256 of the data
  file and tokenizer, then mapping), the packing plan of epoch 0 over the length array, and the
  first micro-batch assembled from the mapped columns; and the process's resident memory after
  it, for ``--small`` conversations and for ``--n``: the growth between the two is what the data
  costs a training run beyond the model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for t in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{t}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def _write_data(path: Path, n: int) -> None:
    from gen import records

    with path.open("w") as f:
        for r in records(n, seed=0):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _template():
    from turntune import assets
    from turntune.encoding import resolve_template
    from turntune.models import load_tokenizer

    tok = load_tokenizer(assets.smollm2_dir())
    return resolve_template(tok, "hf", (ROOT / "examples/templates/chatml-tools.jinja").read_text())


def encode_run(data: Path, out: Path, num_proc: int) -> dict:
    from turntune.dataset import write_encoded
    from turntune.encoding import EncodeOptions

    tmpl = _template()
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    got = write_encoded(data, tmpl, EncodeOptions("all", "token", 2048), out, num_proc=num_proc)
    dt = time.time() - t0
    stop.set()
    th.join()
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"num_proc": num_proc, "seconds": dt, "conversations": got.data_report.valid, "examples": len(got),
            "tokens": got.n_tokens, "peak_rss_gb": peak[0] / 2**30, "bytes_per_token": size / got.n_tokens,
            "disk_mb": size / 2**20}


def warm_run(data: Path, cache: Path) -> dict:
    """In a fresh process: what a run does with its data before the first step."""
    import resource

    from turntune.collate import packed_batches, rows_batch
    from turntune.dataset import cached_encode
    from turntune.encoding import EncodeOptions

    tmpl = _template()
    rss0 = _tree_rss(os.getpid())
    t0 = time.time()
    got = cached_encode(data, tmpl, EncodeOptions("all", "token", 2048), cache_dir=cache, num_proc=1)
    t_open = time.time() - t0
    assert not got.encoded_here
    lengths = got.data.lengths.tolist()
    plan = packed_batches(lengths, 2048, 4, seed=0)
    t_plan = time.time() - t0 - t_open
    batch = rows_batch([[got.data[j] for j in row] for row in plan[0]], pad_id=0)
    dt = time.time() - t0
    return {"examples": len(got.data), "open_s": t_open, "plan_s": t_plan, "first_batch_s": dt, "rows": len(batch.seq_lens),
            "rss_growth_mb": (_tree_rss(os.getpid()) - rss0) / 2**20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--warm", nargs=2, help=argparse.SUPPRESS)  # (internal) data, cache
    a = ap.parse_args()
    if a.warm:
        print(json.dumps(warm_run(Path(a.warm[0]), Path(a.warm[1]))))
        return
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        tmp = Path(tmp)
        results = {}
        for n in sorted({a.small, a.n}):
            data = tmp / f"gen{n}.jsonl"
            t0 = time.time()
            _write_data(data, n)
            print(f"generated {n:,} conversations ({data.stat().st_size / 2**20:,.0f} MB) in {time.time() - t0:.0f}s",
                  flush=True)
            runs = []
            for procs in ((1, 2) if n == a.n else (1,)):
                r = encode_run(data, tmp / f"enc{n}-{procs}", procs)
                runs.append(r)
                print(json.dumps(r), flush=True)
            if n == a.n:
                names = sorted(p.name for p in (tmp / f"enc{n}-1").iterdir())
                same = all((tmp / f"enc{n}-1" / f).read_bytes() == (tmp / f"enc{n}-2" / f).read_bytes() for f in names)
                print(f"1 vs 2 processes: byte-identical {same}; speed-up "
                      f"{runs[0]['seconds'] / runs[1]['seconds']:.2f}x", flush=True)
            # a warm cache where cached_encode looks for it: the folder the 1-process run wrote
            from turntune.dataset import encode_inputs, fingerprint
            from turntune.encoding import EncodeOptions

            cache = tmp / f"cache{n}"
            cache.mkdir()
            inputs = encode_inputs(data, _template(), EncodeOptions("all", "token", 2048))
            os.rename(tmp / f"enc{n}-1", cache / fingerprint(inputs)[:32])
            out = subprocess.run([sys.executable, __file__, "--warm", str(data), str(cache)], capture_output=True,
                                 text=True, check=True).stdout
            results[n] = json.loads(out.strip().splitlines()[-1])
            print(f"warm {n:,}: {json.dumps(results[n])}", flush=True)
        if len(results) == 2:
            print(f"resident growth of the data part, {a.small:,} -> {a.n:,} conversations: "
                  f"{results[a.n]['rss_growth_mb'] - results[a.small]['rss_growth_mb']:.0f} MB")


if __name__ == "__main__":
    main()
