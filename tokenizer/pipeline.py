"""The tokenize run: raw event tables -> vocabularies -> words -> shards + manifest.

    plan     resolve inputs, check columns and types                  (fails before any work)
    count    --num-shards jobs only: count users from the id columns   (the shard count)
    read     decode every input once: judge rows, code attributes, count values, spill rows
             into partitions by user hash                               (tokenizer/reader.py)
    vocab    merge the tasks' codes, cut the vocabularies, write vocab/*.arrow
    words    per unit of hash space: sort, dedupe, cut words, write shards (tokenizer/partition.py)
    manifest counts add up; manifest.json written last, atomically

Memory: the reading pass holds one batch per worker; the words pass holds one unit per worker,
and units are sized from ``memory_limit`` (docs/TOKENIZER.md).  Work is resumable: each reading
task and each unit records its result in the work directory when done, and a run started again
with the same arguments skips them.  Output bytes depend only on the input, the schema and
``shard_users`` (and ``memory_limit`` when one shard would not fit in it), never on
``workers``, ``batch_rows`` or ``num_shards``.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.progress import Bar
from tokenizer.coders import GlobalCodes, build_vocab, ids_for_vocab, merge_codes
from tokenizer.diagnosis import capping_warnings, check_kept, resolve_windows
from tokenizer.hashing import hll_estimate
from tokenizer.io import DEFAULT_BATCH_ROWS
from tokenizer.manifest import build_manifest
from tokenizer.memory import release_free_memory
from tokenizer.partition import DuplicateFound, Lookups, Unit, WordsContext, process_unit, user_vocab_counts
from tokenizer.plan import (
    PHASE2_EXTRA,
    PHASE2_FACTOR,
    RESERVED_BYTES,
    USER,
    Plan,
    SegmentPlan,
    fingerprint,
    plan_inputs,
    pow2_at_least,
    pow2_nearest,
    spill_row_bytes,
    unit_budget,
)
from tokenizer.reader import (
    REASONS,
    BadRowError,
    JobRange,
    ReadOptions,
    TaskReader,
    count_users,
    load_result,
    locate_event,
    locate_user_row,
    save_result,
)
from tokenizer.schema import SchemaConfig
from tokenizer.shards import MANIFEST, SHARD_DIR, VOCAB_DIR, atomic_write_json, atomic_write_tables
from tokenizer.units import plan_units
from tokenizer.vocab import Vocab, vocab_file

DEFAULT_MEMORY_LIMIT = 2 << 30
DEFAULT_SHARD_USERS = 100_000
PARTS_DIR = "parts"
_MAX_SHARD_BITS = 20
# Test hook: "tasks:N" or "units:N" exits the process (like a kill -9) once N reading tasks or
# words units are done, to test resuming.
_CRASH_ENV = "USERBERT_TOKENIZE_CRASH"


class _CrashHook:
    def __init__(self, phase: str) -> None:
        kind, _, n = os.environ.get(_CRASH_ENV, "").partition(":")
        self.after = int(n) if kind == phase and n.isdigit() else 0
        self.done = 0
        self.lock = threading.Lock()

    def tick(self) -> None:
        if self.after:
            with self.lock:
                self.done += 1
                if self.done >= self.after:
                    os._exit(137)  # die like a killed process, leaving everything as it is

__all__ = ["tokenize", "DEFAULT_MEMORY_LIMIT", "DEFAULT_SHARD_USERS", "USER", "REASONS"]


@dataclass
class Options:
    shard_users: int
    strict: bool
    workers: int
    memory_limit: int
    num_shards: int
    shard_index: int
    batch_rows: int
    vocab_dir: Path | None

    def output_key(self) -> dict[str, Any]:
        """What the output depends on (for the resume fingerprint)."""
        return {"shard_users": self.shard_users, "strict": self.strict, "memory_limit": self.memory_limit,
                "num_shards": self.num_shards, "shard_index": self.shard_index, "batch_rows": self.batch_rows,
                "vocab_dir": str(self.vocab_dir) if self.vocab_dir else None}


# -- helpers ---------------------------------------------------------------------------------------------------
def _phase2_bytes(plan: Plan, rows_by_source: dict[int, int]) -> int:
    """Words-pass bytes of all events: per source, rows x its widest segment's per-event bytes."""
    total = 0
    string_ids = str(plan.user_type) == "string"
    for si, src in enumerate(plan.sources):
        if src.is_users:
            continue
        k = max(len(plan.segments[s].attrs) for s in src.segments)
        per = spill_row_bytes(k, string_ids) * PHASE2_FACTOR + PHASE2_EXTRA
        total += int(rows_by_source.get(si, 0) * per)
    return total


