"""The `actstore` command's flags come from the config dataclasses: every field has one, with its docstring."""

from __future__ import annotations

import dataclasses

import pytest

from actstore.errors import ConfigError
from actstore.extract import ExtractConfig
from actstore_cli import build_parser
from actstore_cli.args import config_from_args, field_docs
from actstore_cli.demo import DemoConfig
from actstore_cli.train import sweep_from_args
from sae import SAEConfig
from sae.train import TrainConfig
from services.api.config import ServeConfig
from services.compare import CompareConfig
from services.evaluate import EvaluateConfig
from services.index import IndexConfig
from services.index.atlas import AtlasConfig
from services.probe import ProbeConfig
from services.report import ReportConfig
from services.steer import SteerConfig

CONFIGS = {"extract": [ExtractConfig], "train": [TrainConfig, SAEConfig], "evaluate": [EvaluateConfig],
           "index": [IndexConfig],
           "serve": [ServeConfig], "compare": [CompareConfig], "atlas": [AtlasConfig], "report": [ReportConfig],
           "demo": [DemoConfig], "probe": [ProbeConfig], "steer": [SteerConfig]}
SKIPPED = {"sae", "d_in", "path"}  # the sweep (TOML only), d_in (from the store), report's positional path
RENAMED = {"kind": "sae"}


def _actions(command: str) -> dict[str, object]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_is_a_flag_with_its_docstring_and_default(command: str) -> None:
    actions = _actions(command)
    for cls in CONFIGS[command]:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in SKIPPED:
                continue
            action = actions[f.name]
            assert action.option_strings[0] == "--" + RENAMED.get(f.name, f.name).replace("_", "-")
            assert action.help.startswith(docs[f.name]), f"{cls.__name__}.{f.name}"
            assert action.default is None  # so that only given flags override --config
            if isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool):
                assert f"(default {f.default})" in action.help


def test_docstrings_are_read_for_every_field() -> None:
    docs = field_docs(ExtractConfig)
    assert docs["batch_size"] == "Images per forward pass."
    assert set(docs) == {f.name for f in dataclasses.fields(ExtractConfig)}


def test_flags_override_the_config_file_and_types_follow_the_fields(tmp_path) -> None:
    toml = tmp_path / "extract.toml"
    toml.write_text('images = "imgs"\nmodel = "timm:vit_tiny_patch16_224"\nout = "x"\nbatch_size = 8\n'
                    'layers = [-2, "3"]\n')
    args = build_parser("extract").parse_args(["extract", "--config", str(toml), "--batch-size", "16",
                                               "--layers", "-1", "attnpool", "--storage-options", '{"anon": true}',
                                               "--overwrite"])
    cfg = config_from_args(ExtractConfig, args, "extract")
    assert (cfg.images, cfg.batch_size, cfg.layers, dict(cfg.storage_options), cfg.overwrite) == (
        "imgs", 16, (-1, "attnpool"), {"anon": True}, True)
    assert cfg.dtype == "bfloat16" and cfg.max_units is None  # defaults where neither says otherwise


def test_missing_required_flags_are_one_error(capsys) -> None:
    args = build_parser("extract").parse_args(["extract", "--model", "timm:vit_tiny_patch16_224"])
    with pytest.raises(ConfigError, match=r"extract needs --images, --out \(or --config FILE.toml\)"):
        config_from_args(ExtractConfig, args, "extract")
    with pytest.raises(SystemExit):
        build_parser("extract").parse_args(["extract", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        build_parser("info").parse_args(["info", "x", "--storage-options", '{"secret": "s3cr3t"'])
    assert "s3cr3t" not in capsys.readouterr().err  # a bad JSON flag is not echoed: it may hold credentials


def test_booleans_and_sae_flags() -> None:
    parse = build_parser("train").parse_args
    args = parse(["train", "--store", "s", "--out", "o", "--no-normalize", "--k", "64"])
    cfg = config_from_args(TrainConfig, args, "train")
    assert cfg.normalize is False and cfg.amp is True
    # without --sae, SAE flags apply to every SAE of the sweep (here the default one)
    assert sweep_from_args(cfg.sae, args) == ({"kind": "topk", "k": 64, "expansion": 16},)
    sweep = ({"kind": "topk", "k": 32, "expansion": 16}, {"kind": "batchtopk", "k": 16, "d_sae": 512})
    assert sweep_from_args(sweep, parse(["train", "--d-sae", "1024"])) == (
        {"kind": "topk", "k": 32, "d_sae": 1024}, {"kind": "batchtopk", "k": 16, "d_sae": 1024})
    # --sae KIND trains one SAE of that kind with the given options
    assert sweep_from_args(sweep, parse(["train", "--sae", "relu", "--l1-coeff", "3"])) == (
        {"kind": "relu", "l1_coeff": 3.0},)
    assert sweep_from_args(sweep, parse(["train"])) == sweep


def _other_value(action) -> list[str]:
    """Arguments giving `action` a value other than its field's default."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true, or --no-x of a default-True boolean
        return [next((s for s in action.option_strings if s.startswith("--no-")), flag)]
    if action.choices:
        return [flag, str(action.choices[-1])]
    if action.metavar == "JSON":
        return [flag, '{"anon": true}']
    if action.nargs == "+" or action.metavar == "L":
        return [flag, "3"]
    return [flag, {int: "7", float: "0.37"}.get(action.type, "elsewhere")]


def test_every_train_flag_changes_the_config_it_runs() -> None:
    from actstore.config import public_config
    from actstore_cli.train import train_config

    base_args = ["train", "--store", "s", "--out", "o"]
    actions = [a for a in _actions("train").values() if a.option_strings and a.dest not in
               ("help", "config", "quiet", "verbose", "store", "out")]
    assert len(actions) > 30
    parse = build_parser("train").parse_args
    base = public_config(train_config(parse(base_args)))
    for action in actions:
        extra = _other_value(action)
        if action.dest == "kind":  # --sae KIND trains one SAE of that kind: the sweep changes
            extra = ["--sae", "relu"]
        got = public_config(train_config(parse(base_args + extra)))
        if action.dest in base:
            assert got[action.dest] != base[action.dest], extra
        else:  # an SAE option: every SAE of the sweep takes it
            assert got["sae"][0].get(action.dest) != base["sae"][0].get(action.dest), extra
            assert {k: v for k, v in got.items() if k != "sae"} == {k: v for k, v in base.items() if k != "sae"}


@pytest.mark.parametrize("command", ["info", "verify", "extract", "train", "index", "serve", "compare", "atlas", "report",
                                     "demo", "probe", "steer"])
def test_help_of_every_command(command: str, capsys) -> None:
    from actstore_cli import main

    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: actstore {command}")
    for cls in CONFIGS.get(command, []):  # every field's docstring reaches the help (argparse rewraps lines)
        text = " ".join(out.split())
        for name, doc in field_docs(cls).items():
            if name not in SKIPPED:
                assert " ".join(doc.split())[:40] in text, (command, name)
