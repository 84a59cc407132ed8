"""The encoded-data cache: exact round trip, fingerprint, atomic writes, shared between processes;
records from Parquet and ``datasets`` folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from turntune import dataset
from turntune.data import load_conversations
from turntune.dataset import EncodedData, cached_encode, check_folder, write_encoded
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations, resolve_template
from turntune.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = (ROOT / "examples/templates/chatml-tools.jinja").read_text()


@pytest.fixture(scope="module")
def chatml(smollm2_tokenizer):
    return resolve_template(smollm2_tokenizer, "hf", TEMPLATE)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(dataset, "CHUNK", 50)  # several chunks, so merging and ordering are exercised


def _data(tmp: Path, copies: int = 2, bad: bool = True) -> Path:
    """The example set ``copies`` times (400 conversations, tool calls among them), plus bad lines."""
    lines = (ROOT / "examples/data/train.jsonl").read_text().splitlines() * copies
    if bad:
        lines[7:7] = ["{not json", "", json.dumps({"messages": [{"role": "user", "content": "hi"}]})]
        lines[130:130] = [json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]})]
    p = tmp / "train.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def _fields(e):
    return (e.input_ids, e.labels, e.turn, e.weight, e.source, e.n_turns, e.position_ids, e.tree_end)


@pytest.mark.parametrize("strategy,weighting,max_length", [("all", "token", 512), ("all", "turn", 256),
                                                           ("expand", "sample", 1024), ("full", "turn", 300)])
def test_cache_round_trips_bit_exactly(chatml, tmp_path, small_chunks, strategy, weighting, max_length):
    data = _data(tmp_path)
    opts = EncodeOptions(strategy, weighting, max_length)
    loaded = load_conversations(data, on_invalid="skip")
    rep = EncodeReport()
    with pytest.warns(UserWarning) if strategy == "full" else _nothing():
        want = encode_conversations(loaded.conversations, chatml, opts, report=rep, on_invalid="skip")
    with pytest.warns(UserWarning) if strategy == "full" else _nothing():
        got = write_encoded(data, chatml, opts, tmp_path / "one", on_invalid="skip", num_proc=1)
    assert len(got) == len(want) >= 400
    assert [_fields(e) for e in got] == [_fields(e) for e in want]
    assert got.lengths.tolist() == [len(e) for e in want]
    assert got.data_report == loaded.report and got.data_report.n_skipped == 3
    assert vars(got.encode_report) == vars(rep)
    assert got.encode_report.summary() == rep.summary()
    size = sum(f.stat().st_size for f in got.folder.iterdir() if f.name in dataset.COLUMNS)
    assert size / got.n_tokens < (8 if weighting == "token" else 12)  # bytes per token on disk


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_token_trees_round_trip(glm4_tokenizer, tmp_path, small_chunks):
    sys.path.insert(0, str(ROOT / "tests"))
    from reasoning import conversations, template_source, tokenizer_for

    from turntune.templates.hf import HFTemplate

    tmpl = HFTemplate(tokenizer_for(glm4_tokenizer, "qwen3"), chat_template=template_source("qwen3"))
    convs = conversations("qwen3") * 40
    data = tmp_path / "reasoning.jsonl"
    data.write_text("".join(json.dumps({"messages": [_message(m) for m in c.messages]}) + "\n" for c in convs))
    opts = EncodeOptions("expand", "turn", None)
    want = encode_conversations(load_conversations(data).conversations, tmpl, opts)
    got = write_encoded(data, tmpl, opts, tmp_path / "c", num_proc=2)
    assert sum(e.is_tree for e in want) >= 40
    assert [_fields(e) for e in got] == [_fields(e) for e in want]


def _same_batch(a, b) -> None:
    assert a.seq_lens == b.seq_lens
    for name in ("input_ids", "labels", "weight", "turn", "attention_mask", "position_ids", "tree_end"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("weighting", ["turn", "token"])
def test_micro_batches_from_the_mapped_columns_equal_collated_examples(glm4_tokenizer, chatml, tmp_path, weighting):
    """``EncodedData.batch`` gathers a micro-batch from the columns; it must give exactly what
    building each example and collating it gives: packed rows and padded rows, token trees
    (positions and tree_end offset by their column) beside plain examples, weights 1/|A_k|."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reasoning import conversations, template_source, tokenizer_for

    from turntune.collate import pack_rows, packed_batches, pad_batch, rows_batch, token_budget_batches
    from turntune.templates.hf import HFTemplate

    tmpl = HFTemplate(tokenizer_for(glm4_tokenizer, "qwen3"), chat_template=template_source("qwen3"))
    data = tmp_path / "reasoning.jsonl"
    data.write_text("".join(json.dumps({"messages": [_message(m) for m in c.messages]}) + "\n"
                            for c in conversations("qwen3") * 6)
                    + "".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"},
                                                       {"role": "assistant", "content": "hello " * i}]}) + "\n"
                              for i in range(1, 9)))  # prefix-stable: plain examples beside the trees
    trees = write_encoded(data, tmpl, EncodeOptions("expand", weighting, None), tmp_path / "t", num_proc=1)
    strategy = "full" if weighting == "token" else "all"  # full: each example's first token is labelled
    with pytest.warns(UserWarning) if strategy == "full" else _nothing():
        plain = write_encoded(_data(tmp_path, copies=1, bad=False), chatml, EncodeOptions(strategy, weighting, 512),
                              tmp_path / "p", num_proc=1)
    assert 0 < sum(e.is_tree for e in trees) < len(trees)
    checked = 0
    for got in (trees, plain):
        exs = list(got)
        longest = int(got.lengths.max())
        for seed in range(3):
            for plan in packed_batches(got.lengths, longest + 37, 3, seed)[:6]:
                _same_batch(got.batch(plan, pad_id=7, packed=True), rows_batch([[exs[i] for i in r] for r in plan], pad_id=7))
                checked += 1
            for item in token_budget_batches(got.lengths, 3 * longest, seed)[:6]:
                _same_batch(got.batch(item, pad_id=7, packed=False), pad_batch([exs[i] for i in item], pad_id=7))
                checked += 1
        row = pack_rows(got.lengths, longest)[0]  # one row, one example: no pads at all
        _same_batch(got.batch([row], pad_id=0, packed=True), rows_batch([[exs[i] for i in row]], pad_id=0))
    assert checked >= 60
    # the encoder never labels an example's first token; the batch clears it anyway, as collate does
    flags = np.memmap(plain.folder / "flags", dtype="u1", mode="r+")
    flags[plain.offsets[:-1]] |= dataset.LABELLED
    flags.flush()
    marked = EncodedData(plain.folder)
    plan = packed_batches(marked.lengths, 512, 3, 0)[0]
    with np.errstate(divide="ignore"):  # the reference path divides by the denominator 0 of a context token
        _same_batch(marked.batch(plan, pad_id=7, packed=True), rows_batch([[marked[i] for i in r] for r in plan],
                                                                          pad_id=7))
    with pytest.raises(IndexError):
        plain.batch([[0, len(plain)]], pad_id=0, packed=True)