def _shard_bits(plan: Plan, n_users: float, rows_by_source: dict[int, int], opts: Options) -> int:
    """log2 of the shard count: about shard_users users per shard, and a shard's events must
    fit one unit of the words pass."""
    by_users = pow2_nearest(n_users / opts.shard_users)
    by_memory = pow2_at_least(_phase2_bytes(plan, rows_by_source) / unit_budget(opts.memory_limit))
    bits = max(by_users, by_memory, 1).bit_length() - 1
    return min(bits, _MAX_SHARD_BITS)


def job_shards(shard_bits: int, num_shards: int, index: int) -> tuple[int, int]:
    """The shards [first, stop) of job ``index`` of ``num_shards`` (any num_shards)."""
    s = 1 << shard_bits
    return -(-index * s // num_shards), -(-(index + 1) * s // num_shards)


def _work_dir(out: Path, opts: Options, work_dir: Path | None) -> Path:
    if work_dir is not None:
        return Path(work_dir)
    if opts.num_shards > 1:
        return out / f"_work-{opts.shard_index:05d}-of-{opts.num_shards:05d}"
    return out / "_work"


def _prepare_work(work: Path, fp: str) -> bool:
    """Create the work dir; keep it if it belongs to this exact run (resume), else start afresh."""
    state = work / "state.json"
    if state.is_file():
        try:
            if json.loads(state.read_text()).get("fingerprint") == fp:
                return True
        except (json.JSONDecodeError, OSError):
            pass
        shutil.rmtree(work)
    elif work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "tasks").mkdir()
    (work / "units").mkdir()
    atomic_write_json(state, {"fingerprint": fp}, durable=False)
    return False


