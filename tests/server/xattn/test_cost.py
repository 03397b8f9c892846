"""Cost model and predicate: byte counts of the transports' messages, line fits, and the
closed-form predicate against the five-term model it is derived from."""

from __future__ import annotations

import pytest

from leyline.server.core.xattn import AttnSpec
from leyline.server.core.xattn.cost import (
    Coefficients,
    CostModel,
    Decision,
    Line,
    RequestShape,
    fit_line,
)

GQA = AttnSpec.gqa(32, 8, 128)  # Llama-3.1-8B layer
MLA = AttnSpec.mla(16, 512, 64, 128)  # DeepSeek-V2-Lite layer
COEF = Coefficients(
    latency_s=20e-6, bandwidth_Bps=50e9, attn=Line(5e-6, 1e-13),
    merge=Line(3e-6, 2e-12), splice=Line(8e-6, 1.5e-12), gather=Line(2e-6, 4e-13),
    device="made-up",
)  # fmt: skip


def test_fit_line_recovers_a_line_and_clamps_negative_intercepts():
    xs = [1e3, 7e3, 3e4, 1e5]
    line = fit_line(xs, [2e-5 + 3e-9 * x for x in xs])
    assert line.fixed_s == pytest.approx(2e-5) and line.per_unit_s == pytest.approx(3e-9)
    through_zero = fit_line([1.0, 2.0, 3.0], [0.5, 2.2, 3.4])  # would intercept below 0
    assert through_zero.fixed_s == 0 and through_zero.per_unit_s > 0
    with pytest.raises(ValueError):
        fit_line([1.0, 1.0], [1.0, 2.0])


def test_bytes_follow_the_wire_format():
    s = RequestShape(MLA, batch=4, chunk_tokens=128, n_chunks=3, num_layers=27)
    assert s.routed_bytes == 4 * 16 * 576 * 2 and s.meta_bytes == (4 + 6) * 8
    assert s.returned_bytes == 4 * 16 * (512 * 4 + 4) + 4
    assert s.fetched_bytes == 384 * 27 * 576 * 2 + (384 + 3) * 8
    g = RequestShape(GQA, batch=1, chunk_tokens=100, n_chunks=1, num_layers=32)
    assert g.fetched_bytes - (100 + 1) * 8 == 100 * 32 * 8 * (128 + 128) * 2
    assert g.key_bytes == 100 * 32 * 8 * 128 * 2


@pytest.mark.parametrize("spec", [GQA, MLA])
def test_predicate_agrees_with_the_five_term_model(spec):
    model = CostModel(COEF)
    pred = model.predicate(spec)
    for batch in (1, 8, 64):
        for tokens in (64, 512, 4096):
            shape = RequestShape(spec, batch=batch, chunk_tokens=tokens, n_chunks=2, num_layers=8)
            route, fetch = model.route(shape), model.fetch(shape)
            extras = route.probe + 8 * (route.per_layer - route.compute)  # only a route pays it
            assert pred.route_cost(shape, 1) == pytest.approx(extras, rel=0.05)
            assert pred.fetch_cost(shape) == pytest.approx(fetch.round_trip, rel=1e-3)
            assert route.round_trip == pytest.approx(route.probe + route.per_layer * 8)


def test_decisions_and_crossover():
    pred = CostModel(COEF).predicate(MLA)
    small = RequestShape(MLA, batch=1, chunk_tokens=64, n_chunks=1, num_layers=27)
    big = RequestShape(MLA, batch=1, chunk_tokens=8192, n_chunks=4, num_layers=27)
    assert pred.decide(big, uses=1, local=True) is Decision.LOCAL
    assert pred.crossover_uses(big) > pred.crossover_uses(small)
    u = pred.crossover_uses(big)
    assert pred.decide(big, uses=u * 0.9) is Decision.ROUTE
    assert pred.decide(big, uses=u * 1.1) is Decision.FETCH
    wide = RequestShape(MLA, batch=64, chunk_tokens=8192, n_chunks=4, num_layers=27)
    assert pred.crossover_uses(wide) < u  # more query rows per trip: fewer uses pay for a fetch
    with pytest.raises(ValueError):
        RequestShape(MLA, batch=0, chunk_tokens=1, n_chunks=1, num_layers=1)
