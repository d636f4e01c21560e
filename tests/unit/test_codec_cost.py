"""bench/codec_cost.py times the kserve-v1 codec with orjson and with json alone: it must keep
running, compare like with like (the same bytes both ways), and put everything back."""

from __future__ import annotations

import pytest

from bench import codec_cost
from extproc.codecs import jsondoc, kserve_v1


def test_it_times_both_ways_and_restores_the_codec(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = vars(kserve_v1)["encode"]
    assert codec_cost.main(["--number", "20", "--width", "4", "--batch", "3"]) == 0
    table = capsys.readouterr().out
    assert "| parse |" in table and "| split |" in table and "| all three |" in table
    assert vars(kserve_v1)["encode"] is shipped


def test_json_alone_never_calls_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline really is json's: inside json_only() the codec runs with orjson gone."""

    class NoOrjson:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"orjson.{name} used in the json-only baseline")

    request, answer = codec_cost.shapes(4, 3)
    shipped = codec_cost.outputs(request, answer, 3)
    monkeypatch.setattr(jsondoc, "orjson", NoOrjson())
    with codec_cost.json_only():
        assert codec_cost.outputs(request, answer, 3) == shipped
    with pytest.raises(AssertionError, match="orjson"):
        codec_cost.outputs(request, answer, 3)
