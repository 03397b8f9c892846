"""Calibrate the cross-instance cost model on this machine; predicted vs measured round trips.

Run (CPU, gloo over loopback; the package need not be installed)::

    python benchmarks/xattn_calibrate.py --out evals/results/<folder>          # ~2-4 min

    # one CUDA machine with 2+ GPUs: NCCL between cuda:0 and cuda:1, full layer counts
    python benchmarks/xattn_calibrate.py --backend nccl --layers 0 --out "$OUT"

Two ranks (:mod:`leyline.server.core.xattn.launch`): rank 1 holds chunks, rank 0 requests.

1. Coefficients (:class:`~leyline.server.core.xattn.cost.Coefficients`), per model kind:
   link bandwidth from ping-pong of 1 .. 32 MB messages (one way = RTT / 2, least squares),
   latency from an 8 B ping-pong whose echoing rank is busy for 1 ms first (subtracted), as a
   holder is while it computes; partial attention, merge and splice (the fetch's fp32 rotation) each timed over
   several sizes and fitted as ``fixed + per_unit * units``.
2. Round trips per request shape (model kind x batch x chunk tokens x chunks): ``route`` =
   every layer's query sent, holder's partial attention + merge, ``(o, lse)`` back, merged
   with a local partial (the step's route opened once); ``fetch`` = all layers' KV of the chunks received and rotated.
   Minimum (and median) of ``--reps`` runs after one warm-up; the model predicts uncontended
   costs and is compared with the minimum (on a shared CPU the median carries scheduler waits).
3. The predicate's two coefficients (seconds per routed byte, per fetched byte) and, per
   shape, the crossover: route while a chunk is used fewer than ``u*`` more times.

Shapes: GQA = Llama-3.1-8B layer (32 q heads, 8 KV heads, head_dim 128, 32 layers), MLA =
DeepSeek-V2-Lite layer (16 heads, kv_lora_rank 512 + rope 64, qk_nope 128, 27 layers). On CPU
``--layers 4`` (default) shrinks the depth, and chunks stay small: numbers measure this
machine's gloo loopback and CPU attention, not a GPU. Prints a table and writes
``xattn_calibration.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from _source_tree import import_core

partial = import_core("leyline.server.core.xattn.partial")
merge_mod = import_core("leyline.server.core.xattn.merge")
transport = import_core("leyline.server.core.xattn.transport")
cost = import_core("leyline.server.core.xattn.cost")
launch = import_core("leyline.server.core.xattn.launch")
RopeSpec = sys.modules["leyline.server.core.rope"].RopeSpec
rotate = sys.modules["leyline.server.core.rope"].rotate

KINDS = {
    "gqa-llama8b": (partial.AttnSpec.gqa(32, 8, 128), 32, False, 500000.0),
    "mla-dsv2lite": (partial.AttnSpec.mla(16, 512, 64, 128), 27, True, 10000.0),
}
PING_BYTES = (8, 4096, 65536, 1 << 20, 8 << 20, 32 << 20)


def _rope(spec, interleaved: bool, base: float):
    rd = spec.rope_dim
    return RopeSpec(rd, tuple(base ** -(i / rd) for i in range(0, rd, 2)), interleaved)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> tuple[float, float]:
    """(min, median) seconds of ``reps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def _ping(rank: int, device: torch.device, reps: int, busy_s: float = 0.0) -> list:
    """One-way seconds per message size from ping-pong; with ``busy_s`` the echoing rank works
    that long before answering (subtracted), so the waiting rank has gone to sleep as it does
    while a holder computes."""
    out = []
    for nbytes in PING_BYTES if not busy_s else PING_BYTES[:1]:
        x = torch.ones(nbytes, dtype=torch.uint8, device=device)
        if rank == 1:
            for _ in range(reps + 1):
                dist.recv(x, 0)
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < busy_s:
                    pass
                dist.send(x, 0)
            continue

        def trip(x=x):
            dist.send(x, 1)
            dist.recv(x, 1)

        out.append((nbytes, (_time(trip, device, reps)[0] - busy_s) / 2))
    return out


