"""The training configuration: schema, YAML, overrides, validation and the CLI's handling of them.

Nothing here trains; every test runs in well under a second (one subprocess test
checks the real console behaviour: message, no traceback, exit code 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from reste import cli
from reste.train import config as C
from reste.train.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "fashion_mnist" / "resnet20_reste.yaml"


def run_cli(argv, capsys):
    """Run ``reste ARGV`` in-process; return (exit code, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's --help / usage errors
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- defaults and YAML
def test_defaults_are_the_main_job():
    cfg = Config()
    assert (cfg.model.name, cfg.model.precision, cfg.model.estimator) == ("resnet20_bireal", "1w1a", "reste")
    assert cfg.estimator.o_end == 3.0
    assert cfg.data.name == "fashion_mnist"
    assert cfg.run_name == "fashion_mnist-resnet20_bireal-1w1a-reste"
    C.validate(cfg)  # the defaults themselves pass validation


def test_example_config_is_identical_to_the_defaults():
    example = load_config(EXAMPLE)
    assert example == Config()


def test_yaml_round_trip_keeps_every_value():
    cfg = load_config(
        None, ["optim.lr=0.05", "optim.betas=[0.8, 0.9]", "analysis.histograms_at=[1, 2]", "model.kwargs={width: 2}"]
    )
    text = C.config_to_yaml(cfg)
    assert "betas: [0.8, 0.9]" in text  # lists stay readable
    assert C.config_from_dict(yaml.safe_load(text)) == cfg


def test_merge_order_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  name: sgd\ntrain:\n  epochs: 5\n")
    cfg = load_config(path, ["optim.lr=0.05"])
    assert cfg.optim.lr == 0.05  # override beats file
    assert cfg.optim.name == "sgd"  # file beats default
    assert cfg.train.epochs == 5
    assert cfg.optim.momentum == Config().optim.momentum  # untouched default


def test_dict_and_config_sources_and_dict_overrides():
    cfg = load_config({"train": {"epochs": 2}}, {"optim": {"lr": 0.5}})
    assert (cfg.train.epochs, cfg.optim.lr) == (2, 0.5)
    again = load_config(cfg, ["seed=3"])
    assert again.seed == 3 and cfg.seed == 0  # the source is not modified


def test_one_entry_of_a_mapping_option_keeps_the_others(tmp_path):
    # the QA case: shrinking a config's ViT with model.kwargs={dim: 24, depth: 1} silently dropped its
    # weight_estimator: dorefa and patch_size; model.kwargs.dim=24 sets one entry and keeps the rest
    base = tmp_path / "vit.yaml"
    base.write_text("model:\n  name: vit_tiny\n  kwargs: {patch_size: 16, weight_estimator: dorefa}\n")
    cfg = C.load_config(str(base), ["model.kwargs.dim=24", "model.kwargs.depth=1", "estimator.params.m=0.2"])
    assert cfg.model.kwargs == {"patch_size": 16, "weight_estimator": "dorefa", "dim": 24, "depth": 1}
    assert cfg.estimator.params == {"m": 0.2}
    whole = C.load_config(str(base), ["model.kwargs={dim: 24}", "model.kwargs.depth=1"])
    assert whole.model.kwargs == {"dim": 24, "depth": 1}  # the whole mapping replaces, then the entry adds
    with pytest.raises(C.ConfigError, match="unknown config key 'model.kwarg.dim'"):
        C.load_config(None, ["model.kwarg.dim=24"])
    with pytest.raises(C.ConfigError, match="unknown config key 'optim.lr.x'"):
        C.load_config(None, ["optim.lr.x=1"])  # only mapping options take entries


def test_model_kwargs_naming_what_the_data_set_or_a_model_key_sets():
    # docs/models.md's "image_size=28 for (Fashion-)MNIST" in model.kwargs was an internal TypeError
    # ("create() got multiple values for keyword argument 'image_size'")
    from reste import data
    from reste.models.build import model_arguments

    meta = data.info("fashion_mnist")
    agreeing = C.load_config(None, ["model.kwargs.image_size=28", "model.kwargs.width=0.25"])
    assert model_arguments(agreeing, meta)["kwargs"] == {"width": 0.25}  # the same value: harmless
    for item, message in (
        ("model.kwargs.image_size=32", r"image_size is set from the data set \(fashion_mnist: 28\); leave it out"),
        ("model.kwargs.num_classes=100", r"num_classes is set from the data set \(fashion_mnist: 10\)"),
        ("model.kwargs.precision=fp", "precision is set from model.precision; leave it out"),
    ):
        with pytest.raises(C.ConfigError, match=message):
            model_arguments(C.load_config(None, [item]), meta)


def test_overrides_are_yaml_values_not_code():
    cfg = load_config(
        None, ["name=__import__('os').system('echo hacked')", "train.device=cpu", "data.subset=null"], check=False
    )
    assert cfg.name == "__import__('os').system('echo hacked')"  # just a string
    assert cfg.data.subset is None
    with pytest.raises(ConfigError, match="optim.lr must be of type float"):
        load_config(None, ["optim.lr=__import__('os').getcwd()"])


def test_numbers_written_without_a_dot_are_accepted_as_floats():
    # YAML 1.1 reads 1e-3 as the string "1e-3"; a float option takes it as the number
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-4"])
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.weight_decay == pytest.approx(5e-4)
    assert load_config(None, ["estimator.o_end=4"]).estimator.o_end == 4.0  # int -> float


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("optim.lrr=0.1", "optim.lr"),
        ("train.epoch=3", "train.epochs"),
        ("trian.epochs=3", "train.epochs"),
        ("estimator.oend=4", "estimator.o_end"),
    ],
)
def test_unknown_key_suggests_the_closest(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"Did you mean '{suggestion}'" in str(err.value)
    assert override.split("=")[0] in str(err.value)


def test_unknown_key_in_a_yaml_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "optim.learning_rate" in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=2.5", "train.epochs must be of type int"),
        ("train.epochs=many", "train.epochs must be of type int"),
        ("data.augment=maybe", "data.augment must be of type bool"),
        ("optim.lr=fast", "optim.lr must be of type float"),
        ("optim.betas=0.9", "optim.betas must be of type list"),
        ("model.kwargs=3", "model.kwargs must be of type dict"),
        ("train.epochs=null", "train.epochs must be of type int"),
        ("model=resnet20", "model must be a mapping"),
    ],
)
def test_wrong_types_name_the_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-0.1", "optim.lr must be > 0"),
        ("optim.lr=.inf", "optim.lr must be a finite number > 0, got inf"),  # was: "must be > 0, got inf"
        ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
        ("estimator.o_end=0.5", "estimator.o_end must be >= 1"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("optim.momentum=1.0", "optim.momentum must be in"),
        ("train.label_smoothing=1", "train.label_smoothing must be in"),
        ("analysis.histograms_at=[9]", "analysis.histograms_at entries must be epochs in 1..3"),
        ("lr_schedule.warmup_epochs=5", "must be shorter than train.epochs"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ],
)
def test_out_of_range_values_are_refused(override, expected):
    base = ["train.epochs=3"] if "epochs" not in override else []
    with pytest.raises(ConfigError, match=expected):
        load_config(None, base + [override])