def _message(m) -> dict:
    out = {"role": m.role, "content": m.content}
    if m.reasoning:
        out["reasoning_content"] = m.reasoning
    if m.tool_calls:
        out["tool_calls"] = [{"type": "function", "id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                             if c.id else {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    if m.role == "tool":
        out.update({k: v for k, v in (("name", m.name), ("tool_call_id", m.tool_call_id)) if v})
    return out


def test_same_bytes_whatever_the_number_of_processes(chatml, tmp_path, small_chunks):
    data = _data(tmp_path)
    opts = EncodeOptions("all", "turn", 512)
    one = write_encoded(data, chatml, opts, tmp_path / "one", on_invalid="skip", num_proc=1).folder
    two = write_encoded(data, chatml, opts, tmp_path / "two", on_invalid="skip", num_proc=2).folder
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and "denom" in names
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


def test_first_error_in_file_order_with_several_processes(chatml, tmp_path, small_chunks):
    data = _data(tmp_path)
    for n in (1, 2):
        with pytest.raises(DataError) as info:
            write_encoded(data, chatml, EncodeOptions(), tmp_path / f"e{n}", num_proc=n)
        assert (info.value.source, info.value.rule) == (f"{data}:8", "bad_json")
        assert not list(tmp_path.glob(f"*e{n}*"))  # nothing left behind


def test_tool_call_kinds_survive(chatml, tmp_path):
    from turntune.evaluation import turn_kinds

    data = _data(tmp_path, copies=1, bad=False)
    got = write_encoded(data, chatml, EncodeOptions("all", "token", 2048), tmp_path / "c", num_proc=1)
    every = turn_kinds(load_conversations(data).conversations)
    kinds = got.turn_kinds()
    assert len(kinds) == len(every) and all(every[k] == v for k, v in kinds.items())  # every reply is trained
    assert sum(v == "tool_call" for v in kinds.values()) > 10


def test_fingerprint_changes_reencode_and_nothing_else_does(chatml, smollm2_tokenizer, tmp_path):
    data = _data(tmp_path, copies=1, bad=False)
    cache = tmp_path / "cache"

    def run(path=data, template=chatml, opts=EncodeOptions("all", "token", 512), **kw):
        got = cached_encode(path, template, opts, cache_dir=cache, num_proc=1, **kw)
        return got.encoded_here, got.data.folder

    first = run()
    assert first[0]
    assert run() == (False, first[1])
    os.utime(data, (1, 1))  # a new modification time, the same bytes
    assert run() == (False, first[1])
    assert run(opts=EncodeOptions("all", "token", 512), format="auto")[0] is False
    changed = [run(opts=EncodeOptions("all", "turn", 512)), run(opts=EncodeOptions("all", "token", 600)),
               run(on_invalid="skip"), run(format="openai"),
               run(template=resolve_template(smollm2_tokenizer, "hf", TEMPLATE + "{#- another text -#}"))]
    assert all(here for here, _ in changed) and len({f for _, f in changed} | {first[1]}) == 6
    data.write_bytes(data.read_bytes().replace(b"Paris", b"Lyon", 1))  # one word of the data
    assert run()[0]
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock") and p.name != dataset.DIGESTS) \
        == sorted(p.name for p in cache.iterdir() if (p / dataset.MARKER).is_file())  # no temporary folder left


def _reads_of(path: Path, monkeypatch) -> list[str]:
    """A list that gets one entry each time ``path`` is opened for reading (through pathlib)."""
    reads: list[str] = []
    real = Path.open

    def counting(self, mode="r", *a, **k):  # noqa: ANN001
        if "r" in mode and self.resolve() == path.resolve():
            reads.append(mode)
        return real(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", counting)
    return reads


def test_warm_start_does_not_read_the_data_file_again(chatml, tmp_path, monkeypatch):
    """The data's digest is memoised in the cache root by path, size, mtime and inode: a warm start
    hashes nothing; a same-size edit with a new time hashes again and re-encodes; a corrupt memo is
    only a re-hash; the fingerprint is the value it always was."""
    data = _data(tmp_path, copies=1, bad=False)
    old = time.time_ns() - 60 * 10**9
    os.utime(data, ns=(old, old))  # written a minute ago (a file written just now is not memoised)
    cache, opts = tmp_path / "cache", EncodeOptions("all", "token", 512)
    want = dataset.fingerprint(dataset.encode_inputs(data, chatml, opts))  # no memo: the value as ever

    def run():
        got = cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1)
        return got.encoded_here, got.data.folder.name

    assert run() == (True, want[:32])
    memo = list((cache / dataset.DIGESTS).iterdir())
    assert len(memo) == 1 and json.loads(memo[0].read_text())["sha256"] == dataset.file_digest(data)
    reads = _reads_of(data, monkeypatch)
    assert run() == (False, want[:32]) and reads == []  # warm: the file is not opened at all
    assert dataset.fingerprint(dataset.encode_inputs(data, chatml, opts, digests=cache / dataset.DIGESTS)) == want

    memo[0].write_text('{"path": "' + str(data.resolve()) + '", "files": [')  # cut short
    assert run() == (False, want[:32]) and reads == ["rb"]  # hashed once, not fatal, not re-encoded
    assert run() == (False, want[:32]) and reads == ["rb"]  # and memoised again
    memo[0].write_text('["not", "a", "memo"]')
    assert run() == (False, want[:32]) and reads == ["rb", "rb"]

    text = data.read_bytes()
    data.write_bytes(text.replace(b"Paris", b"Pariz", 1))  # same size, new content
    os.utime(data, ns=(old + 10**9, old + 10**9))
    reads.clear()
    here, folder = run()
    assert (here, reads) == (True, ["rb", "rb"]) and folder != want[:32]  # hashed, then encoded
    assert run() == (False, folder) and reads == ["rb", "rb"]  # the new content's digest is the memo now


def test_a_file_written_just_now_is_hashed_every_time(chatml, tmp_path, monkeypatch):
    """Its mtime cannot yet tell a later same-size rewrite apart (timestamps have a granularity),
    so its digest is not memoised until it has been left alone for a moment."""
    data = _data(tmp_path, copies=1, bad=False)
    cache, opts = tmp_path / "cache", EncodeOptions("all", "token", 512)
    assert cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1).encoded_here
    assert not (cache / dataset.DIGESTS).exists()
    reads = _reads_of(data, monkeypatch)
    assert not cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1).encoded_here
    assert reads == ["rb"]


