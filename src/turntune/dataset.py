"""Encoded data on disk: encode once, memory-map everywhere (DESIGN.md §9).

Python lists cost about 78 bytes per token; a training set lives here instead as flat columns
that every run and every rank maps from the same files, so the data costs next to nothing
resident and a second run starts without encoding.

A cache folder holds, per token: ``ids`` (int32), ``turn`` (int16: the assistant turn whose
target the token is, -1 elsewhere), ``flags`` (uint8: bit 0 the token is labelled, bit 1 its
reply is a tool call) and, only for ``turn``/``sample`` weighting, ``denom`` (int32: the token's
weight is exactly ``1.0 / denom``, the float64 the encoder computed, so batches are bit-identical
to in-memory encoding). Labels are implied: ``labels[i] = ids[i]`` where labelled (the writer
checks that this holds). Per example: ``offsets`` (int64), ``n_turns`` (int32) and its source
(``file:line``) as UTF-8 bytes with offsets. So 7 bytes per token with ``token`` weighting, 11
with the others. A token tree (templates that rewrite history, tree.py) also keeps its
``position_ids`` and ``tree_end`` (int32 each, ``tree_pos``/``tree_end``, indexed per example by
``tree_offsets``; empty for plain sequences). ``meta.json`` holds the column lengths and the
data and encode reports.

The folder's name is a fingerprint (sha256) of everything that changes the result: the data's
bytes and its path (sources name it), the tokenizer (its whole serialised vocabulary, special
tokens and chat template), the template, the encode options, the record format, ``on_invalid``
and ``ENCODING_VERSION`` (raise it whenever encoding changes its output). Nothing else: moving
the cache, touching a file's time or changing the number of processes reuses it.

Writing is atomic: columns go to a hidden sibling folder, are fsynced, ``meta.json`` after them
and the ``COMPLETE`` marker last, then the folder is renamed into place. A folder without the
marker, or whose files do not have the sizes ``meta.json`` names, is not a cache: it is encoded
again. One process per cache encodes (an exclusive ``flock`` on ``FOLDER.lock``); every other
process -- the other ranks of a torchrun job -- waits on the lock, then maps the result.

Reading: ``data[i]`` builds example i as an ``Example``; a training micro-batch is gathered from
the columns directly (``EncodedData.batch``: one gather per column, no per-token Python objects).

Encoding streams: records are read, validated and encoded ``CHUNK`` at a time in file order,
over ``num_proc`` forked worker processes (each with its own copy of the template), and written
in the same order, so the bytes are the same whatever the number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from turntune.collate import Batch
from turntune.constants import IGNORE_INDEX, NO_TURN
from turntune.data import DataReport, read_chunks, validate_chunk
from turntune.encoding import EncodeOptions, EncodeReport, encode_conversations
from turntune.errors import ConfigError, DataError, TurntuneError
from turntune.example import Example

ENCODING_VERSION = 1
CHUNK = 2048  # records per unit of work: bounds each worker's Python objects
_MAX_EXAMPLES = 3  # error texts kept per rule, as in the reports
MARKER, META = "COMPLETE", "meta.json"
DIGESTS = ".digests"  # in the cache root: data files' digests by path, size, mtime, inode (file_digest)
# name -> dtype; explicit little-endian so a cache reads the same on any machine.
COLUMNS = {"ids": "<i4", "turn": "<i2", "flags": "u1", "denom": "<i4", "offsets": "<i8", "n_turns": "<i4",
           "sources": "u1", "source_offsets": "<i8", "history_seen": "<i4",
           "tree_offsets": "<i8", "tree_pos": "<i4", "tree_end": "<i4"}
LABELLED, TOOL_CALL = 1, 2  # bits of ``flags``


# -- fingerprint --------------------------------------------------------------------------------
_SETTLED_NS = 2 * 10**9  # a file last written this long before it was hashed may have its digest memoised


def file_digest(path: Path, memo: Path | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, in name order).

    With ``memo`` (a folder) the digest is kept there, keyed by the resolved path and each file's
    size, mtime_ns, inode and device, and read back while those are unchanged: a warm start would
    otherwise read and hash the whole data file again. The value is the same either way.
    """
    if memo is None:
        return _sha256_of(path)
    resolved = path.resolve()
    before = _stat_key(resolved)
    entry = memo / f"{hashlib.sha256(str(resolved).encode('utf-8', 'surrogateescape')).hexdigest()[:32]}.json"
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = None  # no memo yet, or one that cannot be read (a crash, a hand edit): hash, write it anew
    if (isinstance(saved, dict) and saved.get("path") == str(resolved) and saved.get("files") == before
            and isinstance(saved.get("sha256"), str) and len(saved["sha256"]) == 64):
        return saved["sha256"]
    started = time.time_ns()
    digest = _sha256_of(path)
    # Memoised only when the files kept still while hashing and were last written well before it:
    # a same-size rewrite within one timestamp granule of the old time could not be told apart.
    if _stat_key(resolved) == before and all(f[2] < started - _SETTLED_NS for f in before):
        _write_memo(entry, {"path": str(resolved), "files": before, "sha256": digest})
    return digest