def _kernels(spec, rope, layers: int, dtype, device, reps: int, gen) -> dict:
    """Fit attention, merge and splice lines on this rank's device."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    attn, merge, splice, gather = [], [], [], []
    for batch, tokens in ((1, 64), (4, 256), (8, 512), (16, 1024)):
        q, k = rnd(batch, spec.q_heads, spec.qk_dim), rnd(tokens, spec.kv_heads, spec.qk_dim)
        v = rnd(tokens, spec.kv_heads, spec.v_dim) if spec.kind == "gqa" else None
        units = batch * spec.q_heads * tokens * (spec.qk_dim + spec.v_dim)
        run = functools.partial(partial.partial_attention, q, k, v, spec)
        attn.append((units, _time(run, device, reps)[0]))
        for parts in (2, 4):
            ps = [partial.Partial(rnd(batch, spec.q_heads, spec.v_dim).float(),
                                  rnd(batch, spec.q_heads).float()) for _ in range(parts)]  # fmt: skip
            units = parts * batch * spec.q_heads * spec.v_dim
            run = functools.partial(merge_mod.merge_partials, ps)
            merge.append((units, _time(run, device, reps)[0]))
        keys = rnd(layers, tokens, spec.kv_heads, spec.qk_dim)
        shift = torch.full((1, tokens, 1), 37, dtype=torch.int64, device=device)
        nbytes = keys.numel() * keys.element_size()
        run = functools.partial(rotate, keys, shift, rope, offset=spec.rope_offset)
        splice.append((nbytes, _time(run, device, reps)[0]))
        # the holder's gather of a fetch: chunks' K (and V) concatenated along the token axis
        kv = [keys[:, : tokens // 2], keys[:, tokens // 2 :]]
        if spec.kind == "gqa":
            kv += [rnd(layers, tokens // 2, spec.kv_heads, spec.v_dim)] * 2
        nbytes = sum(x.numel() * x.element_size() for x in kv)

        def cat(kv=kv):
            return [torch.cat(kv[i : i + 2], dim=1) for i in range(0, len(kv), 2)]

        gather.append((nbytes, _time(cat, device, reps)[0]))

    def fit(points):
        return cost.fit_line([u for u, _ in points], [s for _, s in points])

    return {"attn": fit(attn), "merge": fit(merge), "splice": fit(splice), "gather": fit(gather),
            "points": {"attn": attn, "merge": merge, "splice": splice, "gather": gather}}  # fmt: skip


def _shapes(spec, layers: int, args) -> list:
    return [
        cost.RequestShape(
            spec,
            batch=b,
            chunk_tokens=c,
            n_chunks=n,
            num_layers=layers,
            itemsize=args.itemsize,
            result_itemsize=4,
        )
        for b in args.batch
        for c in args.chunk
        for n in args.chunks
    ]


def _chunks(spec, layers: int, args, dtype, device, gen) -> dict:
    """Chunk id -> Chunk for every (chunk size, index) the shapes use; same on both ranks."""
    out = {}
    for c in args.chunk:
        for i in range(max(args.chunks)):
            k = torch.randn(layers, c, spec.kv_heads, spec.qk_dim, generator=gen)
            v = torch.randn(layers, c, spec.kv_heads, spec.v_dim, generator=gen)
            out[c * 1000 + i] = transport.Chunk(
                k.to(device=device, dtype=dtype),
                v.to(device=device, dtype=dtype) if spec.kind == "gqa" else None,
                torch.arange(i * c, (i + 1) * c, device=device),
            )
    return out


def _worker(rank: int, args, out_path: str) -> None:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    dtype = {2: torch.bfloat16, 4: torch.float32}[args.itemsize]
    link = _ping(rank, device, args.reps * 4)
    wake = _ping(rank, device, args.reps * 4, busy_s=1e-3)
    report = {"kinds": {}}
    if rank == 0:
        # NOTE: latency from the smallest message, bandwidth from the slope over >= 1 MB: one
        # least-squares line over 8 B .. 32 MB is all bandwidth and clamps the latency to 0.
        big = [(b, t) for b, t in link if b >= 1 << 20]
        slope = cost.fit_line([b for b, _ in big], [t for _, t in big]).per_unit_s
        # NOTE: every round trip of a transport waits while the other rank computes, so the
        # latency is taken with a busy responder (`wake`). On the loaded 2-core CPU host this
        # still gave ~40 us, while a responder running torch kernels for 0.5 ms made the trip
        # ~2.8 ms: a per-trip cost the model does not capture there (evals/results README).
        report["link"] = {"points": link, "hot_latency_s": link[0][1], "latency_s": wake[0][1],
                          "bandwidth_Bps": 1 / slope}  # fmt: skip
    for name, (spec, full_layers, interleaved, base) in KINDS.items():
        layers = args.layers or full_layers
        rope = _rope(spec, interleaved, base)
        chunks = _chunks(spec, layers, args, dtype, device, torch.Generator().manual_seed(5))
        if rank == 1:
            transport.Holder(spec, rope, chunks, device=device).serve(peer=0)
            continue
        k = _kernels(spec, rope, layers, dtype, device, args.reps, torch.Generator().manual_seed(6))
        coef = cost.Coefficients(report["link"]["latency_s"], report["link"]["bandwidth_Bps"],
                                 k["attn"], k["merge"], k["splice"], k["gather"],
                                 device=args.device_name)  # fmt: skip
        model = cost.CostModel(coef)
        pred = model.predicate(spec)
        req = transport.Requester(spec, rope, device=device, dtype=dtype, num_layers=layers)
        gen = torch.Generator().manual_seed(7)
        rows = []
        for shape in _shapes(spec, layers, args):
            ids = [shape.chunk_tokens * 1000 + i for i in range(shape.n_chunks)]
            deltas = [1000 + 17 * i for i in range(shape.n_chunks)]
            q = torch.randn(shape.batch, spec.q_heads, spec.qk_dim, generator=gen)
            q = q.to(device=device, dtype=dtype)
            q_pos = torch.full((shape.batch,), 1 << 20, dtype=torch.int64, device=device)
            local = partial.Partial(torch.randn(shape.batch, spec.q_heads, spec.v_dim).to(device),
                                    torch.randn(shape.batch, spec.q_heads).to(device))  # fmt: skip

            def route(
                q=q, q_pos=q_pos, ids=ids, deltas=deltas, local=local, req=req, layers=layers
            ):
                step = req.open_route(1, q_pos, ids, deltas)
                for _ in range(layers):
                    merge_mod.merge_partials([local, step.layer(q)])

            def fetch(ids=ids, deltas=deltas, req=req):
                req.fetch(1, ids, deltas)

            (r_meas, r_med), (f_meas, f_med) = (
                _time(route, device, args.reps),
                _time(fetch, device, args.reps),
            )
            r_terms, f_terms = model.route(shape), model.fetch(shape)
            rows.append({
                "batch": shape.batch, "chunk_tokens": shape.chunk_tokens,
                "n_chunks": shape.n_chunks, "layers": layers,
                "routed_bytes_per_layer": shape.routed_bytes + shape.returned_bytes,
                "fetched_bytes": shape.fetched_bytes,
                "route_measured_s": r_meas, "route_median_s": r_med,
                "route_predicted_s": r_terms.round_trip,
                "route_terms_s": {"probe (per step)": r_terms.probe, "transfer": r_terms.transfer,
                                            "compute": r_terms.compute, "return": r_terms.ret,
                                            "merge": r_terms.merge},
                "fetch_measured_s": f_meas, "fetch_median_s": f_med,
                "fetch_predicted_s": f_terms.round_trip,
                "fetch_terms_s": {"probe": f_terms.probe, "gather": f_terms.gather,
                                  "transfer": f_terms.transfer, "splice": f_terms.splice},
                "crossover_uses": pred.crossover_uses(shape),
                "decision_at_1_use": pred.decide(shape, 1).value,
            })  # fmt: skip
        req.stop(1)
        report["kinds"][name] = {
            "spec": {f: getattr(spec, f) for f in spec.__dataclass_fields__},
            "layers": layers, "full_layers": full_layers,
            "coefficients": {"attn": vars_(k["attn"]), "merge": vars_(k["merge"]),
                             "splice": vars_(k["splice"]), "gather": vars_(k["gather"])},
            "kernel_points": k["points"],
            "predicate": vars_(pred), "rows": rows,
        }  # fmt: skip
    if rank == 0:
        Path(out_path).write_text(json.dumps(report, indent=1))


def vars_(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}ms"


def _table(report: dict) -> str:
    head = (f"{'kind':13} {'batch':>5} {'chunk':>5} {'n':>2}  {'route min':>9} {'median':>8} "
            f"{'pred':>8} {'err':>5}  {'fetch min':>9} {'median':>8} {'pred':>8} {'err':>5}  "
            f"{'u*':>7}  at 1 use")  # fmt: skip
    lines = [head]
    errs = []
    for name, kind in report["kinds"].items():
        for r in kind["rows"]:
            e_r = r["route_predicted_s"] / r["route_measured_s"] - 1
            e_f = r["fetch_predicted_s"] / r["fetch_measured_s"] - 1
            errs += [abs(e_r), abs(e_f)]
            lines.append(
                f"{name:13} {r['batch']:5d} {r['chunk_tokens']:5d} {r['n_chunks']:2d}  "
                f"{ms(r['route_measured_s']):>9} {ms(r['route_median_s']):>8} "
                f"{ms(r['route_predicted_s']):>8} {e_r:+5.0%}  {ms(r['fetch_measured_s']):>9} "
                f"{ms(r['fetch_median_s']):>8} {ms(r['fetch_predicted_s']):>8} {e_f:+5.0%}  "
                f"{r['crossover_uses']:7.2f}  {r['decision_at_1_use']}"
            )
    lines.append(f"model vs min round trip: median |error| {statistics.median(errs):.1%}, "
                 f"max {max(errs):.1%} over {len(errs)} round trips")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--layers", type=int, default=4, help="layers per model (0: the model's own)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--chunk", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--itemsize", type=int, choices=(2, 4), default=2, help="2: bf16 KV, 4: fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.backend == "nccl":
        if torch.cuda.device_count() < 2:
            sys.exit("--backend nccl needs 2 CUDA devices (one per rank)")
        args.device_name = f"2x {torch.cuda.get_device_name(0)}, NCCL"
    else:
        args.device_name = f"CPU ({platform.processor() or platform.machine()}), gloo loopback"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "xattn_calibration.json"
    t0 = time.time()
    launch.run_pair(_worker, (args, str(path)), backend=args.backend, timeout_s=args.timeout,
                    threads=args.threads)  # fmt: skip
    report = json.loads(path.read_text())
    report["meta"] = {
        "device": args.device_name, "backend": args.backend, "torch": torch.__version__,
        "threads_per_rank": args.threads, "reps": args.reps, "itemsize": args.itemsize,
        "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1),
        "command": " ".join(sys.argv),
    }  # fmt: skip
    path.write_text(json.dumps(report, indent=1))
    link = report["link"]
    print(f"{args.device_name}: latency {link['latency_s'] * 1e6:.1f} us, "
          f"bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s")  # fmt: skip
    for name, kind in report["kinds"].items():
        p = kind["predicate"]
        print(f"{name}: b_r {p['route_s_per_byte'] * 1e9:.3f} ns/B (+{p['route_fixed_s'] * 1e6:.0f}"
              f" us/trip), b_f {p['fetch_s_per_byte'] * 1e9:.3f} ns/B "
              f"(+{p['fetch_fixed_s'] * 1e6:.0f} us)")  # fmt: skip
    print(_table(report))
    (args.out / "xattn_calibration.txt").write_text(_table(report) + "\n")


if __name__ == "__main__":
    main()
