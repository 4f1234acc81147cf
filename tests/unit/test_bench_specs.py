"""Which rows the bench lists (preserve frontier, --extended ablations, mergekit peers) and its peer note."""

from __future__ import annotations

import inspect
import sys

import pytest

from model_tailor.bench import methods as M
from model_tailor.bench import peers
from model_tailor.bench.runner import peer_notes
from model_tailor.errors import ConfigError

INSTALL_NOTE = 'peers not run: mergekit is not installed (pip install -e ".[peers]")'


def test_without_mergekit_no_peer_rows_and_the_note_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mergekit", None)  # import mergekit -> ImportError; find_spec -> None
    assert not peers.is_available()
    for quick in (False, True):
        specs = M.method_specs(quick, "pipeline")
        assert not [s for s in specs if M.is_peer(s) or "mergekit" in s.method]
        assert peer_notes(quick, specs) == [INSTALL_NOTE]
    with pytest.raises(ConfigError, match="matches no row"):
        M.select_specs(M.method_specs(False, "pipeline"), ("mergekit*",))


def test_with_mergekit_full_variant_lists_the_peer_grid(monkeypatch):
    monkeypatch.setattr(peers, "is_available", lambda: True)
    monkeypatch.setattr(peers, "mergekit_version", lambda: "0.1.5")
    full = M.method_specs(False, "pipeline")
    rows = [s for s in full if M.is_peer(s)]
    expected = {(M.PEER_PREFIX + m, v) for m, values in M.PEER_GRID.items() for v in values}
    got = {(s.method, s.params["scale"] if s.density is None else s.density) for s in rows}
    assert got == expected
    assert {s.method for s in rows} == {"mergekit_ties", "mergekit_dare_ties", "mergekit_task_arithmetic"}
    assert all(s.params["mergekit"] == "0.1.5" for s in rows)
    assert all(s.params["seed"] == 0 for s in rows if s.method == "mergekit_dare_ties")
    assert all(s.density is None for s in rows if s.method == "mergekit_task_arithmetic")
    assert len({s.key() for s in full}) == len(full), "peer rows collide with other rows' cache keys"
    picked = M.select_specs(full, ("mergekit*",))
    assert [s.method for s in picked[:2]] == ["pretrained", "finetuned"] and picked[2:] == rows
    note = peer_notes(False, picked)
    assert len(note) == 1 and "mergekit 0.1.5" in note[0] and "mergekit_dare_ties" in note[0]
    assert peer_notes(False, M.select_specs(full, ("magnitude",))) == []  # left out by --methods: no note
    quick = M.method_specs(True, "pipeline")
    assert not [s for s in quick if M.is_peer(s)]
    assert peer_notes(True, quick) == ["peers not run: the mergekit rows run with --extended"]


def _preserve_rows(specs):
    return {
        (
            s.density,
            s.params["structure"],
            s.params["preserve"],
            s.params["lambda"],
            s.params.get("salience_from", "delta"),
        )
        for s in specs
        if s.method == M.PRESERVE_METHOD
    }


def test_extended_adds_only_the_preserve_ablations_to_the_full_variant():
    full, extended = M.method_specs(False, "pipeline"), M.method_specs(False, "pipeline", extended=True)
    frontier = {(d, "sparse", "user", 1.0, "delta") for d in (0.05, 0.10, 0.20, 1.0)}
    frontier |= {
        (0.05, "lowrank", "user", 1.0, "delta"),
        (0.10, "lowrank", "user", 1.0, "delta"),
        (0.10, "sparse+lowrank", "user", 1.0, "delta"),
        (0.10, "sparse", "self", 1.0, "delta"),
        (0.05, "lowrank", "self", 1.0, "delta"),
        (0.10, "lowrank", "self", 1.0, "delta"),
        (0.10, "lowrank", "self", 3.0, "delta"),
    }
    assert _preserve_rows(full) == frontier
    ablations = {
        (0.01, "sparse", "user", 1.0, "delta"),
        (0.10, "sparse", "user", 0.3, "delta"),
        (0.10, "sparse", "user", 3.0, "delta"),
        (0.05, "sparse+lowrank", "user", 1.0, "delta"),
        (1.0, "sparse", "self", 1.0, "delta"),
        (0.10, "sparse", "user", 1.0, "target"),
        (0.10, "sparse+lowrank", "self", 1.0, "delta"),
    }
    assert _preserve_rows(extended) == frontier | ablations
    others = [s for s in extended if s.method != M.PRESERVE_METHOD]
    assert others == [s for s in full if s.method != M.PRESERVE_METHOD]
    assert len({s.key() for s in extended}) == len(extended)
    quick = M.method_specs(True, "pipeline")
    assert _preserve_rows(M.method_specs(True, "pipeline", extended=True)) == _preserve_rows(quick)


