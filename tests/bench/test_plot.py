"""bench.plot's data side (the drawing needs matplotlib, which raylens does not depend on)."""
import json

from bench.plot import series


def test_series_groups_successful_results_by_size_and_contender(tmp_path):
    results = [
        {"size": "1b", "contender": "raylens", "max_tiles": 12, "images_per_s": 24.0},
        {"size": "1b", "contender": "raylens", "max_tiles": 1, "images_per_s": 89.6},
        {"size": "1b", "contender": "pipeline", "max_tiles": 1, "images_per_s": 15.0},
        {"size": "2b", "contender": "raylens@tp2", "max_tiles": 12, "error": "timed out"},
    ]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"results": results}))
    assert series([str(path)]) == {("1b", "raylens"): [(1, 89.6), (12, 24.0)], ("1b", "pipeline"): [(1, 15.0)]}
