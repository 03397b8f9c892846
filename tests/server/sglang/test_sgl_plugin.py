"""Plugin registration through SGLang's real entry-point loader, the backend factory with
SGLang's registry and TreeCacheBuildContext, startup refusals, and the HTTP routes."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from types import SimpleNamespace

import pytest
from _sglang_support import (
    install_vllm_ops_stub,
    mha_stack,
    mla_stack,
    require_sglang,
    set_server_args,
)

require_sglang()

import torch  # noqa: E402
from sglang.srt.layers.rotary_embedding import get_rope  # noqa: E402
from sglang.srt.mem_cache import registry  # noqa: E402

from leyline.protocol import PROTOCOL_VERSION  # noqa: E402
from leyline.server.sglang import plugin  # noqa: E402
from leyline.server.sglang.cache import LeylineRadixCache  # noqa: E402

ENTRY = "leyline = leyline.server.sglang.plugin:register\n"


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    install_vllm_ops_stub()
    monkeypatch.setattr(registry, "_RADIX_CACHE_REGISTRY", {})


def _entry_point_dist(tmp_path, monkeypatch, target: str = ENTRY) -> None:
    """A dist-info declaring the entry point, as `pip install leyline` would once the lead adds
    it to pyproject.toml (here on sys.path so SGLang's real loader discovers it)."""
    d = tmp_path / "leyline_sglang_plugin_test-0.0.0.dist-info"
    d.mkdir()
    (d / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: leyline-sglang-plugin-test\nVersion: 0.0.0\n"
    )
    (d / "entry_points.txt").write_text("[sglang.srt.plugins]\n" + target)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()


def _isolate_hooks(monkeypatch) -> None:
    """load_plugins applies the plugin's hooks: keep SGLang's classes unpatched afterwards."""
    import pkgutil
    from collections import defaultdict

    from sglang.srt.entrypoints import http_server
    from sglang.srt.plugins.hook_registry import HookRegistry

    from leyline.server.sglang.response import HOOK_TARGETS

    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list))
    monkeypatch.setattr(HookRegistry, "_patched", set())
    monkeypatch.setattr(http_server, "launch_server", http_server.launch_server)
    for target, _kind, _hook in HOOK_TARGETS:
        owner, name = target.rsplit(".", 1)
        cls = pkgutil.resolve_name(owner)
        monkeypatch.setattr(cls, name, cls.__dict__[name])


def test_entry_point_registers_backend_through_load_plugins(tmp_path, monkeypatch) -> None:
    import sglang.srt.plugins as plugins
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat

    from leyline.server.sglang.response import with_accounting

    _isolate_hooks(monkeypatch)
    _entry_point_dist(tmp_path, monkeypatch)
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    plugins.load_plugins()
    assert registry.get_radix_cache_factory("leyline") is plugin.leyline_cache_factory
    # the main process also got the response hooks, applied by load_plugins
    assert OpenAIServingChat._build_chat_response.__closure__ is not None
    assert any(
        c.cell_contents is with_accounting
        for c in OpenAIServingChat._build_chat_response.__closure__
    )
    plugin.register()  # idempotent: SGLang runs it in every process
    assert registry.registered_radix_cache_backends() == ["leyline"]


def test_broken_registration_is_loud(monkeypatch, caplog) -> None:
    registry.register_radix_cache_backend("leyline", lambda ctx: None)
    with caplog.at_level(logging.ERROR, logger="leyline.sglang"), pytest.raises(RuntimeError):
        plugin.register()
    assert "registration FAILED" in caplog.text and "another factory" in caplog.text


def test_installed_sglang_is_a_supported_version() -> None:
    import sglang

    from leyline.server.sglang import compat

    assert compat.require() == sglang.__version__ in compat.SUPPORTED_VERSIONS
    # The lifecycle hooks the cache gets are the installed version's.
    hooks = {"checkpoint", "on_release"} if compat.CHECKPOINTS else {"cache_unfinished_req"}
    assert hooks <= set(vars(compat.Lifecycle))
    assert all(getattr(LeylineRadixCache, h) is vars(compat.Lifecycle)[h] for h in hooks)


def test_an_unsupported_sglang_is_refused_at_startup_naming_the_supported_ones(
    monkeypatch, caplog
) -> None:
    from leyline.server.sglang import compat

    with pytest.raises(
        compat.UnsupportedSGLangVersion, match=re.escape("0.5.16 and 0.5.23; sglang 0.5.20")
    ):
        compat.require("0.5.20")
    monkeypatch.setattr(compat, "installed_version", lambda: "0.5.20")
    with (
        caplog.at_level(logging.ERROR, logger="leyline.sglang"),
        pytest.raises(compat.UnsupportedSGLangVersion),
    ):
        plugin.register()
    assert "registration FAILED" in caplog.text and "0.5.20" in caplog.text
    # SGLang swallows the entry point's exception; the backend it registered instead refuses
    # to build the cache with the same message, so the server does not start on it.
    set_server_args()
    mha = mha_stack(size=32, layers=2, heads=2, head_dim=16, v_dim=16)
    ropes = [get_rope(16, 16, 2048, 10000, True, None, torch.float32) for _ in range(2)]
    with pytest.raises(
        compat.UnsupportedSGLangVersion, match=re.escape("supports sglang 0.5.16 and 0.5.23")
    ):
        registry.create_tree_cache(_ctx(mha, _Model(ropes)))


class _Attn(torch.nn.Module):
    def __init__(self, rope) -> None:
        super().__init__()
        self.rotary_emb = rope


