"""Bad input: every problem names the file, line and column, exit status 2, nothing written."""

import pytest

from basinprobe.runtime.spec import SpecError, load_spec

GOOD = """
version: 1
model: {kind: mlp, with: {in: 2, hidden: [4], out: 1}}
data: {kind: teacher_student, with: {n: 20, in: 2}}
loss: mse
train: {optimizer: {kind: sgd, lr: 1e-2}, steps: 5}
probes:
  - {probe: evaluate}
output: out.zarr
"""


def problems_of(write_spec, text):
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return path, info.value.problems


def test_good_spec_loads_with_yaml_1_2_float(write_spec):
    spec = load_spec(write_spec(GOOD))
    (_, point), = spec.points()
    assert point.train.optimizer.lr == 0.01
    assert spec.probes[0].params == {"splits": ["train", "test"]}


def test_malformed_yaml_names_line(write_spec):
    path, problems = problems_of(write_spec, "version: 1\nmodel: {kind: mlp\n")
    assert problems[0].mark.file == str(path) and problems[0].mark.line >= 2
    assert "malformed YAML" in problems[0].message


def test_a_hyperparameter_beyond_float32_is_an_error_at_its_line(write_spec):
    _, problems = problems_of(write_spec, GOOD.replace("lr: 1e-2", "lr: 1e300"))
    assert problems[0].mark.line == 5 and "beyond float32's range" in problems[0].message
    load_spec(write_spec(GOOD.replace("lr: 1e-2", "lr: 1e300") + "dtype: float64\n"))


@pytest.mark.parametrize("old, new, line, fix", [
    ("  - {probe: evaluate}", "\t- {probe: evaluate}", 7, "replace the tab with spaces"),
    ("loss: mse", "loss: mse: sum", 4, "quote a value that holds ': '"),
    ("loss: mse", "loss: mse\n loss2: mse", 5, "or indent this key like the keys it belongs with"),
    ("probes:\n", "probes:\n  - a\n b: 1\n", 8, "keep a mapping's keys and a list's items on levels of their own"),
    ("with: {n: 20, in: 2}}", "with: {n: 20 in: 2}}", 3, "the '{' opened at line 3, column 37 is not closed, or two "
                                                          "of its items lack a ','"),
    ("hidden: [4]", "hidden: [4", 2, "the '[' opened at line 2, column 42 is not closed"),
    ("output: out.zarr", 'output: "out.zarr', 9, "the quote opened at line 8, column 9 is never closed"),
    ("output: out.zarr", "output: *.zarr", 8, "quote the value"),
    ("output: out.zarr", "output: @out.zarr", 8, "must be quoted"),
    ("output: out.zarr", "output: `out.zarr`", 8, "a value starting with '`' must be quoted, e.g. \"`value\""),
    ("out: 1}}", "out: 1}}}", 2, "a stray '}': remove it, or open the bracket it closes"),
    ("output: out.zarr", 'output: "out" .zarr', 8, "text after a value that has ended"),
    ("loss: mse", "loss: mse\n---\nname: x", 5, "a spec is one YAML document: remove the second '---'"),
    ("model: {kind: mlp,", "model: {kind: mlp: x,", 2, "or a value holding ': ' is not quoted"),
])
def test_malformed_yaml_says_how_to_fix_it(write_spec, old, new, line, fix):
    _, problems = problems_of(write_spec, GOOD.replace(old, new))
    assert len(problems) == 1 and "malformed YAML" in problems[0].message
    assert fix in problems[0].message and problems[0].mark.line == line, str(problems[0])


def test_unknown_top_level_key_suggests_close_one(write_spec):
    _, problems = problems_of(write_spec, GOOD + "proobes: []\n")
    assert any("unknown key 'proobes'" in p.message and "'probes'" in p.message for p in problems)
    assert problems[0].mark.line == 9


@pytest.mark.parametrize("old,new,expect", [
    ("probe: evaluate", "probe: evalute", "unknown probe 'evalute'; did you mean 'evaluate'?"),
    ("kind: mlp", "kind: mpl", "unknown kind 'mpl'; did you mean 'mlp'?"),
    ("kind: teacher_student", "kind: teacher_studnet", "did you mean 'teacher_student'?"),
    ("loss: mse", "loss: mae", "unknown loss 'mae'"),
])
def test_unknown_names_get_suggestions(write_spec, old, new, expect):
    _, problems = problems_of(write_spec, GOOD.replace(old, new))
    assert any(expect in p.message for p in problems), problems


def test_wrong_type_names_line_and_column(write_spec):
    path, problems = problems_of(write_spec, GOOD.replace("steps: 5", 'steps: "ten"'))
    (problem,) = problems
    assert problem.path == ("train", "steps")
    assert (problem.mark.line, problem.mark.column) == (5, 50)
    assert "expected integer" in problem.message
    assert str(problem).startswith(f"{path}:5:50:")


