"""The one options system: typed values from YAML and the command line, lists, nesting, clear errors."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from relist.cli import COMMANDS, main, resolve
from relist.config import (
    ConfigError,
    _element,
    _flat_fields,
    _optional,
    add_arguments,
    build,
    from_mapping,
    load_yaml,
    option,
    to_mapping,
)
from relist.data.prepare import PrepareConfig
from relist.last import LastConfig
from relist.serve.settings import ServeSettings
from relist.sim.cascade_env import CascadeEnvConfig


@dataclass
class Inner:
    rate: float = option(0.5, help="a rate")
    names: tuple[str, ...] = option(("a",), help="names", choices=("a", "b", "c"))


@dataclass
class Outer:
    out: Path = option(help="where")
    epochs: int = option(3, help="passes")
    verify: bool = option(False, help="check")
    sizes: tuple[int, ...] = option((5, 2), help="sizes")
    inner: Inner = option(Inner(), help="nested")
    flat: LastConfig = option(LastConfig(), help="flattened", flatten=True)


def parse(argv: list[str]) -> Outer:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Outer)
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))  # raise instead of exiting
    return build(Outer, parser.parse_args(argv), parser)


def test_command_line_values_are_parsed_by_type_lists_by_commas_and_nesting_by_prefix():
    cfg = parse(["--out", "x", "--epochs", "7", "--sizes", "9,4,1", "--inner-rate", "1e-3", "--inner-names", "b,c",
                 "--mode", "serial", "--steps", "1,2", "--verify"])  # fmt: skip
    assert cfg.out == Path("x") and cfg.epochs == 7 and cfg.verify is True and cfg.sizes == (9, 4, 1)
    assert cfg.inner == Inner(rate=1e-3, names=("b", "c"))
    assert cfg.flat.mode == "serial" and cfg.flat.steps == (1.0, 2.0)
    assert parse(["--out", "x", "--steps", ""]).flat.steps == ()
    for argv, message in (
        (["--epochs", "7"], "missing required option(s): --out"),
        (["--out", "x", "--epochs", "seven"], "--epochs: expected int, got 'seven'"),
        (["--out", "x", "--inner-names", "b,z"], "'z' is not one of a, b, c"),
        (["--out", "x", "--mode", "fast"], "'fast' is not one of parallel, serial, greedy"),
        (["--out", "x", "--sizes", "3,x"], "--sizes[1]: expected int"),
    ):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            parse(argv)


def test_yaml_takes_lists_nested_mappings_and_flattened_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: o\nsizes: [8, 3]\ninner: {rate: 2e-2, names: [c]}\nmode: greedy\n")
    cfg = load_yaml(Outer, path)
    assert cfg.sizes == (8, 3) and cfg.inner == Inner(rate=0.02, names=("c",)) and cfg.flat.mode == "greedy"
    path.write_text("out: o\nflat: {offsets: pointer}\n")
    assert load_yaml(Outer, path).flat.offsets == "pointer"
    # what to_mapping writes, from_mapping reads back
    assert from_mapping(Outer, to_mapping(cfg)) == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ('out: o\nepochs: "3"\n', "epochs: expected int, got '3'"),
        ('out: o\nverify: "no"\n', "verify: expected bool, got 'no'"),
        ("out: o\nepochs: 2.5\n", "epochs: expected int, got 2.5"),
        ("out: o\nepochs: true\n", "epochs: expected int, got True"),
        ("out: o\nsizes: 4\n", "sizes: expected a list of int"),
        ("out: o\ninner: 3\n", "inner: expected a mapping of Inner options"),
        ("out: o\ninner: {rat: 1}\n", r"unknown option\(s\) \['rat'\]"),
        ("out: o\nepochs: 1\nepoch: 2\n", r"unknown option\(s\) \['epoch'\]"),
        ("out: o\ninner: {rate: .nan}\n", "expected a finite number"),
        ("a: &x [1, 2]\nout: o\nsizes: *x\n", "anchors"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("out: [unclosed\n", "c.yaml"),
    ],
)
def test_yaml_mistakes_are_errors_naming_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml(Outer, path)
    assert str(path) in str(err.value)


def test_every_command_reads_yaml_lists(tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text(f"source: synthetic\nout: {tmp_path / 'd'}\nn_lists: 300\nsplits: [0.4, 0.4, 0.1, 0.1]\n")
    assert main(["data", "prepare", "synthetic", "--config", str(config)]) == 0
    config.write_text(f"out: {tmp_path / 'e'}\nn_lists: 300\nsplits: [0.5, 0.5, 0.1]\n")
    assert main(["data", "prepare", "synthetic", "--config", str(config)]) == 2
    assert "splits must be four non-negative numbers" in capsys.readouterr().err


def test_the_cascade_environment_and_the_service_use_the_same_loader(tmp_path):
    env = tmp_path / "env.yaml"
    env.write_text("source: synthetic\nsizes: [50, 10, 5]\nn_items: 300\n")
    assert load_yaml(CascadeEnvConfig, env).sizes == (50, 10, 5)
    env.write_text("source: synthetic\nsizes: [50, 10, 5]\nn_item: 300\n")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['n_item'\]"):
        load_yaml(CascadeEnvConfig, env)
    serve = tmp_path / "serve.yaml"
    serve.write_text("run: r\nmode: serial\nserial_steps: 4\nwindow_ms: 5\n")
    settings = load_yaml(ServeSettings, serve)
    assert settings.last_config() == LastConfig(mode="serial", serial_steps=4) and settings.window_ms == 5.0
    serve.write_text("run: r\nselect: oracle\n")
    with pytest.raises(ConfigError, match="select must be 'evaluator'"):
        load_yaml(ServeSettings, serve)
    assert PrepareConfig(source="synthetic", out=Path("x")).splits == (0.4, 0.4, 0.1, 0.1)


def test_the_command_line_wins_over_yaml_for_flattened_options_too(tmp_path):
    serve = tmp_path / "serve.yaml"
    serve.write_text("run: r\nmode: serial\nsteps: [3, 4]\nbatched: true\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServeSettings, ("run",))
    args = parser.parse_args(["r", "--config", str(serve), "--mode", "greedy", "--steps", "1,2", "--no-batched"])
    settings = build(ServeSettings, args, parser)
    assert settings.last.mode == "greedy" and settings.last.steps == (1.0, 2.0) and settings.last.batched is False
    serve.write_text("run: r\nmode: serial\nlast: {mode: greedy}\n")
    with pytest.raises(ConfigError, match=r"\['mode'\] given both at the top and under last"):
        load_yaml(ServeSettings, serve)
    serve.write_text("run: r\nmdoe: serial\n")
    with pytest.raises(ConfigError, match="valid: .*'mode'"):  # the flattened names are listed too
        load_yaml(ServeSettings, serve)


def test_command_line_mistakes_name_the_option_even_with_a_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'u'}\nseeds: 1\n")
    env = tmp_path / "env.yaml"
    env.write_text("source: synthetic\n")
    with pytest.raises(SystemExit):
        main(["experiment", "unexrl", "--config", str(config), "--env", str(env), "--methods", "cem,bogus"])
    err = capsys.readouterr().err
    assert "--methods: 'bogus' is not one of" in err and str(config) not in err
    with pytest.raises(SystemExit):
        main(["serve", "run", "--mode", "fast"])
    assert "--mode: 'fast' is not one of" in capsys.readouterr().err


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: o\nepochs: 2\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"\['epochs'\] given more than once"):
        load_yaml(Outer, path)


# list options whose entries have a form of their own
FORMS = {"model_args": ["prm: d_model=8", "dlcm: hidden=8"], "offset_steps": ["0/6", "1/2"]}


def _sample(element: type, choices, name: str = "") -> list:
    """Two values an option of ``element`` accepts, as YAML would hold them."""
    if name in FORMS:
        return FORMS[name]
    if choices:
        return list(choices[:2])
    return {int: [3, 1], float: [0.5, 0.25], str: ["a", "b"], Path: ["p", "q"], bool: [True, False]}[element]


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_list_option_reads_a_yaml_list_as_its_comma_list(path, tmp_path):
    """Wherever the command line takes a comma list, a --config file takes a YAML list, with the same result
    (the command's other required options given in the file, its positionals on the command line)."""
    cls, positional = resolve(COMMANDS[path].config), COMMANDS[path].positional
    words, base, lists = [], {}, []
    for dest, names, f, tp in _flat_fields(cls):
        base_type = _optional(tp)[0]
        element = _element(base_type)
        sample = _sample(element or base_type, f.metadata.get("choices"), f.name)
        if dest in positional:
            words += [str(v) for v in (sample if element else sample[:1])]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            base[dest] = sample if element else sample[0]
        elif element is not None:
            lists.append((dest, names, element, sample))

    def built(values: dict, argv: list[str]):
        parser = argparse.ArgumentParser()
        add_arguments(parser, cls, positional)
        parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(values))
        return build(cls, parser.parse_args([*words, "--config", str(config), *argv]), parser)

    for dest, names, element, sample in lists:
        nested = target = {**base}
        for name in names[:-1]:
            target = target.setdefault(name, {})
        target[names[-1]] = sample
        flag = "--" + dest.replace("__", "-").replace("_", "-")
        from_file, from_text = built(nested, []), built(base, [flag, ",".join(map(str, sample))])
        for name in names:
            from_file, from_text = getattr(from_file, name), getattr(from_text, name)
        assert from_file == from_text == tuple(element(v) for v in sample), dest