def test_batch_larger_than_the_subset_is_refused_before_any_work():
    with pytest.raises(
        ConfigError, match=r"data.batch_size \(128\) is larger than the training set \(data.subset=100\)"
    ):
        load_config(None, ["data.subset=100"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=resnet21", "Did you mean 'resnet20'"),
        ("model.estimator=rest", "Did you mean 'reste'"),
        ("data.name=fashion_mist", "Did you mean 'fashion_mnist'"),
        ("optim.name=adamm", "Did you mean 'adam'"),
        ("estimator.schedule=cosin", "Did you mean 'cosine'"),
        ("model.precision=1w2a", "choose one of 1w1a, 1w32a, fp"),
    ],
)
def test_unknown_names_list_the_choices(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ConfigError, match="optim.nesterov needs optim.name=sgd"):
        load_config(None, ["optim.nesterov=true"])  # default optimizer is adam
    load_config(None, ["optim.name=sgd", "optim.nesterov=true"])


def test_fractional_warmup_needs_per_step_updates():
    load_config(None, ["train.epochs=3", "lr_schedule.warmup_epochs=0.5"])  # per: step (default)
    with pytest.raises(ConfigError, match="fractional"):
        load_config(None, ["train.epochs=3", "lr_schedule.warmup_epochs=0.5", "lr_schedule.per=epoch"])


