"""Token CDC, content index and planner on CPU: latency at prompt scale, and shift invariance.

Run (numpy + xxhash only; the package need not be installed)::

    python benchmarks/chunking_cpu.py [--tokens 32768] [--repeats 200] [--json PATH]

Timed per call (random token ids from a 151,936-token vocabulary; best and median of
``--repeats`` runs; the best is the number to compare, the median shows machine noise):

- ``cdc_boundaries``: the Gear hash and the min/max cut pass;
- ``boundaries + keys``: what ``build_plan`` computes for a request (cuts, then xxh64 per chunk);
- ``chunk_spans``: the same as a list of ``Chunk`` tuples; ``fixed`` the 128-token fallback;
- ``index.add_sequence``: indexing a served sequence (chunks + entries + slot reverse map),
  into an empty index ("fresh") and again after the session grew by a 256-token turn;
- ``build_plan``: one AMORTIZE deletion near the front plus chunk reuse of content moved in
  from another sequence, with a populated index.

Shift invariance: a random run is embedded after prefixes of several lengths; reported is the
fraction of its interior chunks (chunked alone) found with the same key inside the embedding.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _source_tree import import_core

chunking, index_mod, planner = (
    import_core(f"leyline.server.core.{m}") for m in ("chunking", "index", "planner")
)
VOCAB = 151_936


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall time of ``fn`` in microseconds (garbage collector off, as timeit)."""
    fn()
    samples = []
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        gc.enable()
    return min(samples), statistics.median(samples)


def shift_recovery(rng: np.random.Generator, n: int = 8192) -> dict[int, float]:
    content = rng.integers(0, VOCAB, n)
    alone = {c.key for c in chunking.chunk_spans(content)[1:-1]}
    out = {}
    for prefix_len in (0, 1, 7, 31, 100, 1000, 4321):
        seq = np.concatenate(
            [rng.integers(0, VOCAB, prefix_len), content, rng.integers(0, VOCAB, 99)]
        )
        inside = {
            c.key
            for c in chunking.chunk_spans(seq)
            if prefix_len <= c.start and c.end <= prefix_len + n
        }
        out[prefix_len] = len(alone & inside) / len(alone)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n, reps = args.tokens, args.repeats
    rng = np.random.default_rng(0)
    ids64 = rng.integers(0, VOCAB, n)
    ids = ids64.astype("<u4")

    def keys() -> object:
        return chunking.chunk_keys(ids, chunking.cdc_boundaries(ids))

    # A served sequence B and a request that deletes 500 tokens of B near the front and
    # pastes 4K tokens moved from another indexed sequence D before a 256-token new turn.
    base = planner.CachedSequence(ids64, np.arange(1, n + 1))
    donor = rng.integers(0, VOCAB, n // 2)
    idx = index_mod.ContentIndex()
    idx.add_sequence(base.tokens, base.slots)
    idx.add_sequence(donor, np.arange(n + 1, n + 1 + donor.shape[0]))
    d = planner.TokenDirective(1000, 1500, [], planner.Mode.AMORTIZE)
    moved = donor[5000 : 5000 + 4096]
    request = np.concatenate([ids64[:1000], ids64[1500:], moved, rng.integers(0, VOCAB, 256)])

    def plan() -> object:
        return planner.build_plan(
            request,
            exact_len=1000,
            exact_slots=base.slots[:1000],
            base=base,
            directives=[d],
            index=idx,
        )

    def index_build() -> object:
        return index_mod.ContentIndex().add_sequence(base.tokens, base.slots)

    grown = np.concatenate([base.tokens, rng.integers(0, VOCAB, 256)])
    grown_slots = np.arange(1, grown.shape[0] + 1)

    def index_next_turn() -> object:  # the same session indexed again after a 256-token turn
        return idx.add_sequence(grown, grown_slots)

    cases: dict[str, Callable[[], object]] = {
        "cdc_boundaries": lambda: chunking.cdc_boundaries(ids),
        "boundaries + keys": keys,
        "boundaries + keys (int64 in)": lambda: chunking.chunk_keys(
            ids64, chunking.cdc_boundaries(ids64)
        ),
        "chunk_spans": lambda: chunking.chunk_spans(ids),
        "chunk_spans fixed": lambda: chunking.chunk_spans(ids, mode="fixed"),
        "index.add_sequence (fresh)": index_build,
        "index.add_sequence (next turn)": index_next_turn,
        "build_plan (edit + moved 4K)": plan,
    }
    results: dict[str, object] = {"tokens": n, "repeats": reps, "timings_us": {}}
    print(f"{n} tokens, {reps} repeats (microseconds)")
    print(f"{'case':32s} {'best':>9s} {'median':>9s}")
    for name, fn in cases.items():
        best, med = _time(fn, reps if not name.startswith("index") else max(reps // 10, 5))
        results["timings_us"][name] = {"best": round(best, 1), "median": round(med, 1)}  # type: ignore[index]
        print(f"{name:32s} {best:9.1f} {med:9.1f}")

    p = plan()
    assert isinstance(p, planner.Plan)
    sizes = np.diff(np.concatenate(([0], chunking.cdc_boundaries(ids))))
    print(
        f"chunks: {sizes.size}, mean {sizes.mean():.1f}, median {np.median(sizes):.0f}, "
        f"min {sizes.min()}, max {sizes.max()}"
    )
    print(
        f"plan: exact {p.exact_tokens}, spliced {p.spliced_tokens}, chunk {p.chunk_tokens} "
        f"(of 4096 moved), recomputed {p.recomputed_tokens}, runs {len(p.runs)}"
    )
    rec = shift_recovery(np.random.default_rng(1))
    print("shift invariance (prefix length: interior chunks recovered):")
    print("  " + ", ".join(f"{k}: {v:.3f}" for k, v in rec.items()))
    results.update(
        chunks=int(sizes.size),
        mean_chunk=float(sizes.mean()),
        plan={
            "exact": p.exact_tokens,
            "spliced": p.spliced_tokens,
            "chunk": p.chunk_tokens,
            "recomputed": p.recomputed_tokens,
        },
        shift_recovery=rec,
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
