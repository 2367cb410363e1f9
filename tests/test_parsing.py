import pytest

from myllm.errors import InvalidOptions
from myllm.runtime.placement.memory import parse_memory
from myllm.runtime.request.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("30s", 30), ("1h30m", 5400), ("250ms", 0.25), ("0", 0), (-1, -1), ("-1", -1), ("-5m", -300), (12, 12), (1e300, -1), ("99999h", -1)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "5x", "m5", "", float("nan"), True, "nan", "NaN", "inf", "-inf", float("inf")])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(InvalidOptions, match="keep_alive"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [("6GiB", 6 << 30), ("512MB", 512_000_000), ("1073741824", 1 << 30), ("1.5GiB", 3 << 29), ("50%", 500)],
)
def test_memory_sizes(text: str, size: int) -> None:
    assert parse_memory(text, available=1000) == size


@pytest.mark.parametrize("bad", ["lots", "5 parsecs", "150%", "0%"])
def test_bad_memory_sizes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_memory(bad, available=1000)
