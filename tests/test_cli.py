"""The ``linkbreaker`` command line, model files (experiment.save_model/load_model) and plots."""
import json

import pytest
import torch

from linkbreaker_ext import cli, experiment, plots
from linkbreaker_ext.guard import LinkBreaker
from linkbreaker_ext.models import MnistNet


# ------------------------------------------------------------------------------ argument parsing

def test_parser_subcommands():
    p = cli.build_parser()
    a = p.parse_args(["demo"])
    assert a.func is cli.cmd_demo and a.attack == "badnets" and a.out == "demo-out" and a.data is None
    a = p.parse_args(["demo", "--attack", "none", "--epochs", "2", "--val-fraction", "0.05", "--quiet"])
    assert (a.attack, a.epochs, a.val_fraction, a.quiet) == ("none", 2, 0.05, True)
    a = p.parse_args(["train", "--out", "m.safetensors", "--attack", "badnets", "--target", "3"])
    assert a.func is cli.cmd_train and (a.out, a.attack, a.target, a.dataset) == (
        "m.safetensors", "badnets", 3, "mnist")
    a = p.parse_args(["fit", "--model", "m", "--out", "g", "--early-layer", "input",
                      "--config", '{"neighbours": 0}', "--device", "cpu"])
    assert a.func is cli.cmd_fit and (a.model, a.out, a.early_layer, a.device) == ("m", "g", "input", "cpu")
    assert json.loads(a.config) == {"neighbours": 0}
    a = p.parse_args(["evaluate", "--model", "m", "--guard", "g", "--n-clean", "10", "--json", "r.json"])
    assert a.func is cli.cmd_evaluate and (a.n_clean, a.n_trigger, a.json) == (10, 2000, "r.json")


@pytest.mark.parametrize("argv", [[], ["bogus"], ["train"], ["fit", "--model", "m"],
                                  ["evaluate", "--model", "m"], ["demo", "--attack", "nonsense"]])
def test_parser_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_evaluate_missing_model_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["evaluate", "--model", "missing.safetensors", "--guard", "g"])
    assert code == 2
    captured = capsys.readouterr()
    assert "error: no model file at missing.safetensors" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_fit_with_a_non_model_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"definitely not safetensors")
    code = cli.main(["fit", "--model", str(bad), "--out", str(tmp_path / "g.safetensors")])
    assert code == 2
    assert "not a linkbreaker model file" in capsys.readouterr().err
    assert not (tmp_path / "g.safetensors").exists()


# ------------------------------------------------------------------------------ model files

META = {"dataset": "mnist", "num_classes": 10, "seed": 3, "val_fraction": 0.02,
        "attack": {"name": "badnets", "target": 7, "nested": [1, 2.5, None]}}


def test_save_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MnistNet(10)
    path = tmp_path / "model.safetensors"
    experiment.save_model(path, model, META)
    loaded, meta = experiment.load_model(path)
    assert isinstance(loaded, MnistNet) and not loaded.training
    assert meta == META
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_load_model_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no model file"):
        experiment.load_model(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="not a linkbreaker model file"):
        experiment.load_model(junk)
    pickled = tmp_path / "model.pt"
    torch.save(MnistNet(10).state_dict(), pickled)
    with pytest.raises(ValueError, match="not a linkbreaker model file"):
        experiment.load_model(pickled)
    plain = tmp_path / "plain.safetensors"  # e.g. a guard file: safetensors, but no model metadata
    save_file({"w": torch.ones(2)}, str(plain), metadata={"linkbreaker-guard": "{}"})
    with pytest.raises(ValueError, match="safetensors file but not a linkbreaker model file"):
        experiment.load_model(plain)


def test_cli_fit_then_evaluate(tmp_path, capsys):
    """End to end on the embedded MNIST subset with an (untrained) MnistNet and the cheapest guard."""
    torch.manual_seed(0)
    model_path, guard_path, out = tmp_path / "m.safetensors", tmp_path / "g.safetensors", tmp_path / "out"
    experiment.save_model(model_path, MnistNet(10), {"dataset": "mnist", "num_classes": 10, "seed": 0,
                                                     "val_fraction": 0.01, "attack": None})
    config = json.dumps({"neighbours": 0, "fractions": [0.5, 1.0]})
    assert cli.main(["fit", "--model", str(model_path), "--out", str(guard_path), "--quiet",
                     "--device", "cpu", "--config", config]) == 0
    assert f"wrote {guard_path}" in capsys.readouterr().out
    model, _ = experiment.load_model(model_path)
    guard = LinkBreaker.load(guard_path, model)
    assert guard.config.neighbours == 0 and guard.config.fractions == (0.5, 1.0)

    assert cli.main(["evaluate", "--model", str(model_path), "--guard", str(guard_path), "--quiet",
                     "--device", "cpu", "--n-clean", "40", "--n-trigger", "30", "--out", str(out)]) == 0
    assert "CDA (clean accuracy)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"clean": 40, "triggered": 30}
    assert set(report["before"]) == {"cda", "asr"}
    assert all(0.0 <= v <= 1.0 for v in report["before"].values())
    assert {"cda", "asr", "r_acc", "alarm_rate_clean"} <= set(report["after"])
    pngs = list(out.glob("confidences_class*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ------------------------------------------------------------------------------ plots

def test_confidence_distributions_writes_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    conf_c, conf_t = torch.rand(30, 4, generator=g), torch.rand(20, 4, generator=g)
    y_c, y_t = torch.arange(30) % 4, torch.arange(20) % 4
    path = tmp_path / "plots" / "conf.png"  # the folder is created
    returned = plots.confidence_distributions(conf_c, y_c, conf_t, y_t, torch.full((4,), 0.7), 2, path,
                                              title="synthetic")
    assert returned == path
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
    # a class with no samples in either panel still plots (thresholds only)
    empty = plots.confidence_distributions(conf_c, y_c, conf_t, y_t, torch.full((4,), 0.7), 9,
                                           tmp_path / "empty.png")
    assert empty.stat().st_size > 0
