"""experiments/seed_table.py: the mean and spread over noise-seed runs, and the share of a gap each row closes."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "seed_table.py"
spec = importlib.util.spec_from_file_location("seed_table", SCRIPT)
seed_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_table)


def _run(folder: Path, seed: int, values: dict) -> Path:
    folder.mkdir()
    rows = [{"method": m, "sampler": s, "steps": k, "kid_attr": v} for (m, s, k), v in values.items()]
    (folder / "results.json").write_text(json.dumps({"seed": seed, "rows": rows}))
    return folder


def test_gap_closed_by_hand(tmp_path):
    t4, t50, student = ("finetune", "ddim", 4), ("finetune", "ddim", 50), ("codi", "prev", 4)
    runs = [_run(tmp_path / "a", 0, {t4: 4.0, t50: 1.0, student: 2.0}),
            _run(tmp_path / "b", 1000, {t4: 6.0, t50: 1.0, student: 3.0})]
    seeds, table = seed_table.seed_rows(runs, ["kid_attr"])
    assert seeds == [0, 1000] and table[student]["kid_attr"] == [2.0, 3.0]
    closed = seed_table.gap_closed(table, "kid_attr", t4, t50)
    # means: teacher 4 -> 5.0, teacher 50 -> 1.0, student 2.5: (5 - 2.5) / (5 - 1) = 0.625
    assert closed[student] == pytest.approx(0.625) and closed[t4] == 0 and closed[t50] == 1
    text = seed_table.markdown(seeds, table, ["kid_attr"], (t4, t50), ["kid_attr"])
    assert "| codi | prev | 4 | 2.500 (1.000) | 0.62 |" in text
    assert seed_table.parse_row("codi/a/prev+ilvr/4") == ("codi/a", "prev+ilvr", 4)
    with pytest.raises(SystemExit, match="has no kid_attr"):
        seed_table.gap_closed(table, "kid_attr", t4, ("cm", "cm", 4))


def test_nested_metrics_read_each_edit_kind(tmp_path):
    def run(name, seed, psnr):
        folder = tmp_path / name
        folder.mkdir()
        row = {"method": "codi", "sampler": "prev", "steps": 4, "edit_kinds": {"color": {"psnr": psnr, "n": 14}}}
        (folder / "results.json").write_text(json.dumps({"seed": seed, "rows": [row]}))
        return folder

    seeds, table = seed_table.seed_rows([run("a", 0, 21.0), run("b", 1000, 22.0)],
                                        ["edit_kinds.color.psnr", "edit_kinds.remove.psnr"])
    assert table[("codi", "prev", 4)] == {"edit_kinds.color.psnr": [21.0, 22.0], "edit_kinds.remove.psnr": []}
    text = seed_table.markdown(seeds, table, ["edit_kinds.color.psnr", "edit_kinds.remove.psnr"])
    assert "| method | sampler | steps | color.psnr (mean, spread) | remove.psnr (mean, spread) |" in text
    assert "| codi | prev | 4 | 21.50 (1.00) | – |" in text
