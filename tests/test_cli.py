"""The command line as a user meets it: help text, flags, version, recipe keys, torchrun, the module tree."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.recipe_keys import recipe_keys
from tests.conftest import QUICKSTART, ROOT

WIDE = {"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"}  # wide enough that only a hard line break wraps


def _commands() -> list[tuple[list[str], object]]:
    """(argv prefix, click command) of every command and sub-command."""
    found = []

    def walk(cmd, path: list[str]):
        found.append((path, cmd))
        if hasattr(cmd, "commands"):  # a group
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()


def test_every_command_is_listed():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "select", "prune", "export", "build", "bench", "run", "status", "bench-train", "deploy triton",
            "recipe keys", "recipe show"} <= names


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "pcltool" for p, _ in COMMANDS])
def test_help_shows_no_bool_metavar_and_unbroken_description(path, cmd):
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "BOOLEAN" not in result.output
    # the description's first paragraph is one line however the docstring was wrapped
    first = inspect.cleandoc(cmd.help or "").split("\n\n")[0]
    assert " ".join(first.split()) in " ".join(line.strip() for line in result.output.splitlines()
                                              if " ".join(first.split()[:4]) in line)


@pytest.mark.parametrize("path,group", [(p, c) for p, c in COMMANDS if hasattr(c, "commands")],
                         ids=[" ".join(p) or "pcltool" for p, c in COMMANDS if hasattr(c, "commands")])
def test_command_list_shows_each_description_unbroken(path, group):
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    for name, cmd in group.commands.items():
        first = " ".join(inspect.cleandoc(cmd.help or "").split("\n\n")[0].split())
        assert any(line.startswith(name) and first in line for line in lines), f"{name}: {first!r} is broken"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "pcltool" for p, _ in COMMANDS])
def test_boolean_options_are_flags(path, cmd):
    for param in cmd.params:
        if param.param_type_name == "option" and param.type.name == "boolean":
            assert param.is_flag, f"{' '.join(path)} {param.opts}: a boolean option must take no value"


def test_status_json_takes_no_value(tmp_path):
    # `--json` must not swallow the next word: here `true` is read as the run path and rejected as such
    result = CliRunner().invoke(app, ["status", "--json", str(tmp_path / "missing")], env=WIDE)
    assert result.exit_code != 0 and "missing" in result.output
    flag = next(p for p in typer.main.get_command(app).commands["status"].params if p.name == "as_json")
    assert flag.is_flag


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pcltool {version('pcltool')}"


def test_recipe_keys_lists_every_key_with_meaning():
    keys = {k.key: k for k in recipe_keys()}
    assert {"data.image_size", "data.workers", "train.epochs", "pcl.peers", "model.backbone", "output.runs_dir"} <= set(keys)
    assert all(k.meaning for k in keys.values()), [k.key for k in keys.values() if not k.meaning]
    assert keys["data.image_size"].default == 32 and keys["data.image_size"].allowed == ">= 8, <= 1024"
    assert keys["train.schedule"].allowed == "multistep, cosine, constant"
    assert "resnet32" in keys["model.backbone"].allowed
    result = CliRunner().invoke(app, ["recipe", "keys", "--json"])
    assert result.exit_code == 0
    assert {row["key"] for row in json.loads(result.output)} == set(keys)
    table = CliRunner().invoke(app, ["recipe", "keys", "data"], env=WIDE)
    assert table.exit_code == 0 and "data.workers" in table.output and "train.batch_size" not in table.output
    bad = CliRunner().invoke(app, ["recipe", "keys", "nosuch"])
    assert bad.exit_code == 2 and "tables: data, model, output, pcl, train" in bad.output


def test_recipe_show_resolves_file_and_overrides():
    import tomllib

    result = CliRunner().invoke(app, ["recipe", "show", str(QUICKSTART), "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    resolved = tomllib.loads(result.output)
    assert resolved["name"] == "quickstart" and resolved["train"]["epochs"] == 3
    assert resolved["data"]["dataset"] == "digits" and resolved["data"]["val_seed"] == 0  # a default filled in
    assert "data.root" in result.output  # unset keys are named in the trailing comment
    as_json = CliRunner().invoke(app, ["recipe", "show", str(QUICKSTART), "--json"])
    assert json.loads(as_json.output)["data"]["root"] is None
    bad = CliRunner().invoke(app, ["recipe", "show", str(QUICKSTART), "--set", "train.nosuch=1"])
    assert bad.exit_code == 2 and "train.nosuch" in bad.output


def test_train_command_line_passes_through_torchrun():
    """`torchrun ... -m pcltool train RECIPE --run-dir DIR ...` must reach pcltool intact (torchrun's argparse
    takes `--run` as an abbreviation of its own --run-path)."""
    from torch.distributed.run import get_args_parser

    tail = ["train", "r.toml", "--run-dir", "runs/x", "--set", "train.epochs=1", "--resume", "--seed", "3",
            "--device", "cpu"]
    args = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "pcltool", *tail])
    assert args.module and args.training_script == "pcltool" and args.training_script_args == tail
    train = typer.main.get_command(app).commands["train"]
    params = train.make_context("train", list(args.training_script_args[1:])).params
    assert params["run"] == "runs/x" and params["resume"] and params["set_"] == ("train.epochs=1",)
    assert train.make_context("train", ["r.toml", "--run", "runs/y"]).params["run"] == "runs/y"  # alias
    run = typer.main.get_command(app).commands["run"]
    assert run.make_context("run", ["r.toml", "--run-dir", "runs/z"]).params["run"] == "runs/z"


def test_command_modules_form_a_tree():
    """Each command module imports without the CLI module (no cycle) and without torch (instant --help)."""
    modules = sorted(p.stem for p in (ROOT / "pcltool" / "commands").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module('pcltool.commands.' + m)\n"
            "assert 'pcltool.cli' not in sys.modules, 'a command module imports pcltool.cli'\n"
            "assert 'torch' not in sys.modules, 'a command module imports torch at import time'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert len(modules) >= 5


def test_status_prints_counts_as_integers():
    from pcltool.stages.show import _short_metrics

    text = _short_metrics({"verification": {"images": 144, "top1": 98.6111, "finite": True, "max_abs_diff": 1.5e-5},
                           "variants": 6})
    assert "images 144," in text and "finite yes" in text and "top1 98.61" in text and "variants=6" in text
    assert "144.00" not in text and "1.00" not in text


def test_status_shows_what_the_run_was_trained_on(trained_run):
    """The data record (dataset, split sizes, fingerprint, preprocessing, warnings) is on screen, not only in
    ``--json``: two runs trained on different data show different fingerprints."""
    from pcltool.stages.show import fingerprint_digest

    manifest_path = trained_run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    record = manifest["data"]
    shown = CliRunner().invoke(app, ["status", str(trained_run)], env=WIDE)
    assert shown.exit_code == 0, shown.output
    digest = fingerprint_digest(record["fingerprint"])
    assert f"data: {record['dataset']}" in shown.output
    assert f"train {record['train']} / val {record['val']} / test {record['test']}" in shown.output
    assert digest in shown.output and record["preprocessing"]["steps"][:40] in shown.output

    record["fingerprint"] = {**record["fingerprint"], "changed": True}
    record["warnings"] = ["the images differ from the release"]
    manifest_path.write_text(json.dumps(manifest))
    changed = CliRunner().invoke(app, ["status", str(trained_run)], env=WIDE)
    assert changed.exit_code == 0, changed.output
    assert digest not in changed.output and fingerprint_digest(record["fingerprint"]) in changed.output
    assert "warning: the images differ from the release" in changed.output

    del manifest["data"]
    manifest_path.write_text(json.dumps(manifest))
    assert "data: not recorded" in CliRunner().invoke(app, ["status", str(trained_run)], env=WIDE).output