def test_interrupted_write_is_detected_and_redone(chatml, tmp_path, small_chunks, monkeypatch):
    data = _data(tmp_path, copies=1, bad=False)
    cache, opts = tmp_path / "cache", EncodeOptions("all", "token", 512)
    real, calls = dataset.encode_chunk, []

    def crash_on_third(job, chunk):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill between chunks
        return real(job, chunk)

    monkeypatch.setattr(dataset, "encode_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(dataset, "encode_chunk", real)
    good = cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1)
    assert good.encoded_here
    folder = good.data.folder
    # A folder that lost its marker (a copy cut short) or a column's tail is not a cache.
    (folder / "ids").write_bytes((folder / "ids").read_bytes()[:-4])
    assert check_folder(folder) == f"ids holds {good.data.n_tokens * 4 - 4} bytes, meta.json says {good.data.n_tokens} values"
    with pytest.raises(DataError, match="not a complete encoded-data folder: ids holds"):
        EncodedData(folder)
    again = cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1)
    assert again.encoded_here and again.data.folder == folder and check_folder(folder) is None
    (folder / dataset.MARKER).unlink()
    assert check_folder(folder) == "no COMPLETE marker (the write did not finish)"
    assert cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1).encoded_here


def test_explicit_output_folder_is_checked_against_the_run(chatml, tmp_path):
    data = _data(tmp_path, copies=1, bad=False)
    out = tmp_path / "train.encoded"
    write_encoded(data, chatml, EncodeOptions("all", "token", 512), out, num_proc=1)
    got = cached_encode(out, chatml, EncodeOptions("all", "token", 512))
    assert not got.encoded_here and got.data.folder == out
    with pytest.raises(ConfigError, match=r"was encoded with another options than this run \(it has options="):
        cached_encode(out, chatml, EncodeOptions("all", "turn", 512))


_RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from turntune.dataset import cached_encode
    from turntune.encoding import EncodeOptions, resolve_template
    from turntune.models import load_tokenizer
    dist.init_process_group("gloo")
    tmpl = resolve_template(load_tokenizer(sys.argv[1]), "hf", open(sys.argv[2]).read())
    got = cached_encode(sys.argv[3], tmpl, EncodeOptions("all", "token", 512), cache_dir=sys.argv[4], num_proc=1)
    mine = torch.tensor([int(got.encoded_here), int(got.data.ids.sum()), len(got.data)], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    with open(f"{sys.argv[4]}.rank{dist.get_rank()}.json", "w") as f:  # (the ranks share one stdout)
        json.dump({"folder": str(got.data.folder), "all": [t.tolist() for t in every]}, f)
    dist.barrier()  # both done
    from turntune.parallel import leave_distributed
    leave_distributed(0)  # as the CLI leaves: interpreter teardown with gloo up can abort (SIGABRT)
""")


def test_two_gloo_ranks_share_one_cache(smollm2_path, tmp_path):
    import socket

    data = _data(tmp_path, copies=1, bad=False)
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "--master_addr=127.0.0.1", str(script), str(smollm2_path),
                        str(ROOT / "examples/templates/chatml-tools.jinja"), str(data), str(tmp_path / "cache")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[:3000]
    seen = [json.loads((tmp_path / f"cache.rank{r}.json").read_text()) for r in (0, 1)]
    every = seen[0]["all"]
    assert sorted(e[0] for e in every) == [0, 1]  # exactly one rank encoded
    assert every[0][1:] == every[1][1:] and every[0][2] > 0  # both read the same data
    assert seen[0]["folder"] == seen[1]["folder"]
    cache = tmp_path / "cache"
    assert len([f for f in cache.iterdir() if f.is_dir() and f.name != dataset.DIGESTS]) == 1


# -- Parquet and datasets folders ---------------------------------------------------------------
pa = pytest.importorskip("pyarrow", reason="Parquet and Arrow input need pyarrow (the 'parquet' extra)")


def _records():
    return [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "weight": 1}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hi there"}]},
        {"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "metadata": "get_weather",
                                                                 "content": '{"city": "Paris"}'},
                      {"role": "observation", "content": '{"temp": 20}'}, {"role": "assistant", "content": "20 C"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
    ]


def test_parquet_three_shapes_with_row_sources(tmp_path):
    import pyarrow.parquet as pq

    recs = _records()
    for i, r in enumerate(recs):  # one file per shape (a Parquet file has one schema)
        pq.write_table(pa.Table.from_pylist([r, r]), tmp_path / f"r{i}.parquet")
    shapes = [load_conversations(tmp_path / f"r{i}.parquet").report.formats for i in range(4)]
    assert shapes == [{"openai": 2}, {"openai": 2}, {"sharegpt": 2}, {"glm4": 2}]
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([recs[0], recs[1], recs[4], recs[0]]), mixed)
    res = load_conversations(mixed, on_invalid="skip")
    # Arrow's unified schema put weight: null on every message; it is read as absent, not as a bad weight
    assert (res.report.records, res.report.valid, dict(res.report.skipped)) == (4, 3, {"consecutive_user": 1})
    assert [c.source for c in res.conversations] == [f"{mixed}:#0", f"{mixed}:#1", f"{mixed}:#3"]
    assert res.report.examples["consecutive_user"] == [
        f"{mixed}:#2: turn 2: two user messages in a row (merge them or insert the assistant reply)"]
    assert not res.report.ignored_keys
    with pytest.raises(DataError, match=rf"^{mixed}:#2: turn 2: two user messages"):
        load_conversations(mixed)


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    """Streaming a Parquet file holds about one row group in Arrow memory, not the file: pyarrow's
    default pre-buffering kept every row group read so far (1.7 KB per record, 1.7 GB at 1 M)."""
    import pyarrow.parquet as pq

    from turntune.arrow_files import parquet_records

    path, groups, rows, text = tmp_path / "big.parquet", 40, 400, 2000
    with pq.ParquetWriter(path, pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()),
                                                                             ("content", pa.string())])))])) as w:
        for g in range(groups):
            w.write_table(pa.Table.from_pylist([{"messages": [
                {"role": "user", "content": os.urandom(text // 2).hex()},
                {"role": "assistant", "content": os.urandom(text // 2).hex()}]} for _ in range(rows)]))
    group_mb = rows * 2 * text / 2**20  # 1.5 MB of text per row group
    base, most, n = pa.total_allocated_bytes(), 0, 0
    for _, rec in parquet_records(path, "big.parquet"):
        n += 1
        most = max(most, pa.total_allocated_bytes() - base)
    assert n == groups * rows
    assert most / 2**20 < 8 * group_mb, f"{most / 2**20:.1f} MB of Arrow memory for {groups * group_mb:.0f} MB of text"


def _save_to_disk(folder: Path, records: list[dict], files: int) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow streams named in state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    per = -(-len(records) // files)
    names = []
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.ipc.new_stream(folder / name, table.schema) as w:
            w.write_table(table.slice(k * per, per))
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": None}))
    (folder / "dataset_info.json").write_text("{}")


def test_save_to_disk_folders(tmp_path, chatml):
    recs = [_records()[0], _records()[1], _records()[4]] * 3
    _save_to_disk(tmp_path / "ds", recs, files=2)
    res = load_conversations(tmp_path / "ds", on_invalid="skip")
    assert (res.report.records, res.report.valid, dict(res.report.skipped)) == (9, 6, {"consecutive_user": 3})
    assert [c.source.rsplit("#", 1)[1] for c in res.conversations] == ["0", "1", "3", "4", "6", "7"]
    # a DatasetDict: its train split
    dd = tmp_path / "dd"
    _save_to_disk(dd / "train", recs[:2], files=1)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert len(load_conversations(dd).conversations) == 2
    got = write_encoded(tmp_path / "ds", chatml, EncodeOptions(), tmp_path / "enc", on_invalid="skip", num_proc=1)
    assert len(got) == 6 and got.source(2) == f"{tmp_path / 'ds'}:#3"
    with pytest.raises(DataError, match="not a datasets folder"):
        load_conversations(tmp_path)  # holds folders, none of them a split


def test_a_killed_writers_partial_folder_is_removed_by_the_next_writer(chatml, tmp_path):
    """SIGKILL (or a machine that went down) runs no clean-up: the hidden partial folder stays. The
    next process to take the folder's lock is the only one that may write it, so the partial
    folders beside it are dead writers' and go (a 1 M-conversation one is gigabytes)."""
    data = _data(tmp_path, copies=1, bad=False)
    cache, opts = tmp_path / "cache", EncodeOptions("all", "token", 512)
    name = dataset.fingerprint(dataset.encode_inputs(data, chatml, opts))[:32]
    stale = cache / f".{name}.tmp-999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "ids").write_bytes(b"\0" * 64)
    other = cache / ".0123456789abcdef0123456789abcdef.tmp-999999-deadbeef"  # another cache's: not ours to touch
    other.mkdir()
    got = cached_encode(data, chatml, opts, cache_dir=cache, num_proc=1)
    assert got.encoded_here and got.data.folder.name == name
    assert not stale.exists() and other.exists()
