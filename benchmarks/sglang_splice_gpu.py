"""Splice cost inside SGLang's own KV pools, as a request sees it in ``match_prefix``.

For each model shape (Llama-3.1-8B: MHA 32 layers x 8 KV heads x 128; DeepSeek-V2-Lite: MLA
27 layers x (512 + 64)) and suffix length (4K, 16K tokens), a session's base sequence is cached
in a real `MHATokenToKVPool`/`MLATokenToKVPool`; the next request deletes a 256-token span near
the start (AMORTIZE), so `LeylineRadixCache.match_prefix` allocates, copies and rotates the
whole suffix with the core kernel and returns it as a hit. Reported per case, from one run:
match_prefix wall time (the TTFT-relevant overhead), match_prefix with the kernel stubbed out
(``bookkeeping_ms``: the plugin's Python/numpy work), the bare `splice_kv` time, a plain
gather/scatter copy of the same bytes (torch), and the splice's effective bandwidth.

Usage: python benchmarks/sglang_splice_gpu.py [--device cuda] [--lengths 4096 16384] [--json out]
Needs sglang 0.5.16 importable (see docs/sglang.md); CUDA for meaningful numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from array import array
from typing import Any

import torch

SHAPES: dict[str, dict[str, int]] = {
    "llama-3.1-8b": {"layers": 32, "heads": 8, "head_dim": 128},
    "deepseek-v2-lite": {"layers": 27, "rank": 512, "rope": 64},
}
EDIT = (64, 320)  # deleted base span [start, end): 256 tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, reps: int) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def _pool(name: str, size: int, device: str) -> Any:
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    s = SHAPES[name]
    if "rank" in s:
        return MLATokenToKVPool(size=size, page_size=1, dtype=torch.bfloat16, kv_lora_rank=s["rank"],
                                qk_rope_head_dim=s["rope"], layer_num=s["layers"], device=device,
                                enable_memory_saver=False)  # fmt: skip
    return MHATokenToKVPool(size=size, page_size=1, dtype=torch.bfloat16, head_num=s["heads"],
                            head_dim=s["head_dim"], layer_num=s["layers"], device=device,
                            enable_memory_saver=False)  # fmt: skip


def _check_splice(
    binding: Any, base_slots: Any, matched: Any, edit: tuple[int, int], n: int
) -> str:
    """The spliced rows in SGLang's pool == the base rows rotated by the core's torch ``rotate``
    (an implementation independent of the Triton kernel); V and non-rotary dims bit-exact."""
    from leyline.server.core.rope import rotate

    src = base_slots[edit[1] : edit[1] + n].to(binding.k[0].device)
    dst = matched[edit[0] : edit[0] + n].to(binding.k[0].device)
    lo = binding.layout.rope_offset
    hi = lo + binding.layout.rope_dim
    worst = 0.0
    for layer in range(len(binding.k)):
        old, new = binding.k[layer][src], binding.k[layer][dst]
        want = rotate(old, edit[0] - edit[1], binding.rope, offset=lo)
        assert torch.equal(new[..., :lo], old[..., :lo]) and torch.equal(
            new[..., hi:], old[..., hi:]
        )
        err = (new[..., lo:hi].float() - want[..., lo:hi].float()).abs()
        # bf16 spacing at |x| is between |x| 2^-8 and |x| 2^-7: count in units of |x| 2^-8
        ulp = want[..., lo:hi].float().abs().clamp_min(1e-2) * 2**-8
        worst = max(worst, float((err / ulp).max()))
        if binding.v is not None:
            assert torch.equal(binding.v[layer][dst], binding.v[layer][src])
    # two roundings apart at most (kernel vs reference each round their fp32 result once)
    assert worst <= 4.0, f"spliced K off by {worst:.2f} x |x|2^-8"
    return f"ok (rotary K within {worst:.2f} x |x|2^-8 of the reference; the rest bit-exact)"


def bench_case(name: str, n: int, device: str, reps: int) -> dict[str, Any]:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.sampling.sampling_params import SamplingParams

    from leyline.directives import Directive
    from leyline.protocol import Payload
    from leyline.server.core.kernels.splice import splice_kv
    from leyline.server.core.rope import RopeSpec
    from leyline.server.sglang.cache import LeylineRadixCache, _namespace
    from leyline.server.sglang.pool import PoolBinding

    size = 2 * n + 1024
    pool = _pool(name, size, device)
    alloc = TokenToKVPoolAllocator(size, torch.bfloat16, device, pool, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=None,
                             token_to_kv_pool_allocator=alloc, page_size=1)  # fmt: skip
    mla = hasattr(pool, "kv_lora_rank")
    dim = SHAPES[name]["rope"] if mla else SHAPES[name]["head_dim"]
    inv = tuple((1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)).tolist())
    binding = PoolBinding.from_pool(pool, RopeSpec(dim, inv, interleaved=mla))
    for t in binding.k + (binding.v or []):
        t.normal_()
    g = torch.Generator().manual_seed(0)
    base = torch.randint(10, 100000, (n + EDIT[1],), generator=g).tolist()
    new = base[: EDIT[0]] + base[EDIT[1] :] + [7] * 64
    out: dict[str, Any] = {"shape": name, "suffix_tokens": n}
    import leyline.server.sglang.pool as pool_mod

    times, bookkeeping = [], []
    for rep in range(2 * reps):
        # first half: the kernel stubbed out, so the time left is the plugin's bookkeeping
        pool_mod.splice_kv = (lambda *_a, **_k: None) if rep < reps else splice_kv
        cache = LeylineRadixCache(params, binding)
        alloc.clear()
        slots = alloc.alloc(len(base))
        ns = _namespace(None)
        cache.insert(InsertParams(key=RadixKey(array("q", base), ns), value=slots))
        cache.sessions.record("s", 1, base, len(base))
        # delete segment 1 of the base (the plugin maps directives to tokens by its own diff)
        payload = Payload("s", 2, 1, (("0" * 16, 1),) * 2, (Directive(1, 2, (1, 1)),))
        sp = SamplingParams(max_new_tokens=1, custom_params=payload.to_custom_params())
        req = Req("r", "", array("q", new), sp)
        key = RadixKey(array("q", new), None, limit=len(new) - 1)
        _sync(device)
        t0 = time.perf_counter()
        res = cache.match_prefix(MatchPrefixParams(key=key, req=req))
        _sync(device)
        (bookkeeping if rep < reps else times).append(time.perf_counter() - t0)
    pool_mod.splice_kv = splice_kv
    spliced = len(res.device_indices) - EDIT[0]
    out["check"] = _check_splice(binding, slots, res.device_indices, EDIT, spliced)
    out["match_tokens"] = len(res.device_indices)
    out["spliced_tokens"] = spliced
    out["match_prefix_ms"] = 1e3 * sorted(times)[len(times) // 2]
    out["bookkeeping_ms"] = 1e3 * sorted(bookkeeping)[len(bookkeeping) // 2]
    alloc.clear()
    src = alloc.alloc(spliced).to(device)
    dst = alloc.alloc(spliced).to(device)
    delta = torch.full((spliced,), -256, dtype=torch.int64, device=device)
    invf = binding.rope.inv_freq_tensor(device)

    def splice() -> None:
        splice_kv(binding.k, binding.v, src, dst, delta, layout=binding.layout, inv_freq=invf,
                  interleaved=binding.rope.interleaved)  # fmt: skip

    def copy() -> None:
        for t in binding.k + (binding.v or []):
            t.index_copy_(0, dst, t.index_select(0, src))

    out["splice_ms"] = 1e3 * _timed(splice, device, reps)
    out["torch_copy_ms"] = 1e3 * _timed(copy, device, reps)
    moved = 2 * spliced * binding.layout.bytes_per_token(2)  # read + write
    out["splice_GBps"] = moved / (out["splice_ms"] / 1e3) / 1e9
    out["copy_GBps"] = moved / (out["torch_copy_ms"] / 1e3) / 1e9
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy"))
    rows = [bench_case(s, n, args.device, args.reps) for s in args.shapes for n in args.lengths]
    for r in rows:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