@pytest.mark.parametrize("old,new", [
    ("steps: 5", "steps: 0"),
    ("hidden: [4]", "hidden: [0]"),
    ("n: 20", "n: -3"),
])
def test_zero_or_negative_sizes_are_refused(write_spec, old, new):
    _, problems = problems_of(write_spec, GOOD.replace(old, new))
    assert any("out of range" in p.message for p in problems)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_learning_rate_is_refused(write_spec, value):
    _, problems = problems_of(write_spec, GOOD.replace("lr: 1e-2", f"lr: {value}"))
    assert any(p.path == ("train", "optimizer", "lr") and "finite" in p.message for p in problems)


@pytest.mark.parametrize("value, where, expect", [
    ("-0.01", "epsilon", "-0.01 is out of range: must be > 0"),              # the number branch
    ("[0.1, -0.01]", "epsilon.1", "-0.01 is out of range: must be > 0"),     # inside the list branch
    ("[0.1, x]", "epsilon.1", "expected number, got 'x'"),
    ("tiny", "epsilon", "expected number or array, got 'tiny'"),             # no branch's type fits
])
def test_a_value_with_alternative_forms_gets_the_fix_of_the_form_it_has(write_spec, value, where, expect):
    # epsilon is a positive number or a list of them (anyOf): jsonschema's own message for it,
    # "is not valid under any of the given schemas", would name no fix
    text = GOOD.replace("{probe: evaluate}", f"{{probe: basin_volume, with: {{epsilon: {value}}}}}")
    _, (problem,) = problems_of(write_spec, text)
    assert problem.message == expect and ".".join(map(str, problem.path)) == f"probes.0.with.{where}"
    assert problem.mark.line == 7


@pytest.mark.parametrize("value, where, expect", [
    ("5", "at", "expected one of all, first, last or array, got 5"),
    ("[-3]", "at.0", "-3 is out of range: must be >= 0"),
    ("lasst", "at", "unknown value 'lasst'; did you mean 'last'? (known: all, first, last)"),
])
def test_at_names_the_fix_for_each_of_its_forms(write_spec, value, where, expect):
    _, (problem,) = problems_of(write_spec, GOOD.replace("{probe: evaluate}", f"{{probe: evaluate, at: {value}}}"))
    assert problem.message == expect and ".".join(map(str, problem.path)) == f"probes.0.{where}"


def test_unknown_with_key_of_a_probe_is_refused(write_spec):
    _, problems = problems_of(write_spec, GOOD.replace("{probe: evaluate}", "{probe: evaluate, with: {splitz: [train]}}"))
    assert any("unknown key 'splitz'" in p.message and "'splits'" in p.message for p in problems)


def test_problems_come_once_each_in_file_order(write_spec):
    text = GOOD.replace("  - {probe: evaluate}", "  - {probe: hessian_spectrum, with: {top_kk: 3, method: lanczoss}}\n"
                                               "  - name: e\n    probe: evaluate\n    with:")
    text = text.replace("steps: 5}", "steps: -5}")
    _, problems = problems_of(write_spec, text)
    assert [(p.mark.line, p.mark.column) for p in problems] == sorted((p.mark.line, p.mark.column) for p in problems)
    assert len({str(p) for p in problems}) == len(problems) == 4
    assert problems[-1].message == "expected object, got nothing (the key has no value)"


def test_a_sweep_value_given_twice_is_refused_where_it_repeats(write_spec):
    # two cells would claim one coordinate: the store held uninitialized memory for them
    text = GOOD + "sweep:\n  seed: [0, 1, 0]\n  model.with.hidden: [[4], [8], [4]]\n"
    _, problems = problems_of(write_spec, text)
    assert [(p.path, p.mark.line, p.message) for p in problems] == [
        (("sweep", "seed", 2), 10, "0 is the same point as the axis's value number 1 (0); give each point once"),
        (("sweep", "model.with.hidden", 2), 11,
         "[4] is the same point as the axis's value number 1 ([4]); give each point once")]


@pytest.mark.parametrize("old, new, where", [
    ("steps: 5}", "steps: 5e0}", "train.steps"),
    ("n: 20,", "n: 20.0,", "data.with.n"),
    ("hidden: [4]", "hidden: [4.0]", "model.with.hidden.0"),
    ("{probe: evaluate}", "{probe: hessian_spectrum, with: {top_k: 2.0}}", "probes.0.with.top_k"),
])
def test_a_whole_number_written_as_a_float_is_refused_with_the_integer_to_write(write_spec, old, new, where):
    _, problems = problems_of(write_spec, GOOD.replace(old, new))
    assert [".".join(map(str, p.path)) for p in problems] == [where]
    assert "expected integer, got" in problems[0].message and "(write it as an integer:" in problems[0].message


