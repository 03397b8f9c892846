import pytest

from leyline import Directive, DirectiveError, Mode, validate_directives
from leyline.directives import directives_from_wire


def test_wire_round_trip() -> None:
    d = Directive(2, 4, (2, 3), Mode.FORGET)
    assert Directive.from_wire(d.to_wire()) == d


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"start": 0, "end": 1, "replacement": [0, 0], "mode": "squash"}, "unknown mode"),
        ({"start": 0, "replacement": [0, 0]}, "missing field 'end'"),
        ({"start": "0", "end": 1, "replacement": [0, 0]}, "integers"),
        ({"start": 0, "end": 1, "replacement": [0]}, "pair"),
        ({"start": 0, "end": 1, "replacement": [0, 0], "extra": 1}, "unknown fields"),
    ],
)
def test_from_wire_errors(obj: dict, match: str) -> None:
    with pytest.raises(DirectiveError, match=match):
        directives_from_wire([obj])


@pytest.mark.parametrize(
    ("directives", "match"),
    [
        ([Directive(3, 2, (0, 0))], "reversed"),
        ([Directive(1, 1, (1, 1))], "does nothing"),
        ([Directive(1, 9, (1, 1))], "beyond the previous version"),
        ([Directive(1, 2, (1, 9))], "beyond the new version"),
        ([Directive(1, 3, (1, 1)), Directive(2, 4, (1, 1))], "overlaps"),
        ([Directive(1, 2, (1, 3)), Directive(3, 4, (2, 4))], "replacement overlaps"),
    ],
)
def test_validation_errors(directives: list[Directive], match: str) -> None:
    with pytest.raises(DirectiveError, match=match):
        validate_directives(directives, base_len=5, new_len=5)


def test_validation_sorts_and_names_index() -> None:
    ds = [Directive(3, 4, (3, 3)), Directive(0, 1, (0, 1))]
    assert validate_directives(ds, base_len=5, new_len=5)[0].start == 0
    with pytest.raises(DirectiveError, match="directive 1"):
        validate_directives(
            [Directive(0, 1, (0, 0)), Directive(0, 7, (0, 0))], base_len=5, new_len=5
        )
