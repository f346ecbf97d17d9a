"""The demo's planted-rank part: the teacher holds updates of exactly the planted ranks, the
run writes what it learned (file, plots, table) and refuses to overwrite."""

import json

import pytest
import torch

from lora2_engine.demo import PlantedTask, run_planted, spearman
from lora2_engine.formats import read_lora


def test_the_teacher_holds_exactly_the_planted_ranks():
    task = PlantedTask(seed=1)
    assert len(task.names) == 32 and sum(k > 0 for k in task.planted) == 14
    for name, k in zip(task.names, task.planted):
        delta = (task.teacher.get_submodule(name).weight
                 - task.unet.get_submodule(name).weight).double()
        got = int(torch.linalg.matrix_rank(delta, rtol=1e-5)) if k else int(delta.abs().max() > 0)
        assert got == k, (name, k, got)
        if k == 0 and name.endswith(("to_q", "to_k")):
            assert torch.equal(delta, torch.zeros_like(delta))


def test_a_short_planted_run_writes_its_files(tmp_path):
    run = run_planted(tmp_path, "p", steps=2)
    table = json.loads((tmp_path / "p.json").read_text())
    lora = read_lora(tmp_path / "p.safetensors")
    record = lora.lora2_modules()
    assert [c["name"] for c in table["components"]] == run.names
    assert [c["learned"] for c in table["components"]] == [record[n]["rank"] for n in run.names]
    assert json.loads(lora.metadata["lora2.planted_ranks"]) == dict(zip(run.names, run.planted))
    assert table["spearman"] == pytest.approx(spearman(run.planted, run.learned))
    for suffix in (".ranks.png", ".rank_map.png"):
        assert (tmp_path / f"p{suffix}").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="p.safetensors already exists"):
        run_planted(tmp_path, "p", steps=1)


@pytest.mark.parametrize("a,b,want", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0), ([1, 2, 3], [3, 2, 1], -1.0),
    ([0, 0, 1, 1], [5, 5, 6, 6], 1.0), ([1, 2, 3], [7, 7, 7], 0.0)])
def test_spearman(a, b, want):
    scipy = pytest.importorskip("scipy.stats")
    assert spearman(a, b) == pytest.approx(want)
    if len(set(b)) > 1:
        assert spearman(a, b) == pytest.approx(scipy.spearmanr(a, b).statistic)
