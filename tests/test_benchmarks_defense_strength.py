"""The defense benchmark's bookkeeping, with the zoo and defend() stubbed out: a network
under the zoo's floor is skipped and named, and the JSON holds every row measured."""

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import defense_strength  # noqa: E402
import zoo  # noqa: E402


class _Net:
    architecture, attack, clean_accuracy, attack_success_rate = "convnet", "clean", 0.99, None


def _row(net, *, small, with_trigger, methods=None):
    return {"network": net.name, "seed": net.seed, "attack": "clean", "target": "-",
            "backdoored": False, "defender_data": "750 clean + 250 validation",
            "trigger_data": "no triggered data", "accuracy_before": 0.99,
            "accuracy_after": 0.99, "drop": 0.0, "asr_before": None, "asr_after": None,
            "method": None, "seconds": 1.0, "warnings": [], "notes": [], "target_met": True,
            "result": {}, "table": []}


def test_a_net_under_the_floor_is_skipped_and_named(monkeypatch, tmp_path, capsys):
    def build(name, seed, log=None):
        if seed == 1:
            raise zoo.ZooQualityError(f"{name} (seed {seed}): clean accuracy 0.9780 < 0.98")
        net = _Net()
        net.name, net.seed = name, seed
        return net

    written = []
    real_write = defense_strength.write_json

    def write_json(path, rows):
        written.append(len(rows))
        return real_write(path, rows)

    monkeypatch.setattr(zoo, "build", build)
    monkeypatch.setattr(defense_strength, "run_one", _row)
    monkeypatch.setattr(defense_strength, "write_json", write_json)
    out = tmp_path / "rows.json"
    assert defense_strength.main(["--seeds", "0", "1", "2", "--names", "clean-convnet",
                                  "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["network"], r["seed"]) for r in rows] == [("clean-convnet", 0),
                                                         ("clean-convnet", 2)]
    assert written[:2] == [1, 2]  # the file is rewritten after each row, not only at the end
    printed = capsys.readouterr().out
    assert "skipped, under the zoo's floor: clean-convnet (seed 1): clean accuracy 0.9780" \
        in printed
    assert "met on 2 of 2" in printed
