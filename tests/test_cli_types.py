"""``ebkernels._cli.comma_list``: the comma-separated argument type every command line shares."""
import argparse

import pytest

from ebkernels._cli import comma_list, positive_int


def test_parses_converts_and_drops_empty_parts():
    assert comma_list()(" a, b,,c ") == ["a", "b", "c"]
    assert comma_list(int)("64,256") == [64, 256]
    assert comma_list(positive_int)("1,2") == [1, 2]
    assert comma_list(accepted=("x", "y"))("y,x") == ["y", "x"]


@pytest.mark.parametrize("kind, text, message", [
    (comma_list(accepted=("memory", "kernels")), "memory,nope,bad", "unknown ['nope', 'bad']; accepted: memory, kernels"),
    (comma_list(int, what="ints"), "1,x", "'x' is not valid; accepted: comma-separated ints"),
    (comma_list(positive_int, what="positive ints"), "4,0", "'0' is not valid"),
    (comma_list(), " , ", "empty list"),
])
def test_bad_parts_name_themselves_and_what_is_accepted(kind, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kind(text)


def test_argparse_reports_the_argument(capsys):
    ap = argparse.ArgumentParser(prog="p")
    ap.add_argument("--sections", type=comma_list(accepted=("a", "b")), default=["a", "b"])
    assert ap.parse_args([]).sections == ["a", "b"]
    with pytest.raises(SystemExit):
        ap.parse_args(["--sections", "a,z"])
    assert "argument --sections: unknown ['z']; accepted: a, b" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--batch", "0"), ("--batch", "-1"), ("--sms", "0"), ("--jobs", "0")])
def test_aot_plan_numbers_must_be_positive(capsys, flag, value):
    # --batch 0 / --sms 0 were a ZeroDivisionError traceback (issue 24.3): now argparse's usage error
    from ebkernels import aot

    with pytest.raises(SystemExit) as exit_:
        aot.main(["--plan", "vgg16", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: invalid positive_int value: '{value}'" in capsys.readouterr().err
