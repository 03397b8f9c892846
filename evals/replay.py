"""``leyline eval replay``: the message-edit workload replayed under five cache arms.

Arms (what each request sends; the server's global ``--content-reuse`` stays on):

| arm | Leyline payload | directives | ``content_reuse`` |
|---|---|---|---|
| ``exact`` | none (a plain OpenAI request: exact-prefix reuse only, the SGLang/vLLM baseline) | - | - |
| ``content`` | yes | stripped | true (moved content found by chunk hash) |
| ``amortize`` | yes | AMORTIZE | false |
| ``amortize+content`` | yes | AMORTIZE | true |
| ``repair`` | yes | REPAIR (the server's default window) | true |
| ``forget`` | yes | FORGET for every edit | false (exact: the oracle for agreement) |

Every (arm, concurrency) run starts from a clean cache: a fresh in-process engine when the eval
starts its own (the default), or, with ``--endpoint``, a per-run workload salt plus fresh
session ids, so runs on one shared server cannot hit each other's cache. The salt changes every
text of the workload (content-addressed reuse would find a merely shifted copy), keeping the
edit schedule and the sizes; so against an endpoint the arms replay statistically equal but
different texts, and first-token agreement (which needs equal prompts) is not reported.
Sessions are closed at the end of each conversation. Concurrency ``C`` runs ``C`` client threads, each
replaying its share of the conversations (conversation ``i`` goes to thread ``i mod C``) turn
by turn.

Metrics, per run (definitions also in ``summary.md``):

- ``cache_hit``: sum of reused prompt tokens (``usage.prompt_tokens_details.cached_tokens`` =
  exact + spliced + chunk-reused) over the sum of prompt tokens, all requests;
  ``cache_hit_after_edit`` the same over requests 2..T (those that follow an edit).
- ``unchanged_reused``: for requests 2..T, *unchanged* tokens are the prompt tokens that the
  previous request of the conversation also had (moved content counts as unchanged): the
  server's ``prompt_tokens`` minus the new tokens, where new tokens = ``prompt_tokens`` x the
  share of content characters that are new (the appended turn and the edit's inserted text,
  known exactly from the workload). The metric is sum(min(cached, unchanged)) / sum(unchanged).
- ``ttft``: client-side, from sending the streaming request to the first non-empty content
  chunk (or the final chunk if no text came); ``ttft_server`` the engine's own
  ``leyline.ttft_ms`` (queueing included). p50/p99 over all requests and over requests 2..T.
- ``latency``: client-side end-to-end time of the streaming request.
- ``first_token_agreement``: share of requests 2..T whose first generated text piece equals
  the ``forget`` arm's for the same (concurrency, conversation, turn); greedy decoding; local
  engine only (see above).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from leyline.directives import Mode
from leyline.errors import ServerError, TransportError
from leyline.evals.workload import (
    CHARS_PER_TOKEN,
    Conversation,
    Request,
    WorkloadConfig,
    build_workload,
)
from leyline.session import Session

__all__ = [
    "ARMS",
    "ArmSpec",
    "ReplayConfig",
    "ReplayResult",
    "RequestRecord",
    "arm_metrics",
    "default_kv_tokens",
    "merge_results",
    "percentile",
    "run_replay",
]


@dataclass(frozen=True, slots=True)
class ArmSpec:
    """How one arm talks to the server."""

    name: str
    session: bool
    directives: bool
    content_reuse: bool
    mode: Mode = Mode.AMORTIZE  # every edit's mode (FORGET: deletions too)


_SPECS = (
    ArmSpec("exact", session=False, directives=False, content_reuse=False),
    ArmSpec("content", session=True, directives=False, content_reuse=True),
    ArmSpec("amortize", session=True, directives=True, content_reuse=False),
    ArmSpec("amortize+content", session=True, directives=True, content_reuse=True),
    ArmSpec("repair", session=True, directives=True, content_reuse=True, mode=Mode.REPAIR),
    ArmSpec("forget", session=True, directives=True, content_reuse=False, mode=Mode.FORGET),
)
ARMS: tuple[str, ...] = tuple(s.name for s in _SPECS)
_BY_NAME = {s.name: s for s in _SPECS}


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything one ``leyline eval replay`` run needs (the CLI's defaults come from here).

    ``kv_tokens=None`` sizes the local engine's pool from the workload (``default_kv_tokens``).
    """

    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    arms: tuple[str, ...] = ARMS
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    model: str = "smollm2"
    endpoint: str | None = None
    api_key: str = "leyline-eval"
    device: str = "auto"
    dtype: str = "auto"
    kv_tokens: int | None = None
    max_tokens: int = 4
    timeout_s: float = 600.0
    warmup: bool = True
    progress: bool = True
    label: str = ""
    sample_interval_s: float = 0.25

    def __post_init__(self) -> None:
        if self.label and not self.label.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"label must be letters, digits, '-' or '_', got {self.label!r}")
        if self.sample_interval_s <= 0:
            raise ValueError("sample_interval_s must be > 0")
        unknown = [a for a in self.arms if a not in _BY_NAME]
        if unknown or not self.arms:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeat: {self.arms}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.kv_tokens is not None and self.kv_tokens < 64:
            raise ValueError(f"kv_tokens must be >= 64, got {self.kv_tokens}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["api_key"] = "***"
        return out


@dataclass
class RequestRecord:
    """One request as measured (a row of ``results.json``'s ``records``)."""

    arm: str
    concurrency: int
    conversation: int
    turn: int
    edit: str | None
    prompt_tokens: int
    cached_tokens: int
    exact: int
    spliced: int
    chunk_reused: int
    recomputed: int
    new_tokens_est: int
    unchanged_tokens_est: int
    ttft_ms: float
    ttft_server_ms: float | None
    latency_ms: float
    first_text: str
    text: str
    directives_applied: int
    directives_ignored: int
    notes: list[str] = field(default_factory=list)

    @property
    def reused_unchanged(self) -> int:
        return min(self.cached_tokens, self.unchanged_tokens_est)


@dataclass
class ReplayResult:
    """Raw records and per-run metrics of a replay (``report.write_replay_report`` saves it)."""

    config: ReplayConfig
    runs: list[dict[str, Any]]
    records: list[RequestRecord]
    merged_from: list[str] = field(default_factory=list)


def merge_results(result: ReplayResult, previous: Path) -> ReplayResult:
    """``result`` with the runs and records of an earlier ``results.json`` put first.

    For baselines that need their own server (SGLang's default radix cache beside the Leyline
    backend): run each server's arms with its own ``--label``, then merge. Runs must not repeat
    an (arm, concurrency) pair.
    """
    try:
        data = json.loads(previous.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read replay results {previous}: {exc}") from exc
    if data.get("eval") != "replay":
        raise ValueError(f"{previous} is not a replay results.json")
    runs = [*data["runs"], *result.runs]
    pairs = [(run["arm"], run["concurrency"]) for run in runs]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"merging {previous} repeats (arm, C) runs; give each server a --label")
    names = {f.name for f in dataclasses.fields(RequestRecord)}
    earlier = [RequestRecord(**{k: v for k, v in r.items() if k in names}) for r in data["records"]]
    return replace(
        result,
        runs=runs,
        records=[*earlier, *result.records],
        merged_from=[*data.get("merged_from", []), str(previous), *result.merged_from],
    )


def default_kv_tokens(workload: WorkloadConfig, concurrency: int) -> int:
    """A pool that holds every live conversation's last sequence 1.5x over, in server tokens.

    NOTE: the estimate assumes >= 3 characters per server token (SmolLM2/Llama tokenizers on
    this text give ~3-3.5), i.e. 4/3 of the workload's 4-characters-per-token estimate.
    """
    last = (
        (workload.system_tokens + workload.mutation_tokens + workload.turns * workload.turn_tokens)
        * workload.scale
        * CHARS_PER_TOKEN
        / 3
    )
    live = min(concurrency, workload.conversations)
    return max(8192, int(last * (1.5 * live + 1)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation) or None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def arm_metrics(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Aggregate one run's records (see the module docstring for the definitions)."""
    edited = [r for r in records if r.turn > 1]
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    e_prompt = sum(r.prompt_tokens for r in edited)
    e_cached = sum(r.cached_tokens for r in edited)
    unchanged = sum(r.unchanged_tokens_est for r in edited)
    server_ttft = [r.ttft_server_ms for r in records if r.ttft_server_ms is not None]
    return {
        "requests": len(records),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "exact": sum(r.exact for r in records),
        "spliced": sum(r.spliced for r in records),
        "chunk_reused": sum(r.chunk_reused for r in records),
        "recomputed": sum(r.recomputed for r in records),
        "cache_hit": cached / prompt if prompt else None,
        "cache_hit_after_edit": e_cached / e_prompt if e_prompt else None,
        "unchanged_tokens": unchanged,
        "unchanged_reused": sum(r.reused_unchanged for r in edited) / unchanged
        if unchanged
        else None,
        "ttft_p50_ms": percentile([r.ttft_ms for r in records], 50),
        "ttft_p99_ms": percentile([r.ttft_ms for r in records], 99),
        "ttft_edit_p50_ms": percentile([r.ttft_ms for r in edited], 50),
        "ttft_edit_p99_ms": percentile([r.ttft_ms for r in edited], 99),
        "ttft_server_p50_ms": percentile(server_ttft, 50),
        "ttft_server_p99_ms": percentile(server_ttft, 99),
        "latency_p50_ms": percentile([r.latency_ms for r in records], 50),
        "latency_p99_ms": percentile([r.latency_ms for r in records], 99),
        "directives_applied": sum(r.directives_applied for r in records),
        "directives_ignored": sum(r.directives_ignored for r in records),
    }


def _agreement(records: Sequence[RequestRecord]) -> dict[tuple[str, int], float | None]:
    """First-token agreement of every run with the ``forget`` run at the same concurrency."""
    oracle = {
        (r.concurrency, r.conversation, r.turn): r.first_text
        for r in records
        if r.arm.split("@")[0] == "forget"
    }
    out: dict[tuple[str, int], list[bool]] = {}
    for r in records:
        key = (r.concurrency, r.conversation, r.turn)
        if r.turn > 1 and key in oracle:
            out.setdefault((r.arm, r.concurrency), []).append(r.first_text == oracle[key])
    return {k: sum(v) / len(v) for k, v in out.items()}


# ---------------------------------------------------------------------- HTTP
@dataclass
class _Streamed:
    first_text: str
    text: str
    ttft_s: float
    latency_s: float
    usage: dict[str, Any]
    leyline: dict[str, Any] | None


def _stream_chat(http: httpx.Client, body: dict[str, Any]) -> _Streamed:
    """POST a streaming chat completion; time the first content piece and the end."""
    t0 = time.perf_counter()
    first: float | None = None
    first_text = ""
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    leyline: dict[str, Any] | None = None
    try:
        with http.stream("POST", "/chat/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                try:
                    err: Any = resp.json()
                except ValueError:
                    err = resp.text
                raise ServerError.from_body(resp.status_code, err)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise ServerError.from_body(500, obj)
                for choice in obj.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        if first is None:
                            first, first_text = time.perf_counter(), piece
                        pieces.append(piece)
                if obj.get("usage"):
                    usage = obj["usage"]
                if isinstance(obj.get("leyline"), dict):
                    leyline = obj["leyline"]
    except httpx.HTTPError as exc:
        raise TransportError(f"POST {http.base_url}chat/completions failed: {exc}") from exc
    end = time.perf_counter()
    return _Streamed(
        first_text=first_text,
        text="".join(pieces),
        ttft_s=(first if first is not None else end) - t0,
        latency_s=end - t0,
        usage=usage,
        leyline=leyline,
    )


def _record(arm: str, c: int, req: Request, got: _Streamed) -> RequestRecord:
    prompt = int(got.usage.get("prompt_tokens", 0))
    details = got.usage.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0)
    tokens = (got.leyline or {}).get("tokens") or {}
    directives = (got.leyline or {}).get("directives") or []
    new = round(prompt * req.new_fraction)
    ttft_server = (got.leyline or {}).get("ttft_ms")
    return RequestRecord(
        arm=arm,
        concurrency=c,
        conversation=req.conversation,
        turn=req.turn,
        edit=req.edit.kind if req.edit is not None else None,
        prompt_tokens=prompt,
        cached_tokens=cached,
        exact=int(tokens.get("exact", cached)),
        spliced=int(tokens.get("spliced", 0)),
        chunk_reused=int(tokens.get("chunk_reused", 0)),
        recomputed=int(tokens.get("recomputed", prompt - cached)),
        new_tokens_est=new,
        unchanged_tokens_est=prompt - new,
        ttft_ms=got.ttft_s * 1000,
        ttft_server_ms=float(ttft_server) if ttft_server is not None else None,
        latency_ms=got.latency_s * 1000,
        first_text=got.first_text,
        text=got.text,
        directives_applied=sum(1 for d in directives if d.get("status") == "applied"),
        directives_ignored=sum(1 for d in directives if d.get("status") != "applied"),
        notes=list((got.leyline or {}).get("notes") or []),
    )


def _replay_conversations(
    convs: Sequence[Conversation],
    spec: ArmSpec,
    concurrency: int,
    cfg: ReplayConfig,
    base_url: str,
    model: str,
    tick: Any,
    stop: threading.Event,
) -> list[RequestRecord]:
    out: list[RequestRecord] = []
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    with httpx.Client(base_url=base_url, timeout=cfg.timeout_s, headers=headers) as http:
        for conv in convs:
            session = None
            if spec.session:
                session = Session(
                    f"eval-{spec.name.replace('+', '-')}-{uuid.uuid4().hex[:12]}",
                    content_reuse=spec.content_reuse,
                )
            try:
                for req in conv.requests:
                    if stop.is_set():
                        return out
                    messages = req.message_list()
                    body: dict[str, Any] = {
                        "model": model,
                        "messages": messages,
                        "max_tokens": cfg.max_tokens,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    prepared = None
                    if session is not None:
                        forget = req.forget if spec.mode is Mode.FORGET else ()
                        prepared = session.prepare(messages, forget=forget, default_mode=spec.mode)
                        payload = prepared.to_payload()
                        if not spec.directives:
                            payload = replace(payload, directives=())
                        body = payload.attach(body)
                    got = _stream_chat(http, body)
                    if session is not None and prepared is not None:
                        session.commit(prepared)
                    out.append(_record(spec.name, concurrency, req, got))
                    tick()
            finally:
                if session is not None and session.version > 0:
                    # release the session's locks and approximate KV (best effort)
                    with suppress(httpx.HTTPError):
                        http.delete(f"/leyline/sessions/{session.id}")
    return out


def _warm_up(base_url: str, model: str, cfg: ReplayConfig) -> None:
    """Run the code paths once (prefill, splice, decode) on content unrelated to the workload,
    so the first measured request does not pay for lazy initialisation or kernel compiles."""
    lines = [f"warm-up line {i}: {uuid.uuid4().hex}" for i in range(40)]
    session = Session(f"eval-warmup-{uuid.uuid4().hex[:12]}")
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    with httpx.Client(base_url=base_url, timeout=cfg.timeout_s, headers=headers) as http:
        for edited in (lines, lines[:10] + lines[20:]):
            messages = [{"role": "user", "content": "\n".join(edited)}]
            prepared = session.prepare(messages)
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": 2,
                "temperature": 0,
                "stream": True,
                **prepared.extra_body(),
            }
            _stream_chat(http, body)
            session.commit(prepared)
        with suppress(httpx.HTTPError):
            http.delete(f"/leyline/sessions/{session.id}")


_KV_PROBES = ("loads?include=core", "leyline/stats")  # SGLang's, then the embedded engine's


def _kv_occupancy(http: httpx.Client, path: str) -> float | None:
    """The server's KV pool occupancy now (used / capacity) from probe ``path``, or None if the
    server does not answer it.

    SGLang: ``GET /v1/loads?include=core`` (``num_used_tokens / max_total_num_tokens``, summed
    over data-parallel ranks); the embedded engine: ``GET /v1/leyline/stats`` (``kv``).
    """
    try:
        r = http.get(path)
        body = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if isinstance(body, dict) and isinstance(body.get("loads"), list):
        used = sum(int(x.get("num_used_tokens", 0)) for x in body["loads"])
        cap = sum(int(x.get("max_total_num_tokens", 0)) for x in body["loads"])
        return used / cap if cap else None
    if isinstance(body, dict) and isinstance(body.get("kv"), dict):
        kv = body["kv"]
        cap = int(kv.get("capacity_tokens") or 0)
        return int(kv.get("used_tokens") or 0) / cap if cap else None
    return None


@contextmanager
def _kv_sampler(base_url: str, cfg: ReplayConfig) -> Iterator[list[float]]:
    """Sample the KV occupancy every ``cfg.sample_interval_s`` while the block runs (through
    the first probe of ``_KV_PROBES`` the server answers; none: no samples)."""
    samples: list[float] = []
    done = threading.Event()
    headers = {"Authorization": f"Bearer {cfg.api_key}"}

    def loop() -> None:
        with httpx.Client(base_url=base_url + "/", timeout=10, headers=headers) as http:
            path = None
            for probe in _KV_PROBES:
                first = _kv_occupancy(http, probe)
                if first is not None:
                    path = probe
                    samples.append(first)
                    break
            if path is None:
                return  # the server does not report occupancy
            while not done.wait(cfg.sample_interval_s):
                value = _kv_occupancy(http, path)
                if value is not None:
                    samples.append(value)

    thread = threading.Thread(target=loop, name="leyline-kv-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(timeout=15)


def _server_stats(base_url: str, cfg: ReplayConfig) -> Any:
    try:
        r = httpx.get(
            f"{base_url}/leyline/stats",
            timeout=30,
            headers={"Authorization": f"Bearer {cfg.api_key}"},
        )
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


@contextmanager
def _engine(cfg: ReplayConfig) -> Iterator[Any]:
    """One local engine for the whole run (sized for the largest concurrency), or None."""
    if cfg.endpoint is not None:
        yield None
        return
    from leyline.evals._server import local_server

    kv = cfg.kv_tokens or max(default_kv_tokens(cfg.workload, c) for c in cfg.concurrency)
    with local_server(model=cfg.model, device=cfg.device, dtype=cfg.dtype, kv_tokens=kv) as srv:
        yield srv


@contextmanager
def _target(cfg: ReplayConfig, srv: Any) -> Iterator[tuple[str, str]]:
    """(base_url, model) of the local engine with an empty cache, or of the given endpoint."""
    if srv is None:
        yield str(cfg.endpoint).rstrip("/"), cfg.model
        return
    srv.engine.reset_cache()  # every (arm, concurrency) starts cold, like a fresh server
    yield srv.base_url, srv.model


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=True)


def run_replay(cfg: ReplayConfig) -> ReplayResult:
    """Replay the workload for every (arm, concurrency); see the module docstring."""
    runs: list[dict[str, Any]] = []
    records: list[RequestRecord] = []
    with _engine(cfg) as srv:
        for c in cfg.concurrency:
            for arm in cfg.arms:
                spec = _BY_NAME[arm]
                salt = "" if cfg.endpoint is None else f"{arm}-c{c}-{uuid.uuid4().hex[:8]}"
                convs = build_workload(replace(cfg.workload, salt=salt))
                threads = min(c, len(convs))
                shares = [convs[i::threads] for i in range(threads)]
                total = sum(len(conv.requests) for conv in convs)
                with _target(cfg, srv) as (base_url, model):
                    if cfg.warmup:
                        _warm_up(base_url, model, cfg)
                    lock = threading.Lock()
                    stop = threading.Event()
                    started = time.perf_counter()
                    with (
                        _progress(total, f"{arm} C={c}", cfg.progress) as bar,
                        _kv_sampler(base_url, cfg) as kv_samples,
                    ):

                        def tick(bar: Any = bar, lock: threading.Lock = lock) -> None:
                            if bar is not None:
                                with lock:
                                    bar.update(1)

                        with ThreadPoolExecutor(max_workers=threads) as pool:
                            futures = [
                                pool.submit(
                                    _replay_conversations,
                                    share,
                                    spec,
                                    c,
                                    cfg,
                                    base_url,
                                    model,
                                    tick,
                                    stop,
                                )
                                for share in shares
                            ]
                            run_records: list[RequestRecord] = []
                            try:
                                for f in futures:
                                    run_records.extend(f.result())
                            except BaseException:
                                stop.set()
                                raise
                    wall = time.perf_counter() - started
                    stats = _server_stats(base_url, cfg)
                run_records.sort(key=lambda r: (r.conversation, r.turn))
                records.extend(run_records)
                metrics = arm_metrics(run_records)
                metrics["requests_per_s"] = len(run_records) / wall if wall > 0 else None
                metrics["prompt_tokens_per_s"] = metrics["prompt_tokens"] / wall if wall else None
                metrics["kv_occupancy_peak"] = max(kv_samples, default=None)
                metrics["kv_occupancy_mean"] = (
                    sum(kv_samples) / len(kv_samples) if kv_samples else None
                )
                name = f"{arm}@{cfg.label}" if cfg.label else arm
                for r in run_records:
                    r.arm = name
                runs.append(
                    {
                        "arm": name,
                        "concurrency": c,
                        "threads": threads,
                        "salt": salt,
                        "wall_s": wall,
                        "metrics": metrics,
                        "server_stats": stats,
                    }
                )
    agreement = _agreement(records) if cfg.endpoint is None else {}
    for run in runs:
        run["metrics"]["first_token_agreement"] = agreement.get((run["arm"], run["concurrency"]))
    return ReplayResult(config=cfg, runs=runs, records=records)