def test_cli_rejects_quick_with_extended(tmp_path, capsys):
    from model_tailor.cli import main

    assert main(["bench", "--quick", "--extended", "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--extended" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_negative_fine_tune_seed(tmp_path, capsys):
    from model_tailor.cli import main

    assert main(["bench", "--ft-seed", "-1", "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ft-seed must be >= 0" in err[0]
    assert not (tmp_path / "out").exists()


def test_every_engine_gets_each_ablation_own_options():
    inputs = M.TailorInputs(*(None,) * 9)
    full = {s.method: s for s in M.method_specs(False, "pipeline") if s.method in M.MT_VARIANTS}
    assert set(full) == set(M.MT_VARIANTS)
    fields = {name: M.tailor_fields(spec, inputs) for name, spec in full.items()}
    plain = {
        "alpha": 0.8,
        "compensation": "obs",
        "guard": True,
        "sensitivity": "weight",
        "salience": "magnitude",
        "compensation_from": 0,
        "compensation_depth": 1.0,
    }
    assert fields["model_tailor"] == plain
    assert fields["mt_revert_sensitivity"]["sensitivity"] == "revert"
    assert fields["mt_official_sign"] == {
        "alpha": 0.8,
        "compensation": "official",
        "guard": False,
        "sensitivity": "weight",
        "salience": "magnitude",
        "compensation_from": 0,
        "compensation_depth": 1.0,
    }
    assert fields["mt_salience_only"]["alpha"] == 1.0 and fields["mt_sensitivity_only"]["alpha"] == 0.0
    assert fields["mt_fapm_salience"] == {**plain, "alpha": 1.0, "salience": "fapm"}
    assert fields["mt_salience_only_late"] == {**plain, "alpha": 1.0, "compensation_from": 18}
    assert fields["mt_fapm_salience_late"] == {**plain, "alpha": 1.0, "salience": "fapm", "compensation_from": 18}
    assert fields["mt_salience_only_deep25"] == {**plain, "alpha": 1.0, "compensation_depth": 0.25}
    assert fields["mt_salience_only_deep50"] == {**plain, "alpha": 1.0, "compensation_depth": 0.5}
    # the in-memory engine takes every one of those options by name (it gets them as ``**fields``)
    from model_tailor.bench.inmemory import InMemoryTailor

    sig = inspect.signature(InMemoryTailor.tailor)
    for spec in M.method_specs(False, "inmemory"):
        if spec.params.get("engine") == "inmemory":
            sig.bind(None, {}, {}, density=spec.density, **M.tailor_fields(spec, inputs))


def test_all_layers_pair_shares_the_pretrained_model_and_tunes_every_layer():
    from model_tailor.bench.models import BuildConfig

    default = BuildConfig()
    assert default.tuned_layers(30) == tuple(range(18, 30))
    every = default.all_layers()
    assert every.tuned_layers(30) == tuple(range(30)) and every.tuned_layers(4) == (0, 1, 2, 3)
    assert every.stage1_key() == default.stage1_key() and every.key() != default.key()
    assert BuildConfig(tune_last=50).tuned_layers(4) == (0, 1, 2, 3)


def test_new_post_hoc_baseline_rows_in_the_full_variant_only():
    full = M.method_specs(False, "pipeline")
    got = {(s.method, s.density) for s in full if s.method in ("fapm", "svd")}
    assert got == {(m, d) for m in ("fapm", "svd") for d in M.DENSITIES}
    assert [s.params for s in full if s.method == "lines"] == [{"alpha": 0.0, "beta": 1.0}]
    assert [s.params["k"] for s in full if s.method == "revert_first_k"] == list(M.REVERT_K)
    assert not {s.method for s in M.method_specs(True, "pipeline")} & {"fapm", "svd", "lines", "revert_first_k"}
    assert len({s.key() for s in full}) == len(full)


def test_cli_rejects_zero_resamples(tmp_path, capsys):
    from model_tailor.cli import main

    assert main(["bench", "--resamples", "0", "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resamples" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_methods_glob_over_the_label_picks_one_setting():
    full = M.method_specs(False, "pipeline")
    picked = M.select_specs(full, ("*preserve=self*", "*preserve=user,structure=lowrank]"))
    chosen = [s for s in picked if s.method not in ("pretrained", "finetuned")]
    assert {(s.density, s.params["preserve"], s.params["structure"]) for s in chosen} == {
        (0.10, "self", "sparse"),
        (0.05, "self", "lowrank"),
        (0.10, "self", "lowrank"),
        (0.05, "user", "lowrank"),
        (0.10, "user", "lowrank"),
    }
    assert [s.method for s in picked[:2]] == ["pretrained", "finetuned"]
    assert M.select_specs(full, ("magnitude",)) == [
        s for s in full if s.method in ("pretrained", "finetuned", "magnitude")
    ]