class _Model(torch.nn.Module):
    """Holds real SGLang rotary modules where SGLang models keep them (layers[i].self_attn)."""

    def __init__(self, ropes) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module() for _ in ropes])
        for layer, rope in zip(self.layers, ropes, strict=True):
            layer.self_attn = _Attn(rope)


def _ctx(stack, model, **over):
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

    args = set_server_args(radix_cache_backend="leyline")
    fields = dict(
        server_args=args, params=stack.params, is_hybrid_swa=False, is_hybrid_ssm=False,
        enable_hierarchical_cache=False, disable_radix_cache=False,
        effective_chunked_prefill_size=None,
        # stand-in for SGLang's GPU TpModelWorker: only model_runner.model is read
        tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
        model_config=None, tp_size=1, tp_rank=0, tp_group=None,
    )  # fmt: skip
    fields.update(over)
    # 0.5.16 has effective_chunked_prefill_size, 0.5.23 does not: pass what this one takes.
    known = {f.name for f in dataclasses.fields(TreeCacheBuildContext)}
    return TreeCacheBuildContext(**{k: v for k, v in fields.items() if k in known})


def test_create_tree_cache_builds_leyline_for_mha_and_mla() -> None:
    set_server_args()
    plugin.register()
    mha = mha_stack(size=32, layers=2, heads=2, head_dim=16, v_dim=16)
    ropes = [get_rope(16, 16, 2048, 10000, True, None, torch.float32) for _ in range(2)]
    cache = registry.create_tree_cache(_ctx(mha, _Model(ropes)))
    assert type(cache) is LeylineRadixCache
    assert cache.binding.layout.kind == "mha" and cache.binding.rope.rotary_dim == 16
    mla = mla_stack(size=32, layers=2, rank=24, rope=8)
    ropes = [get_rope(8, 8, 2048, 10000, False, None, torch.float32) for _ in range(2)]
    cache = registry.create_tree_cache(_ctx(mla, _Model(ropes)))
    assert cache.binding.layout.kind == "mla" and cache.binding.layout.rope_offset == 24
    assert cache.binding.rope.interleaved


def test_the_factory_reads_the_operator_settings(monkeypatch) -> None:
    """LEYLINE_SGLANG_* settings reach the backend's config (read once, in the scheduler)."""
    set_server_args()
    plugin.register()
    mha = mha_stack(size=32, layers=2, heads=2, head_dim=16, v_dim=16)
    ropes = [get_rope(16, 16, 2048, 10000, True, None, torch.float32) for _ in range(2)]
    default = registry.create_tree_cache(_ctx(mha, _Model(ropes))).leyline_config
    assert default.repair_window is None and default.index_all_requests is False
    monkeypatch.setenv("LEYLINE_SGLANG_REPAIR_WINDOW", "48")
    monkeypatch.setenv("LEYLINE_SGLANG_INDEX_ALL_REQUESTS", "1")
    mha = mha_stack(size=32, layers=2, heads=2, head_dim=16, v_dim=16)
    config = registry.create_tree_cache(_ctx(mha, _Model(ropes))).leyline_config
    assert config.repair_window == 48 and config.index_all_requests is True


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"is_hybrid_swa": True}, "sliding-window"),
        ({"is_hybrid_ssm": True}, "SSM"),
        ({"enable_hierarchical_cache": True}, "HiCache"),
        ({"is_dsa": True}, "DSA"),
        ({"page": 4}, "page size"),
        ({"eagle": True}, "EAGLE"),
        ({"fp8": True}, "fp8"),
        ({"rope": "dynamic"}, "DynamicNTK"),
    ],
)
def test_unsupported_configs_are_refused_at_startup(over, needle) -> None:
    set_server_args()
    plugin.register()
    dtype = torch.float8_e4m3fn if over.pop("fp8", False) else torch.bfloat16
    stack = mha_stack(size=32, layers=2, heads=2, head_dim=16, v_dim=16, dtype=dtype)
    stack.params = dataclasses.replace(
        stack.params, page_size=over.pop("page", 1), is_eagle=over.pop("eagle", False)
    )
    scaling = {"rope_type": "dynamic", "factor": 2.0} if over.pop("rope", None) else None
    ropes = [get_rope(16, 16, 2048, 10000, True, scaling, torch.float32) for _ in range(2)]
    with pytest.raises(plugin.UnsupportedConfig, match=needle):
        registry.create_tree_cache(_ctx(stack, _Model(ropes), **over))


def test_routes_on_sglangs_app() -> None:
    from fastapi.testclient import TestClient
    from sglang.srt.entrypoints import http_server

    from leyline.server.sglang.routes import install_routes

    plugin.register()  # http_server is imported: routes are installed on its app
    assert "sglang.srt.entrypoints.http_server" in sys.modules
    assert install_routes(http_server.app) is False  # already there, not twice
    client = TestClient(http_server.app)
    assert client.get("/v1/leyline/health").json() == {"backend": "leyline", "registered": True}
    assert client.get("/v1/leyline/info").json() == {
        "server": "sglang", "protocol": PROTOCOL_VERSION, "payload": "custom_params.leyline"
    }  # fmt: skip
    opened = client.post("/v1/leyline/sessions/agent-7").json()
    assert opened["id"] == "agent-7" and opened["opened"] is True
    closed = client.delete("/v1/leyline/sessions/agent-7").json()
    assert closed["id"] == "agent-7" and closed["closed"] is True
    bad = client.post("/v1/leyline/sessions/" + "x" * 129)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session"
    # Session state lives in the scheduler processes: no invented answers (docs/sglang.md).
    assert client.get("/v1/leyline/sessions/agent-7").status_code in (404, 405)
    assert client.get("/v1/leyline/stats").status_code == 404