def test_sync_bn_in_a_single_process_only_warns():
    cfg = load_config(None, ["train.sync_bn=true"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C.warn_conflicts(cfg, world_size=1)
    assert any("sync_bn" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.warn_conflicts(cfg, world_size=2)  # meaningful there: no warning


def test_malformed_override_and_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        C.parse_overrides(["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


# ----------------------------------------------------------------------------- documentation
def test_option_table_covers_every_leaf_with_its_default():
    rows = {key: (tp, default) for key, tp, default, _ in C.option_table()}
    assert rows["optim.lr"] == ("float", Config().optim.lr)
    assert rows["data.subset"] == ("int or null", None)
    assert rows["train.epochs"][1] == Config().train.epochs
    sections = {"model", "estimator", "data", "optim", "lr_schedule", "train", "analysis", "out"}
    assert {key.split(".")[0] for key in rows if "." in key} == sections
    # every leaf of the nested default dict appears exactly once
    nested = C.config_to_dict(Config())
    flat = [f"{section}.{key}" for section in sections for key in nested[section]] + ["name", "seed"]
    assert sorted(rows) == sorted(flat)


def test_train_help_lists_every_option_with_its_default(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    for key, tp, default, _ in C.option_table():
        line = next((l for l in out.splitlines() if l.strip().startswith(key + " ")), None)
        assert line is not None, f"{key} missing from --help"
        assert f"({tp}, default {C._show(default)})" in line
    assert "optim.lr" in out and "(float, default 0.002)" in out


def test_print_config_shows_the_resolved_yaml(capsys):
    code, out, _ = run_cli(["train", "--print-config", "optim.lr=0.05", "train.epochs=2"], capsys)
    assert code == 0
    data = yaml.safe_load(out)
    assert data["optim"]["lr"] == 0.05 and data["train"]["epochs"] == 2
    assert C.config_from_dict(data) == load_config(None, ["optim.lr=0.05", "train.epochs=2"])


def test_options_may_come_after_overrides(capsys):
    code, out, _ = run_cli(["train", "seed=4", "--print-config", "optim.lr=0.5"], capsys)
    assert code == 0
    data = yaml.safe_load(out)
    assert (data["seed"], data["optim"]["lr"]) == (4, 0.5)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "optim.lrr=0.1"], "Did you mean 'optim.lr'"),
        (["train", "train.epochs=two"], "train.epochs must be of type int"),
        (["train", "a.yaml", "b.yaml"], "two config files given"),
        # a space instead of '=': was "two config files given ('train.epochs' and '1')"
        (["train", "train.epochs", "1"], "'train.epochs' is a config key without a value; write train.epochs=1 "),
        (["train", "optim.lr"], "write optim.lr=VALUE (key=value, no spaces around '=')"),
        (["train", "optim.lrr", "0.1"], "(if 'optim.lrr' is a setting, write optim.lrr=0.1)"),
        (["train", "missing.yaml"], "does not exist"),
        # checked against the data set, as set-up does: a config --print-config shows is one that trains
        (["train", "model.name=vgg_small", "model.kwargs.image_size=32"], "image_size is set from the data set"),
        (["train", "model.kwargs.width=2000"], "lower the width or size in model.kwargs"),
    ],
)
def test_cli_config_errors_exit_2_with_one_message(argv, expected, capsys):
    code, out, err = run_cli(argv + ["--print-config"], capsys)
    assert code == 2
    assert expected in err and err.startswith("error: ")
    assert "Traceback" not in err and out == ""


def test_console_command_prints_no_traceback_and_exits_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "reste", "train", "optim.lrr=0.1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # validation happened before any work


def test_docs_option_table_is_current():
    text = (REPO / "docs" / "training.md").read_text()
    assert C.markdown_table() in text, (
        "regenerate the table in docs/training.md from reste.train.config.markdown_table()"
    )


def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  name: fashion_mnist\n  augment: true\n  batch_size: 64\n  augment: false\n")
    with pytest.raises(ConfigError, match=r"line 5, column 3: duplicate key 'augment' \(first on line 3\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(None, ["optim={lr: 0.1, lr: 0.2}"])
    # the same key in different sections is fine
    path.write_text("data:\n  name: fashion_mnist\nmodel:\n  name: resnet20\n")
    assert load_config(path).model.name == "resnet20"


# ----------------------------------------------------------------------------- train.compile
def test_train_compile_takes_auto_true_false_reduce_overhead_and_old_booleans():
    assert Config().train.compile == "auto"
    for raw, expected in (
        ("true", "true"),
        ("false", "false"),
        ("auto", "auto"),
        ("reduce-overhead", "reduce-overhead"),
    ):
        cfg = C.apply_overrides(Config(), [f"train.compile={raw}"])
        assert cfg.train.compile == expected
        C.validate(cfg)
    # a config or checkpoint written when train.compile was a bool
    assert C.config_from_dict({"train": {"compile": True}}).train.compile == "true"
    assert C.config_from_dict({"train": {"compile": False}}).train.compile == "false"
    with pytest.raises(ConfigError, match=r"train.compile: unknown value 'maybe'; choose one of auto, true, false"):
        C.validate(C.apply_overrides(Config(), ["train.compile=maybe"]))
    with pytest.raises(ConfigError, match="train.compile must be of type str, got 1"):
        C.apply_overrides(Config(), ["train.compile=1"])
    # other string options still refuse a boolean
    with pytest.raises(ConfigError, match="train.amp must be of type str"):
        C.apply_overrides(Config(), ["train.amp=true"])


def test_compile_auto_is_eager_on_cpu_and_compiled_on_cuda():
    import torch

    from reste.train.setup import compile_mode

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compile_mode("auto", cpu) is None
    assert compile_mode("auto", cuda) == "default"
    assert compile_mode("true", cpu) == compile_mode(True, cpu) == "default"
    assert compile_mode("false", cuda) is None and compile_mode(False, cuda) is None
    assert compile_mode("reduce-overhead", cuda) == "reduce-overhead"
    with pytest.raises(ConfigError, match="reduce-overhead captures CUDA graphs.*use train.compile=true"):
        compile_mode("reduce-overhead", cpu)


def test_wrap_model_compiles_as_train_compile_resolves_on_a_mocked_cuda_device(monkeypatch):
    import torch

    from reste.train import setup
    from reste.train.distributed import DistContext

    calls = []

    def fake_compile(model, mode=None):
        calls.append(mode)
        return model

    monkeypatch.setattr(setup.torch, "compile", fake_compile)
    model = torch.nn.Linear(2, 2)
    cuda = DistContext(device=torch.device("cuda", 0))  # never touched: the model stays where it is
    assert setup.wrap_model(model, DistContext(), "auto") is model and calls == []
    setup.wrap_model(model, cuda, "auto")
    setup.wrap_model(model, cuda, "reduce-overhead")
    setup.wrap_model(model, DistContext(), "true")
    setup.wrap_model(model, cuda, "false")
    assert calls == ["default", "reduce-overhead", "default"]


def test_a_gpu_index_this_machine_lacks_is_a_config_error(monkeypatch):
    """train.device=cuda:3 on a one-GPU machine (and eval's device): was torch's 'invalid device ordinal'."""
    import torch

    from reste.train import distributed as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device=cuda:3: this machine has 1 GPU \(cuda:0 to cuda:0\)"):
        D.resolve_device("cuda:3")
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'foo'"):
        D.resolve_device("foo", key="device")
    assert D.resolve_device("cuda:0") == torch.device("cuda:0")


def test_the_papers_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    # an installed reste has no configs/ beside the user's folder: the bundled ones are found by name
    monkeypatch.chdir(tmp_path)
    by_path = C.load_config("configs/cifar10/resnet20_1w1a.yaml")
    assert by_path.name == "cifar10-resnet20-1w1a-reste"
    assert C.load_config("cifar10/resnet20_1w1a") == C.load_config("cifar10/resnet20_1w1a.yaml") == by_path
    assert C.load_config("cifar10/seed_table2/fixed_o1").estimator.schedule == "fixed"  # its base: resolved too
    with pytest.raises(C.ConfigError, match=r"Did you mean 'cifar10/resnet20_1w1a'\?"):
        C.load_config("cifar10/resnet20_1w1")
    # a file of the user's own wins over a bundled one of the same name
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "resnet20_1w1a.yaml").write_text("name: mine\n")
    assert C.load_config("cifar10/resnet20_1w1a.yaml").name == "mine"
    assert C.load_config("cifar10/resnet20_1w1a").name == "mine"  # named without .yaml too


def test_an_empty_data_root_is_refused_naming_the_key():
    # an empty string would otherwise read (and download into) the current folder; data.root= is null
    with pytest.raises(C.ConfigError, match="data.root is empty"):
        C.load_config(None, ['data.root=""'])
    with pytest.raises(C.ConfigError, match="data.root is empty"):
        C.load_config({"data": {"root": "  "}})
    assert C.load_config(None, ["data.root="]).data.root is None


def test_an_estimator_params_o_the_schedule_replaces_is_warned_about_with_the_fixed_schedule_to_use():
    # estimator.params={o: 2.5} (or model.kwargs.estimator_params) trained with o on the cosine to 3 (logged o
    # 1.586 at mid-run), silently; a warning, not an error, so runs made before still resume
    for override, key in (
        ("estimator.params={o: 2.5}", "estimator.params"),
        ("model.kwargs={estimator_params: {o: 2.5}}", "model.kwargs.estimator_params"),
    ):
        cfg = C.load_config(None, [override])
        with pytest.warns(
            UserWarning,
            match=rf"{key}.o=2.5 has no effect: the o schedule \(cosine, o_end 3\) sets o at every step; for a "
            r"constant o use estimator.schedule=fixed estimator.o_end=2.5",
        ):
            C.warn_conflicts(cfg, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.warn_conflicts(C.load_config(None, ["estimator.params={t: 1.2}"]), world_size=1)
        C.warn_conflicts(C.load_config(None, ["estimator.schedule=fixed", "estimator.o_end=2.5"]), world_size=1)
        # no ReSTE built, no o to be replaced (STE refuses the parameter itself; DoReFa weights at 1W/32A take none)
        for other in (["model.estimator=ste"], ["model.precision=1w32a", "model.kwargs={weight_estimator: dorefa}"]):
            C.warn_conflicts(C.load_config(None, [*other, "estimator.params={o: 2}"]), world_size=1)


def test_indicator_options_without_indicators_are_warned_about():
    # analysis.indicators=false silently dropped an explicit every_steps and histograms_at (no final histogram)
    cfg = C.load_config(None, ["analysis.indicators=false", "analysis.every_steps=5", "analysis.histograms_at=[1]"])
    with pytest.warns(UserWarning, match="analysis.every_steps and analysis.histograms_at have no effect with "
                      "analysis.indicators=false"):  # fmt: skip
        C.warn_conflicts(cfg, world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.warn_conflicts(C.load_config(None, ["analysis.indicators=false"]), world_size=1)


# ---------------------------------------------------------------------------
# data.crop_scale and model.kwargs.downsample: the paper's ImageNet settings


def test_data_crop_scale_is_two_numbers_used_by_imagenet_only():
    assert load_config(None).data.crop_scale == [0.08, 1.0]
    cfg = load_config(None, ["data.name=imagenet", "data.crop_scale=[0.08, 1.25]", "data.augment=true"])
    assert cfg.data.crop_scale == [0.08, 1.25]
    assert load_config(None, ["data.name=imagenet", "data.crop_scale=[1, 2]"]).data.crop_scale == [1.0, 2.0]
    for bad in ("[0.5, 0.1]", "[0, 1]", "[0.08]", "[0.08, 1, 2]", "[true, 1]", "[.inf, 1]", "[0.08, abc]"):
        with pytest.raises(ConfigError, match=r"data.crop_scale must be two numbers \[lo, hi\] with 0 < lo <= hi"):
            load_config(None, ["data.name=imagenet", f"data.crop_scale={bad}"])
    with pytest.raises(ConfigError, match="data.crop_scale must be of type list"):
        load_config(None, ["data.name=imagenet", "data.crop_scale=1.25"])
    # the in-memory sets have no RandomResizedCrop: another value is refused, the default passes
    assert load_config(None, ["data.name=cifar10", "data.crop_scale=[0.08, 1.0]"]).data.crop_scale == [0.08, 1.0]
    with pytest.raises(ConfigError, match=r"data.crop_scale=\[0.08, 1.25\]: cifar10 has no RandomResizedCrop"):
        load_config(None, ["data.name=cifar10", "data.crop_scale=[0.08, 1.25]"])
    # without augmentation there is no training crop: harmless, so a warning
    quiet = load_config(None, ["data.name=imagenet", "data.crop_scale=[0.08, 1.25]", "data.augment=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.warn_conflicts(quiet, 1)
    off = load_config(None, ["data.name=imagenet", "data.crop_scale=[0.08, 1.25]", "data.augment=false"])
    with pytest.warns(UserWarning, match="data.crop_scale has no effect with data.augment=false"):
        C.warn_conflicts(off, 1)


def test_the_papers_imagenet_resnet_configs_use_its_strided_shortcut_and_crop_scale():
    import torch

    from reste.data import info
    from reste.models.build import build_model

    paper = sorted((REPO / "configs" / "imagenet").glob("resnet*.yaml"))
    paper += sorted((REPO / "configs" / "imagenet" / "two_step").glob("*.yaml"))
    assert len(paper) == 8
    for path in paper:
        cfg = load_config(path)
        assert cfg.model.kwargs == {"downsample": "stride"}, path
        assert cfg.data.crop_scale == [0.08, 1.25] and cfg.data.augment, path
        assert "downsample: stride" in C.config_to_yaml(cfg)  # what --print-config shows
    for path in sorted((REPO / "configs" / "imagenet").glob("vit*.yaml")):  # the seed has no such settings
        assert load_config(path).data.crop_scale == [0.08, 1.0], path
    cfg = load_config(REPO / "configs" / "imagenet" / "resnet34_1w1a.yaml", ["model.kwargs.width=0.125"])
    with torch.device("meta"):
        model = build_model(cfg, info("imagenet"))
    shortcut = model.get_submodule("stages.3.0.shortcut")
    assert not hasattr(shortcut, "pool") and shortcut.conv.stride == (2, 2)
    with pytest.raises(ConfigError, match="downsample must be one of 'avgpool', 'stride', got 'strided'"):
        build_model(load_config(None, ["model.name=resnet18", "model.kwargs.downsample=strided"]), info("imagenet"))


def test_a_downsample_stride_run_on_imagenet_folders_trains_evaluates_and_exports_the_strided_net(
    tmp_path, capsys, monkeypatch
):
    # the option must reach everything that rebuilds the model from its kwargs: the run's config,
    # reste eval, the export's recorded architecture and its load; crop_scale reaches the loader
    import json

    import torch

    pytest.importorskip("PIL")
    pytest.importorskip("safetensors")
    from data_fixtures import write_image_folders
    from reste.data import imagenet
    from reste.deploy import load
    from reste.deploy.fileformat import read_graph
    from reste.train import trainer as T

    scales = []
    real_init = imagenet.ImageFolderDataset.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        scales.append((self.train, self.crop_scale))

    monkeypatch.setattr(imagenet.ImageFolderDataset, "__init__", spy)
    write_image_folders(tmp_path / "tree" / "imagenet", per_class=2, val_per_class=1)
    T.train(
        progress=False,
        model={"name": "resnet18", "kwargs": {"width": 0.0625, "downsample": "stride"}},
        data={
            "name": "imagenet",
            "root": str(tmp_path / "tree"),
            "batch_size": 3,
            "test_batch_size": 3,
            "augment": True,
            "crop_scale": [0.08, 1.25],
        },
        analysis={"indicators": False},
        train={"epochs": 1, "threads": 1, "device": "cpu"},
        out={"dir": str(tmp_path), "name": "run"},
    )
    assert (True, (0.08, 1.25)) in scales  # the training set's crop
    run_dir = tmp_path / "run"
    saved = load_config(run_dir / "config.yaml")
    assert saved.model.kwargs["downsample"] == "stride" and saved.data.crop_scale == [0.08, 1.25]

    from reste.train import evaluation

    built = []
    real_build = evaluation.build_model

    def spy_build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(evaluation, "build_model", spy_build)
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), "--device", "cpu", "--json"]) == 0
    of_run = json.loads(capsys.readouterr().out)
    assert len(built) == 1 and built[0].get_submodule("stages.1.0.shortcut").conv.stride == (2, 2)
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "agree on 100.00%" in capsys.readouterr().out  # the rebuilt (strided) net gives the trained outputs
    assert read_graph(out)["architecture"]["kwargs"]["downsample"] == "stride"
    deployed = load(out)
    shortcut = deployed.get_submodule("stages.1.0.shortcut")
    assert not hasattr(shortcut, "pool") and shortcut.conv.stride == (2, 2)
    assert deployed(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
    assert cli.main(["eval", str(out), "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == of_run["top1"]
    assert cli.main(["summary", str(run_dir)]) == 0