def test_missing_data_file(write_spec):
    _, problems = problems_of(write_spec, GOOD.replace("{kind: teacher_student, with: {n: 20, in: 2}}",
                                                      "{kind: npz, with: {path: nothere.npz}}"))
    assert any("nothere.npz" in p.message and "does not exist" in p.message for p in problems)


def test_missing_checkpoint_file(write_spec):
    text = GOOD.replace("train: {optimizer: {kind: sgd, lr: 1e-2}, steps: 5}\n", "").replace(
        "out: 1}}", "out: 1}, checkpoints: [ckpt/*.pt]}")
    _, problems = problems_of(write_spec, text)
    assert any("no checkpoint file matches" in p.message for p in problems)


def test_output_that_is_an_existing_file(write_spec, tmp_path):
    (tmp_path / "out.zarr").write_text("not a store")
    _, problems = problems_of(write_spec, GOOD)
    assert any("existing file" in p.message for p in problems)


@pytest.mark.parametrize("output, expect", [
    ('""', "output is empty; give the store's path"),
    ("$BASINPROBE_UNSET_FOLDER/out.zarr", "output names an unset environment variable"),
])
def test_an_output_that_names_no_place_is_refused(write_spec, monkeypatch, output, expect):
    monkeypatch.delenv("BASINPROBE_UNSET_FOLDER", raising=False)
    _, problems = problems_of(write_spec, GOOD.replace("output: out.zarr", f"output: {output}"))
    assert [p.path for p in problems] == [("output",)] and problems[0].message.startswith(expect)
    assert problems[0].mark.line == 8


def test_an_output_under_an_unknown_home_folder_is_refused(write_spec):
    _, problems = problems_of(write_spec, GOOD.replace("output: out.zarr", "output: ~no_such_user_here/x.zarr"))
    assert [p.path for p in problems] == [("output",)]
    assert problems[0].message.startswith("output names an unknown home folder ('~no_such_user_here/x.zarr')")


def test_true_is_not_a_repeat_of_one_but_a_wrong_type(write_spec):
    _, problems = problems_of(write_spec, GOOD + "sweep: {seed: [1, true]}\n")
    assert [p.message for p in problems] == ["expected integer, got True"]


