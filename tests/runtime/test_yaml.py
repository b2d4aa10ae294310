import math

import pytest
import yaml

from basinprobe.runtime.yamlio import load_yaml, mark_of


def test_exponent_floats_are_numbers_as_in_yaml_1_2():
    doc = load_yaml("lr: 1e-3\nbig: 2E+5\nneg: -1.5e-2\n")
    assert doc == {"lr": 0.001, "big": 200000.0, "neg": -0.015}
    assert all(isinstance(v, float) for v in doc.values())


def test_yaml_1_1_booleans_stay_strings():
    doc = load_yaml("a: on\nb: no\nc: yes\nd: true\ne: False\n")
    assert doc == {"a": "on", "b": "no", "c": "yes", "d": True, "e": False}


def test_special_floats_and_ints():
    doc = load_yaml("a: .inf\nb: -.inf\nc: .nan\nd: 0x1f\ne: 0o17\nf: 12\n")
    assert doc["a"] == math.inf and doc["b"] == -math.inf and math.isnan(doc["c"])
    assert (doc["d"], doc["e"], doc["f"]) == (31, 15, 12)


def test_marks_point_at_line_and_column():
    doc = load_yaml("model:\n  with:\n    hidden: [1, 2]\n", "s.yaml")
    mark = mark_of(doc, ("model", "with", "hidden", 1))
    assert (mark.file, mark.line, mark.column) == ("s.yaml", 3, 17)


def test_duplicate_keys_are_errors():
    with pytest.raises(yaml.YAMLError, match="duplicate key 'a'"):
        load_yaml("a: 1\na: 2\n")


def test_unsafe_tags_are_refused():
    with pytest.raises(yaml.YAMLError):
        load_yaml("a: !!python/object/apply:os.system ['true']\n")
