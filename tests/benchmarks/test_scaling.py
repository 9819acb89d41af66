import json
from pathlib import Path

from benchmarks.scaling import merge


def _results(tmp_path: Path, singles: list[dict[str, object]]) -> Path:
    path = tmp_path / "results.json"
    section = {"series": {"alibi": {"points": [1]}, "shatter": {"points": [2]}}}
    path.write_text(json.dumps({"sections": {"scaling": {**section, "single_points": singles}}}))
    return path


def test_merge_replaces_remeasured_series_and_keeps_single_points_not_remeasured(
    tmp_path: Path,
) -> None:
    alibi_64k = {"arch": "alibi", "length": 65536, "median_s": 195.0}
    path = _results(tmp_path, [alibi_64k])
    section = {
        "series": {"shatter": {"points": [3]}},
        "single_points": [],
        "plan": {"threads": 2, "time_cap_s": 60.0},
        "load_average_start": [0.0, 0.0, 0.0],
    }
    merge(path, section)
    scaling = json.loads(path.read_text())["sections"]["scaling"]
    assert scaling["series"] == {"alibi": {"points": [1]}, "shatter": {"points": [3]}}
    assert scaling["single_points"] == [alibi_64k]
    assert scaling["remeasured"][0]["archs"] == ["shatter"]


def test_merge_replaces_a_remeasured_single_point(tmp_path: Path) -> None:
    path = _results(tmp_path, [{"arch": "alibi", "length": 65536, "median_s": 195.0}])
    fresh = {"arch": "alibi", "length": 65536, "median_s": 150.0}
    section = {
        "series": {},
        "single_points": [fresh],
        "plan": {"threads": 2, "time_cap_s": 60.0},
        "load_average_start": [0.0, 0.0, 0.0],
    }
    merge(path, section)
    assert json.loads(path.read_text())["sections"]["scaling"]["single_points"] == [fresh]
