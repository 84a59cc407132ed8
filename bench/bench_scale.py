"""Real-size data: encoding into the cache, its size on disk, and what a warm cache costs a run.

    .venv/bin/python bench/bench_scale.py --n 20000 --small 2000       # ~6 min on 2 shared cores
    .venv/bin/python bench/bench_scale.py --plans 1000000              # ~1 min: epoch-0 plans, old vs new
    .venv/bin/python bench/bench_scale.py --assembly DIR               # micro-batches: from examples vs columns
    .venv/bin/python bench/bench_scale.py --to-parquet big.jsonl big.parquet
    .venv/bin/python bench/bench_scale.py --encode-file big.parquet OUT --reference DIR   # one cold encode

``--plans N``: the batch plan of epoch 0 (what ``MicroBatches`` computes before step 1) for N
random lengths (lognormal, clipped to 100..2048, mean ~700: ~700 M tokens at 1 M; or the lengths
of an encoded folder with ``--lengths-from DIR``), with the old list code (tests/plans_reference.py:
``lengths.tolist()``, then the plan as lists of lists) and the array code (collate.py), packed
(4 rows of 2048 per micro-batch) and by token budget (8192), each in a fresh process: seconds,
and resident memory the plan keeps (RSS with the plan alive minus RSS before it) and at its peak
while planning. The old start planned epoch 0 twice (the count, then step 0); the times here are one plan.

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
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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


def _sampler(start: int, every: float) -> tuple[list[int], Callable[[], None]]:
    """Sample this process tree's resident bytes every ``every`` s in a thread: ``peak[0]`` is the
    most seen (at least ``start``); call ``stop()`` to end it and wait for the thread."""
    peak, done = [start], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(os.getpid()))
            time.sleep(every)

    th = threading.Thread(target=sample, daemon=True)
    th.start()

    def stop() -> None:
        done.set()
        th.join()

    return peak, stop


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

    import resource

    def cpu() -> float:
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN)))

    tmpl = _template()
    peak, stop = _sampler(0, 0.2)
    t0, c0 = time.time(), cpu()
    got = write_encoded(data, tmpl, EncodeOptions("all", "token", 2048), out, num_proc=num_proc)
    dt, cpu_s = time.time() - t0, cpu() - c0
    stop()
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"num_proc": num_proc, "seconds": dt, "cpu_s": cpu_s, "conversations": got.data_report.valid,
            "examples": len(got),
            "tokens": got.n_tokens, "peak_rss_gb": peak[0] / 2**30, "bytes_per_token": size / got.n_tokens,
            "disk_mb": size / 2**20}


def warm_run(data: Path, cache: Path) -> dict:
    """In a fresh process: what a run does with its data before the first step (``MicroBatches``
    as ``train`` builds it: packed rows of 2048, 4 per micro-batch), and 10 micro-batches after."""
    import resource

    from turntune.config import load_config
    from turntune.dataset import cached_encode
    from turntune.encoding import EncodeOptions
    from turntune.parallel import Dist
    from turntune.training import MicroBatches

    tmpl = _template()
    cfg = load_config(None, ["data.max_length=2048", "train.micro_batch_tokens=8192"])
    rss0 = _tree_rss(os.getpid())
    t0 = time.time()
    got = cached_encode(data, tmpl, EncodeOptions("all", "token", 2048), cache_dir=cache, num_proc=1)
    t_open = time.time() - t0
    assert not got.encoded_here
    batches = MicroBatches(got.data, cfg, Dist(), pad_id=0)
    t_plan = time.time() - t0 - t_open
    batch = batches.get(0)
    dt = time.time() - t0
    t1 = time.time()
    for g in range(1, 11):
        batches.get(g)
    per_batch = (time.time() - t1) / 10
    return {"examples": len(got.data), "open_s": t_open, "plan_s": t_plan, "first_batch_s": dt,
            "rows": len(batch.seq_lens), "next_batches_ms": per_batch * 1000,
            "rss_growth_mb": (_tree_rss(os.getpid()) - rss0) / 2**20,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _lengths(n: int, lengths_from: str | None):
    import numpy as np

    if lengths_from:
        from turntune.dataset import EncodedData

        return np.asarray(EncodedData(lengths_from).lengths)
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(6.3, 0.7, n), 100, 2048).astype(np.int64)


def plan_run(impl: str, kind: str, n: int, lengths_from: str | None) -> dict:
    """In a fresh process: one epoch-0 plan, its time and the resident memory it keeps and peaks at."""
    import gc

    sys.path.insert(0, str(ROOT / "tests"))
    from plans_reference import old_packed_batches, old_token_budget_batches  # imported before measuring

    from turntune.collate import packed_batches, token_budget_batches  # (torch with it)

    lengths = _lengths(n, lengths_from)
    gc.collect()
    rss0 = _tree_rss(os.getpid())
    peak, stop = _sampler(rss0, 0.01)  # every 10 ms while planning (ru_maxrss would count earlier peaks)
    t0 = time.perf_counter()
    if impl == "old":
        as_list = lengths.tolist()  # what MicroBatches did with the cache's array
        plan = (old_packed_batches(as_list, 2048, 4, seed=0) if kind == "packed"
                else old_token_budget_batches(as_list, 8192, seed=0))
        del as_list
    else:
        plan = packed_batches(lengths, 2048, 4, seed=0) if kind == "packed" else token_budget_batches(lengths, 8192, 0)
    seconds = time.perf_counter() - t0
    stop()
    gc.collect()
    kept = _tree_rss(os.getpid()) - rss0
    return {"impl": impl, "kind": kind, "n": len(lengths), "tokens": int(lengths.sum()), "seconds": seconds,
            "batches": len(plan), "kept_mb": kept / 2**20, "peak_mb": (peak[0] - rss0) / 2**20,
            "nbytes_mb": getattr(plan, "nbytes", 0) / 2**20}


def plans(n: int, lengths_from: str | None) -> None:
    """Old and new epoch-0 plans side by side (each in its own process)."""
    runs = {}
    for kind in ("packed", "budget"):
        for impl in ("old", "new"):
            cmd = [sys.executable, __file__, "--plan-one", impl, kind, str(n)]
            if lengths_from:
                cmd += ["--lengths-from", lengths_from]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[kind, impl] = json.loads(out.strip().splitlines()[-1])
    r = runs["packed", "new"]
    what = f"the lengths of {lengths_from}" if lengths_from else "random lengths (lognormal, 100..2048)"
    print(f"epoch-0 plan of {r['n']:,} examples ({r['tokens'] / 1e6:,.0f} M tokens), {what}; one fresh process each")
    print(f"{'':34}{'old (lists)':>28}{'new (arrays)':>28}{'':>10}")
    print(f"{'':34}{'s':>8}{'kept MB':>10}{'peak MB':>10}{'s':>8}{'kept MB':>10}{'peak MB':>10}{'speed-up':>10}")
    names = {"packed": "packed, 4 rows of 2048 per batch", "budget": "token budget 8192 per batch"}
    for kind in ("packed", "budget"):
        o, w = runs[kind, "old"], runs[kind, "new"]
        assert kind != "packed" or o["batches"] == w["batches"], (o, w)  # the same packing, other shuffles
        print(f"{names[kind]:34}{o['seconds']:8.2f}{o['kept_mb']:10.0f}{o['peak_mb']:10.0f}"
              f"{w['seconds']:8.2f}{w['kept_mb']:10.0f}{w['peak_mb']:10.0f}{o['seconds'] / w['seconds']:9.1f}x")
    packed, budget = runs["packed", "new"], runs["budget", "new"]
    print(f"new plans' arrays: packed {packed['nbytes_mb']:.1f} MB ({packed['batches']:,} micro-batches), budget "
          f"{budget['nbytes_mb']:.1f} MB ({budget['batches']:,}; old {runs['budget', 'old']['batches']:,}: other "
          "shuffles, other mega-batches)")


def assembly(folder: str, n: int = 40) -> None:
    """Micro-batch assembly on one encoded folder, side by side in one process: each micro-batch
    built from ``Example`` objects (``data[i]``) and ``rows_batch``/``pad_batch`` -- the old
    ``MicroBatches.get`` -- and gathered from the mapped columns (``EncodedData.batch``). The same
    ``n`` micro-batches of epoch 0, each way, the two results asserted equal."""
    import torch

    from turntune.collate import packed_batches, pad_batch, rows_batch, token_budget_batches
    from turntune.dataset import EncodedData

    data = EncodedData(folder)
    kinds = {"packed, 4 rows of 2048": (True, packed_batches(data.lengths, 2048, 4, 0)[:n]),
             "token budget 8192": (False, token_budget_batches(data.lengths, 8192, 0)[:n])}
    print(f"micro-batch assembly, {len(data):,} examples in {folder}; {n} micro-batches of epoch 0 each, ms per batch")
    print(f"{'':26}{'tokens':>8}{'from examples':>15}{'from columns':>14}{'speed-up':>10}")
    for name, (packed, plan) in kinds.items():
        times = {}
        for way in ("examples", "columns", "examples", "columns"):  # twice each, interleaved; the second counts
            t0 = time.perf_counter()
            if way == "columns":
                got = [data.batch(item, pad_id=0, packed=packed) for item in plan]
            elif packed:
                want = [rows_batch([[data[i] for i in row] for row in item], pad_id=0) for item in plan]
            else:
                want = [pad_batch([data[i] for i in item], pad_id=0) for item in plan]
            times[way] = (time.perf_counter() - t0) / len(plan) * 1000
        for a, b in zip(got, want):
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "weight", "turn",
                                                                              "position_ids"))
        tokens = sum(sum(map(sum, b.seq_lens)) for b in got) / len(got)
        print(f"{name:26}{tokens:8.0f}{times['examples']:15.2f}{times['columns']:14.2f}"
              f"{times['examples'] / times['columns']:9.1f}x")


def to_parquet(src: Path, dst: Path, rows: int = 20000) -> None:
    """A JSONL file's records as one Parquet file, ``rows`` records per row group, streamed in two
    passes: the first unifies every batch's inferred schema (a field only some records have, e.g.
    ``tools``, is in it), the second writes each batch in that schema (absent fields as nulls,
    which turntune reads as absent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def batches():
        with src.open(encoding="utf-8") as f:
            while batch := [json.loads(line) for line in itertools.islice(f, rows)]:
                yield batch

    schema = pa.unify_schemas([pa.Table.from_pylist(b).schema for b in batches()], promote_options="permissive")
    n = 0
    with pq.ParquetWriter(dst, schema) as writer:
        for b in batches():
            writer.write_table(pa.Table.from_pylist(b, schema=schema))
            n += len(b)
    print(f"wrote {n:,} records to {dst} ({dst.stat().st_size / 2**20:,.0f} MB); schema: {schema}")


def encode_file(data: Path, out: Path, num_proc: int, reference: str | None) -> None:
    """``encode_run`` on one existing file; with ``reference`` (a folder encoded from the same
    conversations in another file format), the token columns must be byte-identical to it."""
    r = encode_run(data, out, num_proc)
    if reference:
        cols = ("ids", "turn", "flags", "offsets", "n_turns")
        r["same_columns_as_reference"] = all((out / c).read_bytes() == (Path(reference) / c).read_bytes() for c in cols)
    print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--plans", type=int, metavar="N", help="only time epoch-0 plans for N lengths, old vs new")
    ap.add_argument("--lengths-from", metavar="DIR", help="time the plans on the lengths of this encoded folder")
    ap.add_argument("--assembly", metavar="DIR", help="only time micro-batch assembly on this encoded folder")
    ap.add_argument("--write", nargs=2, metavar=("N", "PATH"),
                    help="only write N generated conversations to PATH (JSONL), e.g. for bench/configs/scale-1m.yaml")
    ap.add_argument("--to-parquet", nargs=2, metavar=("JSONL", "PARQUET"), help="only convert a JSONL file")
    ap.add_argument("--encode-file", nargs=2, metavar=("DATA", "OUT"), help="only encode DATA into folder OUT")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--reference", metavar="DIR", help="with --encode-file: the token columns must equal this folder's")
    ap.add_argument("--warm", nargs=2, help=argparse.SUPPRESS)  # (internal) data, cache
    ap.add_argument("--plan-one", nargs=3, help=argparse.SUPPRESS)  # (internal) old|new, packed|budget, N
    a = ap.parse_args()
    if a.write:
        t0 = time.time()
        _write_data(Path(a.write[1]), int(a.write[0]))
        print(f"wrote {int(a.write[0]):,} conversations to {a.write[1]} in {time.time() - t0:.0f}s")
        return
    if a.assembly:
        assembly(a.assembly)
        return
    if a.to_parquet:
        to_parquet(Path(a.to_parquet[0]), Path(a.to_parquet[1]))
        return
    if a.encode_file:
        encode_file(Path(a.encode_file[0]), Path(a.encode_file[1]), a.num_proc, a.reference)
        return
    if a.warm:
        print(json.dumps(warm_run(Path(a.warm[0]), Path(a.warm[1]))))
        return
    if a.plan_one:
        print(json.dumps(plan_run(a.plan_one[0], a.plan_one[1], int(a.plan_one[2]), a.lengths_from)))
        return
    if a.plans is not None or a.lengths_from:
        plans(a.plans or 0, a.lengths_from)
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