def test_an_output_under_home_or_a_variable_goes_there(write_spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BASINPROBE_RESULTS", str(tmp_path / "elsewhere"))
    assert load_spec(write_spec(GOOD.replace("output: out.zarr", "output: ~/a.zarr"))).output == tmp_path / "home" / "a.zarr"
    spec = load_spec(write_spec(GOOD.replace("output: out.zarr", "output: $BASINPROBE_RESULTS/b.zarr")))
    assert spec.output == tmp_path / "elsewhere" / "b.zarr"


def test_duplicate_entry_names(write_spec):
    _, problems = problems_of(write_spec, GOOD.replace("  - {probe: evaluate}", "  - {probe: evaluate}\n  - {probe: evaluate}"))
    assert any("two probe entries are named 'evaluate'" in p.message for p in problems)


def test_sweep_values_are_validated_where_they_are_written(write_spec):
    _, problems = problems_of(write_spec, GOOD + "sweep:\n  train.optimizer.lr: [0.1, -1.0]\n")
    (problem,) = problems
    assert problem.mark.line == 10 and "out of range" in problem.message


def test_each_bad_value_of_a_long_sweep_is_named_at_its_line(write_spec):
    """Sweep values are checked against the schema of their own block (the model's, with its
    kind's `with:` schema; the top-level seed's), each at the line where it is written."""
    seeds = "\n".join(f"    - {s}" for s in [*range(300), -1])
    text = GOOD + f"sweep:\n  model.with.activation: [tanh, sigmoid]\n  seed:\n{seeds}\n"
    _, problems = problems_of(write_spec, text)
    assert len(problems) == 2
    activation, seed = sorted(problems, key=lambda p: p.mark.line)
    assert activation.mark.line == 10 and "sigmoid" in activation.message
    assert activation.path[:3] == ("model", "with", "activation")
    assert seed.mark.line == 12 + 300 and "out of range" in seed.message and seed.path == ("seed",)


def test_sweep_axis_named_after_a_sel_keyword_is_refused(write_spec):
    _, problems = problems_of(write_spec, GOOD + "sweep:\n  model.with.method: [1]\n")
    assert any("may not be named 'method'" in p.message for p in problems)


def test_cli_validate_exits_2_and_writes_nothing(write_spec, cli, tmp_path):
    path = write_spec(GOOD.replace("steps: 5", "steps: ten"))
    code, out, err = cli("validate", path)
    assert code == 2 and f"{path}:5:" in err
    code, out, err = cli("run", path)
    assert code == 2 and not (tmp_path / "out.zarr").exists()


def test_factory_that_does_not_import_is_a_spec_error(write_spec, cli, tmp_path):
    path = write_spec(GOOD.replace("kind: mlp, with: {in: 2, hidden: [4], out: 1}", 'factory: "no_such_module:make"'))
    for command in ("validate", "plan", "run"):   # validate builds the models too: it says what run would
        code, out, err = cli(command, path)
        assert code == 2 and "cannot import factory 'no_such_module:make'" in err and f"{path}:2:" in err, command
    assert not (tmp_path / "out.zarr").exists()


def test_a_sweep_value_that_makes_one_point_misfit_is_named(write_spec, cli):
    path = write_spec(GOOD + "sweep: {model.with.in: [2, 5]}\n")
    code, out, err = cli("validate", path)
    assert code == 2 and f"{path}:2:" in err and "at model: at sweep point in=5: the model cannot take" in err


def test_checkpoint_whose_shapes_do_not_match(write_spec, cli, tmp_path):
    import torch

    from basinprobe.runtime.models import make_mlp

    (tmp_path / "ckpt").mkdir()
    torch.save(make_mlp(**{"in": 2, "hidden": [5], "out": 1}).state_dict(), tmp_path / "ckpt" / "a.pt")
    text = GOOD.replace("train: {optimizer: {kind: sgd, lr: 1e-2}, steps: 5}\n", "").replace(
        "out: 1}}", "out: 1}, checkpoints: [ckpt/*.pt]}")
    code, out, err = cli("run", write_spec(text))
    assert code == 2 and "does not fit the model" in err and "0.weight" in err
    assert not (tmp_path / "out.zarr").exists()


def test_model_that_does_not_fit_the_data(write_spec, cli, tmp_path):
    code, out, err = cli("run", write_spec(GOOD.replace("in: 2, hidden", "in: 3, hidden")))
    assert code == 2 and "cannot take the data's inputs" in err
    assert not (tmp_path / "out.zarr").exists()


class RunsCode:
    """An object whose unpickling would call a function: a file holding it must not be loaded."""

    def __reduce__(self):
        return (print, ("this ran",))


def npz_with_too_few_targets(path):
    import numpy as np

    np.savez(path, X=np.zeros((20, 2)), y=np.zeros(15))


def pt_holding_code(path):
    import torch

    torch.save({"X": RunsCode()}, path)


@pytest.mark.parametrize("kind, write, expect", [
    ("npz", npz_with_too_few_targets, "X has 20 rows but y has 15; each example needs one target"),
    ("pt", pt_holding_code, "holds objects other than tensors, which are not loaded (loading them could run code)"),
    ("pt", lambda path: path.write_text("hello"), "is not a file written by torch.save"),
])
def test_a_data_file_that_cannot_be_used_is_a_spec_error(write_spec, cli, tmp_path, kind, write, expect):
    path = tmp_path / f"data.{kind}"
    write(path)
    text = GOOD.replace("{kind: teacher_student, with: {n: 20, in: 2}}", f"{{kind: {kind}, with: {{path: data.{kind}}}}}")
    code, out, err = cli("run", write_spec(text))
    assert code == 2 and expect in err and "Traceback" not in err and "this ran" not in out
    assert not (tmp_path / "out.zarr").exists()


def test_a_checkpoint_holding_code_is_refused(write_spec, cli, tmp_path):
    import torch

    (tmp_path / "ckpt").mkdir()
    torch.save({"0.weight": RunsCode()}, tmp_path / "ckpt" / "a.pt")
    text = GOOD.replace("train: {optimizer: {kind: sgd, lr: 1e-2}, steps: 5}\n", "").replace(
        "out: 1}}", "out: 1}, checkpoints: [ckpt/*.pt]}")
    code, out, err = cli("run", write_spec(text))
    assert code == 2 and "holds objects other than tensors, which are not loaded" in err
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("entry, expect", [
    ("{probe: langevin, with: {burn_in: 500, draws: 400}}", "burn_in (500) must be smaller than draws (400)"),
    ("{probe: langevin, with: {sampler: mala, batch_size: 8}}", "sampler mala needs full-batch gradients"),
    ("{probe: lottery_subspace, with: {dims: [2, 5000]}}", "dims: 5000 is larger than the model's 17 parameters"),
    ("{probe: lottery_subspace, with: {dims: [2], prune: {keep: [0, 0.5]}}}",
     "at probes.0.with.prune.keep.0: 0 is out of range: must be > 0"),
])
def test_a_with_block_its_probe_refuses_fails_validate_at_its_line(write_spec, cli, tmp_path, entry, expect):
    path = write_spec(GOOD.replace("{probe: evaluate}", entry))
    code, out, err = cli("validate", path)
    assert code == 2 and f"{path}:7:" in err and expect in err, err
    assert not (tmp_path / "out.zarr").exists()