def _run_parallel(items: list[Any], fn: Callable[[Any], None], workers: int, cancel: threading.Event) -> None:
    """Run fn over items with up to ``workers`` threads; the first error cancels the rest."""
    if workers <= 1 or len(items) <= 1:
        for it in items:
            fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(fn, it) for it in items}
        done, pending = wait(pending, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                cancel.set()
                for p in pending:
                    p.cancel()
                wait(pending)
                raise f.exception()
        for f in pending:
            f.result()


def _flat_luts(per_task: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Task tables [task][attr] -> (flat int32, bases int64 [T, K])."""
    t = len(per_task)
    k = len(per_task[0]) if t else 0
    bases = np.zeros((t, k), np.int64)
    parts, pos = [], 0
    for i, row in enumerate(per_task):
        for j, lut in enumerate(row):
            bases[i, j] = pos
            parts.append(lut)
            pos += len(lut)
    return (np.concatenate(parts).astype(np.int32) if parts else np.zeros(1, np.int32)), bases


def _flat_ids(ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    bases = np.zeros(len(ids), np.int64)
    pos = 0
    for j, a in enumerate(ids):
        bases[j] = pos
        pos += len(a)
    return (np.concatenate(ids).astype(np.int32) if ids else np.zeros(1, np.int32)), bases


# -- the run ------------------------------------------------------------------------------------------------------
def tokenize(
    schema: SchemaConfig,
    out_dir: str | Path,
    *,
    shard_users: int = DEFAULT_SHARD_USERS,
    strict: bool = False,
    progress: bool = True,
    vocab_dir: str | Path | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    workers: int = 1,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    num_shards: int = 1,
    shard_index: int = 0,
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    task_rows: int | None = None,
    spill: str = "auto",
    partitions: int | None = None,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize the schema's inputs into ``out_dir`` (FORMATS.md §4); returns the manifest.

    - ``vocab_dir`` reuses existing vocabularies (e.g. a pretraining run's, so that fine-tuning
      data gets the same ids) instead of counting; they are copied into ``out_dir/vocab``.
    - ``strict`` turns the first bad row into a ValueError naming the file and row.
    - ``workers`` threads read tasks and process units in parallel; ``memory_limit`` (bytes)
      bounds the words pass (units are sized to fit; see docs/TOKENIZER.md).
    - ``num_shards``/``shard_index``: this run is job ``shard_index`` of ``num_shards``; it
      writes its shards and ``parts/part-<i>-of-<K>.json`` (returned), and
      :func:`tokenizer.merge.merge_parts` writes the manifest once all parts are there.
    - ``work_dir`` (default ``out_dir/_work``) holds spill files and per-task/unit results; it
      is removed at the end unless ``keep_work``.  A run started again resumes from it.
    - ``task_rows`` (rows per reading task) and ``partitions`` (a power of two: spill
      partitions) override how the work is split; they never change the output.
    - ``spill``: "auto" keeps the partitioned events in memory when they are small next to
      the budget and writes them to the work directory otherwise; "disk" or "memory" force it.
    - ``stats``, if given, receives timings and resume counts (for the summary).
    """
    if spill not in ("auto", "disk", "memory"):
        raise ValueError(f"spill must be 'auto', 'disk' or 'memory', got {spill!r}")
    opts = Options(shard_users, strict, workers, memory_limit, num_shards, shard_index, batch_rows,
                   Path(vocab_dir) if vocab_dir is not None else None)
    _check_options(opts)
    stats = stats if stats is not None else {}
    stats.update({"out": str(out_dir), "memory_limit": memory_limit, "seconds": {}})
    t0 = time.perf_counter()
    plan = plan_inputs(schema, task_rows, workers)
    run = _Run(plan, opts, Path(out_dir), progress, stats)
    run.prepare(Path(work_dir) if work_dir else None)
    stats["seconds"]["plan"] = time.perf_counter() - t0
    if num_shards > 1:
        run.timed("count", run.count_users)
    run.timed("read", lambda: run.read(spill, partitions))
    run.timed("vocab", run.vocabularies)
    run.timed("words", run.words)
    manifest = run.finish()
    if not keep_work:
        shutil.rmtree(run.work, ignore_errors=True)
    return manifest


class _Run:
    """One tokenize run, phase by phase (see the module doc); the phases share this state."""

    def __init__(self, plan: Plan, opts: Options, out: Path, progress: bool, stats: dict[str, Any]) -> None:
        self.plan, self.opts, self.out, self.progress, self.stats = plan, opts, out, progress, stats
        self.cancel = threading.Event()
        self.string_ids = str(plan.user_type) == "string"
        self.seeds = _load_seeds(plan, opts.vocab_dir)
        self.job: JobRange | None = None
        self.shard_bits: int | None = None
        self.budget = unit_budget(opts.memory_limit)

    def timed(self, name: str, phase: Callable[[], None]) -> None:
        t = time.perf_counter()
        phase()
        release_free_memory()
        self.stats["seconds"][name] = time.perf_counter() - t

    def prepare(self, work_dir: Path | None) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.opts.num_shards == 1:
            (self.out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not vouch for new shards
        self.work = _work_dir(self.out, self.opts, work_dir)
        self.stats["resumed"] = _prepare_work(self.work, fingerprint(self.plan, self.opts.output_key()))

    # -- count (jobs of --num-shards only) -----------------------------------------------------------------------
    def count_users(self) -> None:
        """Every job needs the single run's shard count before it spills: count users first."""
        self.shard_bits = _job_shard_bits(self.plan, self.opts, self.work, self.progress)
        first, stop = job_shards(self.shard_bits, self.opts.num_shards, self.opts.shard_index)
        self.job = JobRange(self.shard_bits, first, stop)

    # -- read --------------------------------------------------------------------------------------------------------
    def _partition_bits(self, partitions: int | None) -> int:
        state = self.work / "read.json"
        if state.is_file():  # resuming: the spill files on disk fix the partitions
            return json.loads(state.read_text())["partition_bits"]
        if partitions is not None:
            bits = max(0, int(partitions).bit_length() - 1)
        else:
            job_rows = {i: sum(s.est_rows) // self.opts.num_shards for i, s in enumerate(self.plan.sources)}
            # Enough partitions that one holds about a unit's worth of this job's events, and two
            # per worker (given a few million events) so that the words pass has units to run in
            # parallel; more partitions never change the output.
            by_memory = pow2_at_least(_phase2_bytes(self.plan, job_rows) / self.budget)
            w = self.opts.workers
            by_workers = pow2_at_least(min(2 * w, sum(job_rows.values()) / (1 << 20))) if w > 1 else 1
            bits = min(12, max(by_memory, by_workers).bit_length() - 1)
        atomic_write_json(state, {"partition_bits": bits}, durable=False)
        return bits

    def read(self, spill: str, partitions: int | None) -> None:
        plan, opts, work = self.plan, self.opts, self.work
        self.part_bits = self._partition_bits(partitions)
        # Inputs whose spill fits well inside the budget stay in memory (no disk round trip).
        est_spill = sum(sum(src.est_rows) // opts.num_shards * spill_row_bytes(
            max(len(plan.segments[s].attrs) for s in src.segments), self.string_ids)
            for src in plan.sources if not src.is_users)
        in_memory = spill == "memory" or (spill == "auto" and est_spill <= self.budget // 3)
        self.stats["spill_in_memory"] = in_memory
        read_opts = ReadOptions(
            # A batch and its intermediates take ~0.5 KB a row per reader: under a tight limit, smaller batches.
            self.part_bits, self.job, opts.shard_index, opts.strict, self.seeds,
            min(opts.batch_rows, max(16_384, self.budget // (opts.workers * 512))),
            use_threads=opts.workers == 1, cancel=self.cancel,
            pending_bytes=max(4 << 20, min(64 << 20, self.budget // (8 * opts.workers))),
        )
        todo = [t for t in range(len(plan.tasks)) if not (work / "tasks" / f"t{t:05d}.json").is_file()]
        self.stats["resumed_tasks"] = len(plan.tasks) - len(todo)
        bar = Bar("read", sum(sum(s.est_rows) for s in plan.sources), self.progress)
        read_opts.progress = bar.update
        bar.update(sum(p.est_rows for t in range(len(plan.tasks)) if t not in todo for p in plan.tasks[t]))
        held: dict[int, dict[str, Any]] = {}
        crash = _CrashHook("tasks")

        def run_task(t: int) -> None:
            path = None if in_memory else work / "tasks" / f"t{t:05d}.spill"
            result = TaskReader(plan, t, path, read_opts).run(plan.tasks[t])
            if in_memory:
                held[t] = result  # nothing to resume from: a restart reads again
            else:
                save_result(work / "tasks" / f"t{t:05d}.json", result)
            crash.tick()

        try:
            _run_parallel(todo, run_task, opts.workers, self.cancel)
        finally:
            bar.close()
        self.results = [held[t] if t in held else load_result(work / "tasks" / f"t{t:05d}.json")
                        for t in range(len(plan.tasks))]
        self.spills = []
        for t, r in enumerate(self.results):
            if r.get("blocks") is not None:
                self.spills.append((r["blocks"], r["index"]))
                continue
            path = work / "tasks" / f"t{t:05d}.spill"
            if not path.is_file() or path.stat().st_size != r["spill_size"]:
                raise OSError(f"{path}: spill file missing or truncated; delete {work} and run again")
            self.spills.append((path, r["index"]))
        resolve_windows(plan, self.results)
        self.warnings = check_kept(plan, self.results)
        self.stats["spill_bytes"] = sum(r["spill_size"] for r in self.results)
        self.stats["partitions"] = 1 << self.part_bits

    # -- vocab -------------------------------------------------------------------------------------------------------
    def vocabularies(self) -> None:
        plan, results = self.plan, self.results
        if self.shard_bits is None:
            hll = np.max(np.stack([r["hll"] for r in results]), axis=0) if results else np.zeros(1 << 14, np.uint8)
            rows_by_source: dict[int, int] = {}
            for r in results:
                for s, n in r["source_rows"].items():
                    rows_by_source[s] = rows_by_source.get(s, 0) + n
            self.shard_bits = _shard_bits(plan, hll_estimate(hll), rows_by_source, self.opts)
        lookups, self.vocabs, user_globals = _vocabularies(plan, results, self.seeds, self.opts.workers)
        self.ctx = WordsContext(plan, self.out, self.spills, self.shard_bits, lookups, self.string_ids,
                                [u.name for u in plan.schema.user_attributes], self.opts.strict)
        if plan.users is not None:
            self.vocabs[len(plan.segments)] = _user_vocabularies(
                plan, self.ctx, user_globals, self.seeds, self.part_bits, self.work, self.opts.workers, self.cancel
            )
        _write_vocabs(plan, self.out, self.vocabs)

    # -- words -------------------------------------------------------------------------------------------------------
    def words(self) -> None:
        opts, work, ctx = self.opts, self.work, self.ctx
        self.own = job_shards(self.shard_bits, opts.num_shards, opts.shard_index)
        units = plan_units(self.spills, self.part_bits, self.shard_bits, self.own, self.budget,
                           [len(seg.attrs) for seg in self.plan.segments])
        todo = [u for u in units if not (work / "units" / f"u{u.index:05d}.json").is_file()]
        self.stats["resumed_units"] = len(units) - len(todo)
        biggest = max((u.est_bytes for u in units), default=1)
        concurrency = max(1, min(opts.workers, (opts.memory_limit - RESERVED_BYTES) // max(1, biggest)))
        if len(todo) < concurrency and biggest <= self.budget:
            ctx.segment_threads = concurrency
        bar = Bar("words", sum(u.est_bytes for u in units), self.progress and bool(units), unit="B")
        bar.update(sum(u.est_bytes for u in units if u not in todo))
        crash = _CrashHook("units")

        def run_unit(u: Unit) -> None:
            if self.cancel.is_set():
                raise InterruptedError("cancelled")
            try:
                res = process_unit(ctx, u)
            except DuplicateFound as d:
                raise _duplicate_error(self.plan, self.results, d) from None
            atomic_write_json(work / "units" / f"u{u.index:05d}.json", res, durable=False)
            bar.update(u.est_bytes)
            crash.tick()

        try:
            _run_parallel(todo, run_unit, concurrency, self.cancel)
        finally:
            bar.close()
        self.unit_results = [json.loads((work / "units" / f"u{u.index:05d}.json").read_text()) for u in units]

    # -- manifest ----------------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        opts, out = self.opts, self.out
        manifest = build_manifest(self.plan, self.plan.schema, self.results, self.unit_results, self.vocabs,
                                  self.shard_bits, opts.shard_users)
        warnings = self.warnings + capping_warnings(self.plan, manifest["counts"])
        if warnings:
            manifest["warnings"] = warnings
        if opts.num_shards == 1:
            atomic_write_json(out / MANIFEST, manifest)
            keep = {Path(s["file"]).name for s in manifest["shards"]}
            for old in (out / SHARD_DIR).glob("shard-*.arrow"):
                if old.name not in keep:
                    old.unlink()
        else:
            manifest["part"] = {"index": opts.shard_index, "of": opts.num_shards, "shards": list(self.own),
                                "shard_bits": self.shard_bits}
            atomic_write_json(out / PARTS_DIR / part_name(opts.shard_index, opts.num_shards), manifest)
        return manifest


def _duplicate_error(plan: Plan, results: list[dict[str, Any]], d: DuplicateFound) -> BadRowError:
    if d.kind == "user":
        f, row = locate_user_row(plan, plan.tasks, [r["piece_rows"] for r in results], d.value)
        return BadRowError(f"{f}: row {row} (0-based): duplicate user id {d.key!r} in the user table")
    f, row = locate_event(plan, d.segment, d.key, d.value)
    return BadRowError(f"{f}: row {row} (0-based): duplicate event (user {d.key!r}, same time and attribute "
                       f"values as an earlier row) in segment {d.segment!r}")


def part_name(index: int, of: int) -> str:
    return f"part-{index:05d}-of-{of:05d}.json"


def _check_options(opts: Options) -> None:
    if opts.shard_users < 1:
        raise ValueError(f"shard_users must be >= 1, got {opts.shard_users}")
    if opts.workers < 1:
        raise ValueError(f"workers must be >= 1, got {opts.workers}")
    if opts.memory_limit < RESERVED_BYTES + (64 << 20):
        raise ValueError(f"memory_limit must be at least {(RESERVED_BYTES >> 20) + 64} MiB, "
                         f"got {opts.memory_limit >> 20} MiB")
    if opts.num_shards < 1 or not 0 <= opts.shard_index < opts.num_shards:
        raise ValueError(f"need num_shards >= 1 and 0 <= shard_index < num_shards, got "
                         f"{opts.shard_index} of {opts.num_shards}")
    if opts.batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {opts.batch_rows}")


def _job_shard_bits(plan: Plan, opts: Options, work: Path, progress: bool) -> int:
    path = work / "count.json"
    if path.is_file():
        return json.loads(path.read_text())["shard_bits"]
    bar = Bar("count users", sum(sum(s.est_rows) for s in plan.sources), progress)
    try:
        hll, rows = count_users(plan, opts.batch_rows, bar.update)
    finally:
        bar.close()
    bits = _shard_bits(plan, hll_estimate(hll), rows, opts)
    atomic_write_json(path, {"shard_bits": bits}, durable=False)
    return bits


# -- vocabularies ------------------------------------------------------------------------------------------------
def _load_seeds(plan: Plan, vocab_dir: Path | None) -> dict[tuple[int, int], Vocab]:
    if vocab_dir is None:
        return {}
    seeds = {}
    for seg in plan.segments:
        for k, a in enumerate(seg.attrs):
            seeds[(seg.index, k)] = Vocab.load(vocab_file(vocab_dir, seg.name, a.name))
    if plan.users is not None:
        for k, a in enumerate(plan.users.attrs):
            seeds[(len(plan.segments), k)] = Vocab.load(vocab_file(vocab_dir, USER, a.name))
    return seeds


def _vocabularies(
    plan: Plan, results: list[dict[str, Any]], seeds: dict[tuple[int, int], Vocab], workers: int = 1
) -> tuple[dict[int, Lookups], dict[int, list[Vocab]], list[GlobalCodes]]:
    """Merge task codes; vocabularies and lookups of the segments (users: codes only).  Attributes are
    merged in ``workers`` threads (the table lookups and Arrow's sort release the GIL)."""
    lookups: dict[int, Lookups] = {}
    vocabs: dict[int, list[Vocab]] = {}

    def attribute(job: tuple[SegmentPlan, int]) -> tuple[GlobalCodes, Vocab, np.ndarray]:
        seg, k = job
        g = merge_codes(seg.attrs[k], [r["coders"][seg.index][k] for r in results], seeds.get((seg.index, k)))
        if (seg.index, k) in seeds:
            v = seeds[(seg.index, k)]
            return g, v, ids_for_vocab(g, v)
        return (g, *build_vocab(g))

    jobs = [(seg, k) for seg in plan.segments for k in range(len(seg.attrs))]
    with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        done = dict(zip(((seg.index, k) for seg, k in jobs), pool.map(attribute, jobs)))
    for seg in plan.segments:
        gl = [done[(seg.index, k)][0] for k in range(len(seg.attrs))]
        vs = [done[(seg.index, k)][1] for k in range(len(seg.attrs))]
        ids = [done[(seg.index, k)][2] for k in range(len(seg.attrs))]
        vocabs[seg.index] = vs
        task_luts, bases = _flat_luts([[g.task_luts[t] for g in gl] for t in range(len(results))])
        flat_ids, id_bases = _flat_ids(ids)
        lookups[seg.index] = Lookups(task_luts, bases, flat_ids, id_bases)
    user_globals: list[GlobalCodes] = []
    if plan.users is not None:
        stream = len(plan.segments)
        user_globals = [merge_codes(a, [r["coders"][stream][k] for r in results], seeds.get((stream, k)))
                        for k, a in enumerate(plan.users.attrs)]
        task_luts, bases = _flat_luts([[g.task_luts[t] for g in user_globals] for t in range(len(results))])
        # Ids are filled in once the user vocabularies are known (after counting first rows).
        lookups[stream] = Lookups(task_luts, bases, np.zeros(1, np.int32), np.zeros(len(user_globals), np.int64))
    return lookups, vocabs, user_globals


def _user_vocabularies(
    plan: Plan, ctx: WordsContext, globals_: list[GlobalCodes], seeds: dict, part_bits: int, work: Path,
    workers: int, cancel: threading.Event,
) -> list[Vocab]:
    stream = len(plan.segments)
    sizes = [g.size for g in globals_]
    if all((stream, k) in seeds for k in range(len(globals_))):
        vocabs = [seeds[(stream, k)] for k in range(len(globals_))]
        ids = [ids_for_vocab(g, v) for g, v in zip(globals_, vocabs)]
    else:
        path = work / "user_counts.npz"
        if path.is_file():
            with np.load(path) as z:
                totals = [z[f"a{k}"] for k in range(len(globals_))]
        else:
            totals = [np.zeros(s, np.int64) for s in sizes]
            lock = threading.Lock()
            n_parts = 1 << part_bits

            def count(p: int) -> None:
                c = user_vocab_counts(ctx, range(p, p + 1), sizes)
                with lock:
                    for k, arr in enumerate(c):
                        totals[k] += arr

            _run_parallel(list(range(n_parts)), count, workers, cancel)
            tmp = path.with_name("user_counts.tmp.npz")
            np.savez(tmp, **{f"a{k}": a for k, a in enumerate(totals)})
            tmp.replace(path)
        vocabs, ids = [], []
        for k, g in enumerate(globals_):
            if (stream, k) in seeds:
                vocabs.append(seeds[(stream, k)])
                ids.append(ids_for_vocab(g, seeds[(stream, k)]))
                continue
            g.counts = totals[k]
            v, i = build_vocab(g)
            vocabs.append(v)
            ids.append(i)
    flat, bases = _flat_ids(ids)
    ctx.lookups[stream].ids = flat
    ctx.lookups[stream].id_bases = bases
    return vocabs


def _write_vocabs(plan: Plan, out: Path, vocabs: dict[int, list[Vocab]]) -> None:
    items = [(vocab_file(out / VOCAB_DIR, seg.name, a.name), v.table())
             for seg in plan.segments for a, v in zip(seg.attrs, vocabs[seg.index])]
    if plan.users is not None:
        items += [(vocab_file(out / VOCAB_DIR, USER, a.name), v.table())
                  for a, v in zip(plan.users.attrs, vocabs[len(plan.segments)])]
    atomic_write_tables(items)