def _write_memo(entry: Path, value: dict) -> None:
    """Write a digest memo atomically; a cache that cannot take it only means hashing next time too."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, entry)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _stat_key(path: Path) -> list[list]:
    """Per file of ``path`` (a file, or a folder's files): relative name, size, mtime_ns, inode, device."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = []
    for f in files:
        st = f.stat()
        key.append([str(f.relative_to(path)) if path.is_dir() else "", st.st_size, st.st_mtime_ns, st.st_ino,
                    st.st_dev])
    return key


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode("utf-8", "surrogateescape") + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what a tokenizer encodes with: its serialised model (vocabulary, merges,
    normaliser, pre-tokeniser), added and special tokens, and its chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # a slow tokenizer: its folder's files
        folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
        if not folder.is_dir():
            raise ConfigError(f"cannot fingerprint tokenizer {type(tokenizer).__name__}: no fast tokenizer and no "
                              "local folder (use a fast tokenizer)")
        h.update(file_digest(folder).encode())
    h.update(repr(sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(repr(sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    return h.hexdigest()


def encode_inputs(path: str | Path, template, options: EncodeOptions, *, format: str = "auto",
                  on_invalid: str = "error", digests: Path | None = None) -> dict:
    """Everything that changes the encoded result, as JSON-able values (see the module doc).
    ``digests``: a folder where the data's digest is memoised (``file_digest``)."""
    name = read_chunks(path).name  # a missing path is named here, as reading would name it
    try:
        digest = file_digest(Path(path), digests)
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e} (check that you may read it)", source=name,
                        rule="unreadable_file") from None
    inputs = {"encoding_version": ENCODING_VERSION, "data": digest, "path": str(path),
              "tokenizer": tokenizer_digest(template.tokenizer), "template": template.name,
              "chat_template": getattr(template, "source", None), "options": dataclasses.asdict(options),
              "format": format, "on_invalid": on_invalid}
    kwargs = getattr(template, "template_kwargs", None)
    if kwargs:  # only when set: every fingerprint made without them keeps its value (and its cache)
        inputs["template_kwargs"] = kwargs
    return inputs


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# -- the data a run reads -----------------------------------------------------------------------
class EncodedData(Sequence[Example]):
    """A cache folder, memory-mapped: ``data[i]`` is example i (an :class:`Example` built from the
    mapped columns, ``message`` left empty); ``lengths`` are all the examples' lengths (numpy)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        problem = check_folder(self.folder)
        if problem:
            raise DataError(f"not a complete encoded-data folder: {problem} (encode it again with "
                            "`turntune encode DATA --output DIR`)", source=str(self.folder), rule="unreadable_file")
        self.meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        self.inputs: dict = self.meta["inputs"]
        cols = {name: _map(self.folder / name, COLUMNS[name], n) for name, n in self.meta["columns"].items()}
        self.ids, self.turn, self.flags = cols["ids"], cols["turn"], cols["flags"]
        self.denom = cols.get("denom")
        self.offsets, self.n_turns = cols["offsets"], cols["n_turns"]
        self._sources, self._source_offsets = cols["sources"], cols["source_offsets"]
        self.history_seen = cols["history_seen"]
        self.tree_offsets, self.tree_pos, self.tree_end = cols["tree_offsets"], cols["tree_pos"], cols["tree_end"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def source(self, i: int) -> str:
        a, b = self._source_offsets[i], self._source_offsets[i + 1]
        return bytes(self._sources[a:b]).decode("utf-8", "surrogateescape")

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        lab = (self.flags[a:b] & LABELLED).astype(bool)
        weight = np.zeros(b - a, dtype=np.float64)
        weight[lab] = 1.0 / self.denom[a:b][lab] if self.denom is not None else 1.0
        ta, tb = int(self.tree_offsets[i]), int(self.tree_offsets[i + 1])
        tree = (self.tree_pos[ta:tb].tolist(), self.tree_end[ta:tb].tolist()) if tb > ta else (None, None)
        return Example(ids.tolist(), np.where(lab, ids, IGNORE_INDEX).tolist(), self.turn[a:b].tolist(),
                       weight.tolist(), self.source(i), int(self.n_turns[i]), position_ids=tree[0], tree_end=tree[1])

    def batch(self, rows: Sequence[Sequence[int]], *, pad_id: int, packed: bool) -> Batch:
        """The micro-batch of these examples straight from the mapped columns: ``packed`` rows of
        examples (as ``collate.rows_batch``), else one example per row, right-padded (as
        ``collate.pad_batch``). The same tensors as building each ``self[i]`` and collating them
        (a test holds them equal), without a Python list per token: one gather per column.
        """
        rows = [[int(j) for j in r] for r in rows] if packed else [[int(j)] for j in rows]
        if not rows or not all(rows):
            raise ConfigError("EncodedData.batch: every row needs at least one example")
        ex = np.fromiter(itertools.chain.from_iterable(rows), np.int64)
        if ex.min() < 0 or ex.max() >= len(self):
            raise IndexError(f"example index out of range 0..{len(self) - 1}")
        per_row = np.fromiter(map(len, rows), np.int64, len(rows))
        first, lens = self.offsets[ex], self.offsets[ex + 1] - self.offsets[ex]
        if not lens.all():
            k = int(ex[np.argmin(lens)])
            raise DataError("empty example (no tokens)", source=self.source(k), rule="empty")
        ends = np.cumsum(lens)  # where each example ends, counting every row's tokens in turn
        row_of = np.repeat(np.arange(len(rows)), per_row)
        row_base = np.concatenate(([0], ends[np.cumsum(per_row)[:-1] - 1]))  # tokens before each row
        col0 = ends - lens - row_base[row_of]  # each example's first column in its row
        used = np.bincount(row_of, weights=lens, minlength=len(rows)).astype(np.int64)
        width, n = int(used.max()), int(ends[-1])
        within = np.arange(n) - np.repeat(ends - lens, lens)  # a token's index in its example
        src = np.repeat(first, lens) + within
        r, c = np.repeat(row_of, lens), np.repeat(col0, lens) + within

        ids = self.ids[src].astype(np.int64)
        lab = (self.flags[src] & LABELLED) > 0
        lab[within == 0] = False  # the first token of an example never has a label (collate.py)
        weight = np.zeros(n, dtype=np.float64)
        weight[lab] = 1.0 / self.denom[src[lab]] if self.denom is not None else 1.0
        pos = within.copy()
        tree_first = self.tree_offsets[ex]
        is_tree = self.tree_offsets[ex + 1] > tree_first
        end = np.repeat(col0 + lens, lens)  # a plain example: causal within itself
        if is_tree.any():
            t = np.repeat(is_tree, lens)
            tsrc = np.repeat(tree_first, lens)[t] + within[t]
            pos[t] = self.tree_pos[tsrc]
            end[t] = np.repeat(col0, lens)[t] + self.tree_end[tsrc]

        def grid(fill, dtype) -> np.ndarray:
            return np.full((len(rows), width), fill, dtype=dtype)

        g_ids, g_lab, g_w = grid(pad_id, np.int64), grid(IGNORE_INDEX, np.int64), grid(0.0, np.float64)
        g_turn, g_pos = grid(NO_TURN, np.int64), grid(0, np.int64)
        g_ids[r, c], g_lab[r, c], g_w[r, c] = ids, np.where(lab, ids, IGNORE_INDEX), weight
        g_turn[r, c], g_pos[r, c] = self.turn[src], pos
        if packed:  # trailing pads: a segment of their own, positions from 0
            pad_cols = np.arange(width)[None, :] - used[:, None]
            g_pos = np.where(pad_cols >= 0, pad_cols, g_pos)
        tree_end = None
        if is_tree.any():
            tree_end = grid(width, np.int64)
            tree_end[r, c] = end
            tree_end = torch.from_numpy(tree_end)
        mask = None
        if not packed:
            mask = torch.from_numpy((np.arange(width)[None, :] < used[:, None]).astype(np.int64))
        seq_lens = np.split(lens, np.cumsum(per_row)[:-1])
        return Batch(input_ids=torch.from_numpy(g_ids), labels=torch.from_numpy(g_lab), weight=torch.from_numpy(g_w),
                     turn=torch.from_numpy(g_turn), attention_mask=mask, position_ids=torch.from_numpy(g_pos),
                     seq_lens=[s.tolist() for s in seq_lens], tree_end=tree_end)

    @property
    def data_report(self) -> DataReport:
        return DataReport.from_dict(self.meta["data_report"])

    @property
    def encode_report(self) -> EncodeReport:
        d = self.meta["encode_report"]
        rep = EncodeReport(**{k: Counter(v) if k == "skipped" else v for k, v in d.items()})
        rep.history_seen = self.history_seen.tolist()
        return rep

    def turn_kinds(self) -> dict[tuple[str, int], str]:
        """(source, reply index) -> "tool_call" or "answer" for every labelled reply: evaluate's and
        loss_shares' ``kinds``, from the flags (one pass over the tokens; meant for eval-sized sets)."""
        pos = np.flatnonzero(self.flags & LABELLED)
        turn = self.turn[pos].astype(np.int64)
        pos, turn = pos[turn >= 0], turn[turn >= 0]
        ex = np.searchsorted(self.offsets, pos, side="right") - 1
        call = (self.flags[pos] & TOOL_CALL) > 0
        keys, first = np.unique(ex * 2**16 + turn, return_index=True)
        return {(self.source(int(k >> 16)), int(k & 0xFFFF)): "tool_call" if call[f] else "answer"
                for k, f in zip(keys.tolist(), first.tolist())}


def _map(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:  # mmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def check_folder(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache, or None when it is."""
    if not (folder / MARKER).is_file():
        return f"no {MARKER} marker (the write did not finish)"
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        for name, n in meta["columns"].items():
            size = (folder / name).stat().st_size
            if size != n * np.dtype(COLUMNS[name]).itemsize:
                return f"{name} holds {size} bytes, {META} says {n} values"
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {META} or column ({e})"
    version = meta.get("inputs", {}).get("encoding_version")
    if version != ENCODING_VERSION:
        return f"written by encoding version {version}, this turntune writes {ENCODING_VERSION}"
    return None


# -- encoding a chunk (in a worker) -------------------------------------------------------------
@dataclass
class _Job:
    template: object
    options: EncodeOptions
    format: str
    on_invalid: str


@dataclass
class _Part:
    """One chunk's result, in the columns' dtypes, and its reports."""

    columns: dict[str, np.ndarray]
    lengths: np.ndarray
    tree_lengths: np.ndarray  # per example: its tree columns' length (0: a plain sequence)
    n_turns: np.ndarray
    sources: list[str]
    history_seen: np.ndarray
    data_report: DataReport
    encode_report: EncodeReport


# A forked worker's job (template and options), set once by _init_worker in that process only:
# passing it with each chunk would pickle the tokenizer every time.
_worker_job: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _worker_job
    _worker_job = job


def _work(chunk: list) -> _Part:
    assert _worker_job is not None, "_work runs in a pool started with _init_worker"
    return encode_chunk(_worker_job, chunk)


def encode_chunk(job: _Job, chunk: list) -> _Part:
    """Validate and encode one chunk of records into column arrays."""
    drep, erep = DataReport(), EncodeReport()
    convs = validate_chunk(chunk, job.format, job.on_invalid, drep)  # type: ignore[arg-type]
    exs = encode_conversations(convs, job.template, job.options, report=erep, on_invalid=job.on_invalid)
    n = sum(len(e) for e in exs)
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(e.input_ids for e in exs), np.int64, n)
    labels = np.fromiter(chain(e.labels for e in exs), np.int64, n)
    turn = np.fromiter(chain(e.turn for e in exs), np.int64, n)
    weight = np.fromiter(chain(e.weight for e in exs), np.float64, n)
    lab = labels != IGNORE_INDEX
    where = exs[0].source if exs else ""
    if not np.array_equal(labels[lab], ids[lab]) or weight[~lab].any():
        raise TurntuneError(f"{where}: encoder output breaks the cache's layout (a label that is not its "
                            "token, or a weight on an unlabelled token); report this as a turntune bug")
    if n and (turn.min() < -1 or turn.max() >= 2**15 or ids.min() < 0 or ids.max() >= 2**31):
        raise DataError("a conversation with 32,768 or more assistant turns, or a token id past int32 (split it)",
                        source=where, rule="too_long")
    flags = lab.astype(np.uint8)
    by_source = {c.source: c for c in convs}
    at = 0
    for e in exs:  # mark the tokens of tool-call replies (evaluation reports them apart)
        c = by_source.get(e.source)
        if c is not None and any(c.messages[i].tool_calls for i in c.assistant_indices):
            calls = np.array([bool(c.messages[i].tool_calls) for i in c.assistant_indices])
            t = turn[at:at + len(e)]
            on = (t >= 0) & lab[at:at + len(e)]
            on[on] = calls[t[on]]
            flags[at:at + len(e)][on] |= TOOL_CALL
        at += len(e)
    columns = {"ids": ids.astype(COLUMNS["ids"]), "turn": turn.astype(COLUMNS["turn"]), "flags": flags}
    if job.options.weighting != "token":
        denom = np.zeros(n, dtype=np.float64)
        denom[lab] = np.rint(1.0 / weight[lab])
        if not np.array_equal(1.0 / denom[lab], weight[lab]) or (n and denom.max() >= 2**31):
            raise TurntuneError(f"{where}: a weight that is not 1/n; report this as a turntune bug")
        columns["denom"] = denom.astype(COLUMNS["denom"])
    elif not np.all(weight[lab] == 1.0):
        raise TurntuneError(f"{where}: token weighting with a weight other than 1; report this as a turntune bug")
    trees = [e for e in exs if e.tree_end is not None or e.position_ids is not None]
    if any(e.tree_end is None or e.position_ids is None for e in trees):
        raise TurntuneError(f"{where}: an example with position_ids but no tree_end (or the reverse); "
                            "report this as a turntune bug")
    columns["tree_pos"] = np.fromiter(chain(e.position_ids for e in trees), np.int64).astype(COLUMNS["tree_pos"])
    columns["tree_end"] = np.fromiter(chain(e.tree_end for e in trees), np.int64).astype(COLUMNS["tree_end"])
    tree_lengths = np.fromiter((len(e) if e.tree_end is not None else 0 for e in exs), np.int64, len(exs))
    history = np.asarray(erep.history_seen, dtype=COLUMNS["history_seen"])
    erep.history_seen = []
    return _Part(columns, np.fromiter((len(e) for e in exs), np.int64, len(exs)), tree_lengths,
                 np.fromiter((e.n_turns for e in exs), np.int64, len(exs)), [e.source for e in exs], history,
                 drep, erep)


def _parts(job: _Job, chunks: Iterator[list], num_proc: int) -> Iterator[_Part]:
    """Each chunk's result in file order. With several processes, at most 2 chunks per process
    are in flight, so reading runs ahead of encoding by a bounded amount of memory."""
    if num_proc <= 1:
        for chunk in chunks:
            yield encode_chunk(job, chunk)
        return
    # fork: the workers inherit the template (a tokenizer is costly to pickle or to load again)
    with multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (job,)) as pool:
        window: deque = deque()
        for chunk in chunks:
            window.append(pool.apply_async(_work, (chunk,)))
            if len(window) >= 2 * num_proc:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


# -- writing ------------------------------------------------------------------------------------
class _Writer:
    """Appends column arrays to files in a new folder; ``close`` fsyncs them and returns their lengths."""

    def __init__(self, folder: Path, names: Sequence[str]) -> None:
        folder.mkdir(parents=True)
        self.files = {name: (folder / name).open("wb") for name in names}
        self.counts = dict.fromkeys(names, 0)

    def add(self, name: str, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=COLUMNS[name])
        self.files[name].write(arr.tobytes())
        self.counts[name] += len(arr)

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        return self.counts


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_encoded(path: str | Path, template, options: EncodeOptions, out: str | Path, *, format: str = "auto",
                  on_invalid: str = "error", num_proc: int | None = None, inputs: dict | None = None,
                  progress: Callable[[int], None] | None = None) -> EncodedData:
    """Read, validate and encode the data file ``path`` into the folder ``out`` (atomically; module
    doc) and return it mapped. ``num_proc``: worker processes (default: every core).

    >>> data = write_encoded("train.jsonl", template, EncodeOptions(), "train.encoded")  # doctest: +SKIP
    >>> print(data.encode_report.summary()); data[0].labels                            # doctest: +SKIP
    """
    out = Path(out)
    if out.exists() and not (is_encoded_folder(out) or (out.is_dir() and not any(out.iterdir()))):
        raise ConfigError(f"--output {out}: exists and is not encoded data; give a new folder (it is replaced "
                          "only when it holds encoded data)")
    inputs = inputs or encode_inputs(path, template, options, format=format, on_invalid=on_invalid)
    num_proc = num_proc or len(os.sched_getaffinity(0))
    chunks = read_chunks(path, CHUNK)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    w = _Writer(tmp, [n for n in COLUMNS if n != "denom" or options.weighting != "token"])
    try:
        drep, erep = DataReport(path=chunks.name), EncodeReport()
        offset, source_offset, tree_offset = 0, 0, 0
        for name in ("offsets", "source_offsets", "tree_offsets"):
            w.add(name, np.zeros(1))
        for part in _parts(_Job(template, options, format, on_invalid), iter(chunks), num_proc):
            for name, values in part.columns.items():
                w.add(name, values)
            w.add("offsets", offset + np.cumsum(part.lengths))
            offset += int(part.lengths.sum())
            w.add("tree_offsets", tree_offset + np.cumsum(part.tree_lengths))
            tree_offset += int(part.tree_lengths.sum())
            raw = [s.encode("utf-8", "surrogateescape") for s in part.sources]
            w.add("sources", np.frombuffer(b"".join(raw), dtype=np.uint8))
            w.add("source_offsets", source_offset + np.cumsum([len(r) for r in raw], dtype=np.int64))
            source_offset += sum(len(r) for r in raw)
            w.add("n_turns", part.n_turns)
            w.add("history_seen", part.history_seen)
            drep.merge(part.data_report)
            erep.merge(part.encode_report)
            for texts in erep.skip_examples.values():  # as one report keeps them: the first few
                del texts[_MAX_EXAMPLES:]
            if progress is not None:
                progress(part.data_report.records)
        drep.finish()
        counts = w.close()
        meta = {"inputs": inputs, "columns": counts, "data_report": drep.to_dict(),
                "encode_report": {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(erep).items()}}
        _fsync_write(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        _fsync_write(tmp / MARKER, fingerprint(inputs) + "\n")  # last: its presence means complete
        _fsync_dir(tmp)
        if out.exists():  # encoded data (stale or incomplete) or an empty folder, checked above
            shutil.rmtree(out)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return EncodedData(out)


# -- the cache a run uses -----------------------------------------------------------------------
@dataclass
class Loaded:
    data: EncodedData
    encoded_here: bool  # this process encoded it (else found in the cache, or another process wrote it)
    seconds: float


def is_encoded_folder(path: str | Path) -> bool:
    """A folder written by :func:`write_encoded` (complete or not)."""
    return Path(path).is_dir() and ((Path(path) / META).is_file() or (Path(path) / MARKER).is_file())


def cached_encode(path: str | Path, template, options: EncodeOptions, *, format: str = "auto",
                  on_invalid: str = "error", cache_dir: str | Path | None = None, num_proc: int | None = None,
                  progress: Callable[[int], None] | None = None) -> Loaded:
    """The encoded data of ``path``: from the cache when its fingerprint is there, else encoded
    now by this process while every other process asking for it waits (module doc).

    ``path`` may also be a folder written by ``turntune encode --output``: it is used as is,
    once its tokenizer, template and options are checked against the ones given.
    """
    t0 = time.time()
    if is_encoded_folder(path):
        data = EncodedData(path)
        mine = {"encoding_version": ENCODING_VERSION, "tokenizer": tokenizer_digest(template.tokenizer),
                "template": template.name, "chat_template": getattr(template, "source", None),
                "options": dataclasses.asdict(options)}
        differ = [k for k, v in mine.items() if data.inputs.get(k) != v]
        if data.inputs.get("template_kwargs", {}) != (getattr(template, "template_kwargs", None) or {}):
            differ.append("template_kwargs")
        if differ:
            shown = ", ".join(f"{k}={data.inputs.get(k)!r}" for k in differ if k in ("template", "options"))
            raise ConfigError(f"data: {path} was encoded with another {', '.join(differ)} than this run"
                              + (f" (it has {shown})" if shown else "") + "; encode it again with this run's "
                              "settings (turntune encode DATA --output DIR), or give the data file")
        return Loaded(data, False, time.time() - t0)
    from turntune.assets import cache_root

    root = Path(cache_dir) if cache_dir else cache_root() / "data"
    inputs = encode_inputs(path, template, options, format=format, on_invalid=on_invalid, digests=root / DIGESTS)
    folder = root / fingerprint(inputs)[:32]
    if check_folder(folder) is None:
        return Loaded(EncodedData(folder), False, time.time() - t0)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(folder.with_name(folder.name + ".lock")):
        if check_folder(folder) is None:  # another process wrote it while this one waited
            return Loaded(EncodedData(folder), False, time.time() - t0)
        # Holding the lock, this process is the folder's only writer: partial folders beside it are
        # from writers killed without clean-up (SIGKILL, a lost machine), gigabytes at scale.
        for stale in root.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        data = write_encoded(path, template, options, folder, format=format, on_invalid=on_invalid,
                             num_proc=num_proc, inputs=inputs, progress=progress)
    return Loaded(data, True, time.time() - t0)


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock held until the block ends (released by the OS if the process dies)."""
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
