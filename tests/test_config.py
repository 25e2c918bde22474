"""Recipes: defaults, overrides, and bad input rejected with a message naming file, key and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from pcltool.config import Recipe, load_recipe, parse_override
from pcltool.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_paper_recipe_values():
    r = load_recipe(ROOT / "recipes" / "cifar10.toml")
    assert (r.model.backbone, r.pcl.peers, r.train.epochs, r.train.lr, r.train.weight_decay) == ("resnet32", 3, 300, 0.1, 5e-4)
    assert r.train.nesterov and r.train.milestones == [150, 225] and r.train.batch_size == 128
    assert (r.pcl.temperature, r.pcl.ema_decay, r.pcl.rampup_epochs) == (3.0, 0.999, 80)
    base = load_recipe(ROOT / "recipes" / "cifar10-baseline.toml")
    assert not base.pcl.enabled and base.num_branches == 1
    assert base.train == r.train and base.data == r.data  # same schedule and data as the PCL recipe


def test_overrides_are_typed():
    assert parse_override("train.epochs=10") == (["train", "epochs"], 10)
    assert parse_override("train.milestones=[1, 2]") == (["train", "milestones"], [1, 2])
    assert parse_override("model.backbone=resnet56") == (["model", "backbone"], "resnet56")
    r = load_recipe(ROOT / "recipes" / "quickstart.toml", ["train.epochs=3", "pcl.enabled=false", "train.lr=0.05"])
    assert r.train.epochs == 3 and not r.pcl.enabled and r.train.lr == 0.05


@pytest.mark.parametrize("override, fragment", [
    ("train.epoch=3", "train.epoch: unknown key; allowed here: epochs"),
    ("train.epochs=ten", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("pcl.peers=1", "pcl.peers"),
    ("model.backbone=resnet33", "allowed: densenet40_12"),
    ("data.dataset=mnist", "data.dataset"),
    ("bogus=1", "bogus: unknown key; allowed here: name"),
    ("train.milestones=[200, 100]", "milestones"),
    ("train.compile_mode=reduce_overhead", "'reduce-overhead'"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes" / "quickstart.toml", [override])
    assert "quickstart.toml" in str(err.value)
    assert fragment in str(err.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_resolved_recipe_round_trips():
    r = load_recipe(ROOT / "recipes" / "cifar10.toml")
    assert Recipe.model_validate(r.resolved()) == r


def test_cli_bad_recipe_exit_code_2_and_nothing_on_disk(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ndataset = "digits"\n[train]\nepochs = "many"\n')
    proc = subprocess.run([sys.executable, "-m", "pcltool", "train", str(recipe), "--set",
                           f"output.runs_dir={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.epochs" in proc.stderr and "r.toml" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
