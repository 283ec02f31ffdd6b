"""Spectrum scan on tiny saved models: SNR per matrix, names that exist, the YAML fragment, training freeze."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dolphin_forge.config import SPECTRAL_MODULE_TYPES, load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.freeze import apply_unfrozen_parameters
from dolphin_forge.spectral import scan as scan_module
from dolphin_forge.spectral.scan import scan_model, select_top
from dolphin_forge.spectral.thresholds import gavish_donoho_threshold
from dolphin_forge.spectral.unfrozen import merge_into_config, unfrozen_parameters, unfrozen_parameters_yaml
from tests.spectral.reference import spectrum_reference
from tests.tiny import build_tiny_model

TYPES = SPECTRAL_MODULE_TYPES  # the default: attention q/k/v/o and MLP gate/up/down


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, tokenizer) -> Path:
    """Untied embeddings, 4 layers: two selected per type at 50%."""
    return save(build_tiny_model(tokenizer, num_hidden_layers=4, seed=1), tmp_path_factory.mktemp("m") / "untied")


@pytest.mark.parametrize("block", [1024, 24])
def test_scan_matches_numpy_reference_for_every_matrix(four_layer_dir, block, monkeypatch):
    """Also when each matrix is read from safetensors in 24-row/-column blocks (tiny matrices fit one 1024-block)."""
    monkeypatch.setattr(scan_module, "GRAM_BLOCK", block)
    scan = scan_model(four_layer_dir, TYPES, workers=2)
    weights = load_file(four_layer_dir / "model.safetensors")
    assert len(scan.matrices) == 4 * 7
    for m in scan.matrices:
        ref_snr, ref_threshold, s = spectrum_reference(weights[m.module + ".weight"].numpy())
        assert m.snr == pytest.approx(ref_snr, rel=1e-6), m.module
        assert m.threshold == pytest.approx(ref_threshold, rel=1e-6)
        assert m.signal_rank == int((s > ref_threshold).sum())
        assert m.module_type in TYPES and m.module == f"model.layers.{m.layer}.{m.module_type}"


def test_selection_yaml_parses_back_and_unfreezes_exactly_the_listed_matrices(four_layer_dir, tokenizer):
    scan = scan_model(four_layer_dir, TYPES)
    text = unfrozen_parameters_yaml(scan, 50)
    lines = text.splitlines()
    assert lines[:3] == ["unfrozen_parameters:", "- ^lm_head.weight$", "- ^model.embed_tokens.weight$"]
    assert [l for l in lines if l.startswith("#")] == [f"# {t} layers" for t in sorted(TYPES)]
    patterns = yaml.safe_load(text)["unfrozen_parameters"]
    assert patterns == unfrozen_parameters(scan, 50)
    # each section lists the two highest-SNR matrices of its type, highest first
    for module_type, chosen in select_top(scan, 50).items():
        ranked = sorted((m for m in scan.matrices if m.module_type == module_type), key=lambda m: -m.snr)
        assert [m.module for m in chosen] == [m.module for m in ranked[:2]]
        section = lines[lines.index(f"# {module_type} layers") + 1 :][:2]
        assert section == [f"- {m.module}" for m in ranked[:2]]

    config = load_config(data={"unfrozen_parameters": patterns}).config
    model = build_tiny_model(tokenizer, num_hidden_layers=4, seed=1)
    apply_unfrozen_parameters(model, config.unfrozen_parameters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"lm_head.weight", "model.embed_tokens.weight"} | {
        m.module + ".weight" for group in select_top(scan, 50).values() for m in group
    }
    assert trainable == expected
    assert len(expected) == 2 + 7 * 2


def test_tied_embeddings_emit_only_names_that_exist(tmp_path, tokenizer):
    folder = save(build_tiny_model(tokenizer, tie_word_embeddings=True), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    scan = scan_model(folder, TYPES)
    patterns = unfrozen_parameters(scan, 50)
    assert patterns[0] == "^model.embed_tokens.weight$"
    assert not any("lm_head" in p for p in patterns)
    names = set(load_file(folder / "model.safetensors"))
    for pattern in patterns:
        assert pattern.strip("^$") in names or pattern + ".weight" in names


def test_gavish_donoho_mode_and_layer_filter(four_layer_dir):
    scan = scan_model(four_layer_dir, ["q_proj", "mlp.down_proj"], mode="gavish_donoho", layers=[1, 3])
    assert scan.threshold == "gavish_donoho"
    assert sorted((m.layer, m.module_type) for m in scan.matrices) == [
        (1, "mlp.down_proj"), (1, "self_attn.q_proj"), (3, "mlp.down_proj"), (3, "self_attn.q_proj")
    ]
    weights = load_file(four_layer_dir / "model.safetensors")
    for m in scan.matrices:
        s = np.linalg.svd(weights[m.module + ".weight"].numpy().astype(np.float64), compute_uv=False)
        threshold = gavish_donoho_threshold(torch.from_numpy(s), *m.shape)
        snr = s[s > threshold].sum() / (s[s <= threshold].sum() or 1.0) / s.max()
        assert m.threshold == pytest.approx(threshold, rel=1e-6), m.module
        assert m.snr == pytest.approx(snr, rel=1e-6), m.module
        assert m.signal_rank == int((s > threshold).sum())


def test_an_all_zero_matrix_scans_as_snr_zero(tmp_path, tokenizer):
    model = build_tiny_model(tokenizer, seed=3)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()
    folder = save(model, tmp_path / "zeroed")
    for mode in ("marchenko_pastur", "gavish_donoho"):
        scan = scan_model(folder, TYPES, mode=mode)
        zeroed = [m for m in scan.matrices if m.module == "model.layers.1.mlp.up_proj"]
        assert [(m.snr, m.sigma_max, m.signal_rank) for m in zeroed] == [(0.0, 0.0, 0)]
        assert len(scan.matrices) == 2 * 7  # the scan went on past it


def test_unknown_module_type_and_pickle_only_folder_are_clear_errors(four_layer_dir, tmp_path):
    with pytest.raises(
        ForgeError, match=r"spectrum\.module_types: mlp\.gate_prj match no 2-D layer weight.*has: mlp\.down_proj"
    ):
        scan_model(four_layer_dir, ["mlp.gate_prj"])
    with pytest.raises(ForgeError, match=r"laser\.layers: \[\] selects no layer .*layers 0\.\.3"):
        scan_model(four_layer_dir, TYPES, layers=[], section="laser")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ForgeError, match="no .safetensors weights.*pytorch_model.bin"):
        scan_model(tmp_path, TYPES)
    with pytest.raises(ForgeError, match=r"spectrum\.top_percent = 150: expected a number <= 100"):
        load_config(data={"spectrum": {"top_percent": 150}})


def test_merge_into_config_replaces_only_the_block(four_layer_dir, tmp_path):
    scan = scan_model(four_layer_dir, TYPES)
    fragment = unfrozen_parameters_yaml(scan, 25)
    config = tmp_path / "train.yml"
    config.write_text(
        "base_model: default  # keep me\n"
        "unfrozen_parameters:\n- ^lm_head.weight$\n# old layers\n- model.layers.9.mlp.up_proj\n"
        "# a comment about the next key\n"
        "learning_rate: 1e-5\n"
    )
    merge_into_config(config, fragment)
    text = config.read_text()
    assert "base_model: default  # keep me" in text and "# a comment about the next key" in text
    assert "model.layers.9.mlp.up_proj" not in text and "# old layers" not in text
    loaded = load_config(config).config
    assert loaded.unfrozen_parameters == unfrozen_parameters(scan, 25)
    assert loaded.learning_rate == 1e-5

    bare = tmp_path / "bare.yml"
    bare.write_text("base_model: default\n")
    merge_into_config(bare, fragment)
    assert load_config(bare).config.unfrozen_parameters == unfrozen_parameters(scan, 25)


def test_merge_follows_a_symlink_and_keeps_the_file_mode(four_layer_dir, tmp_path):
    fragment = unfrozen_parameters_yaml(scan_model(four_layer_dir, TYPES), 25)
    real = tmp_path / "configs" / "train.yml"
    real.parent.mkdir()
    real.write_text("base_model: default\nlearning_rate: 1e-5\n")
    real.chmod(0o644)
    link = tmp_path / "train.yml"
    link.symlink_to(real)
    merge_into_config(link, fragment)
    assert link.is_symlink() and link.resolve() == real.resolve()  # the link is still a link to the same file
    assert yaml.safe_load(real.read_text())["unfrozen_parameters"] == yaml.safe_load(fragment)["unfrozen_parameters"]
    assert oct(real.stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's private 0600
    assert sorted(os.listdir(real.parent)) == ["train.yml"]  # no temporary file left behind
    real.chmod(0o664)
    merge_into_config(real, fragment)
    assert oct(real.stat().st_mode & 0o777) == oct(0o664)


def test_cli_spectrum_writes_all_outputs(four_layer_dir, tmp_path):
    from dolphin_forge.cli import app

    config = tmp_path / "cfg.yml"
    config.write_text(f"base_model: {four_layer_dir}\noutput_dir: {tmp_path / 'out'}\n")
    train = tmp_path / "train.yml"
    train.write_text("base_model: default\nlearning_rate: 2e-5\n")
    result = CliRunner().invoke(app, ["spectrum", str(config), "--top-percent", "50", "--write-config", str(train)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "spectrum"
    assert (folder / "snr_heatmap.png").stat().st_size > 1000
    assert len(__import__("json").loads((folder / "snr.json").read_text())["matrices"]) == 28
    fragment = yaml.safe_load((folder / "unfrozen_parameters_top50.yaml").read_text())["unfrozen_parameters"]
    assert load_config(train).config.unfrozen_parameters == fragment
    bad = CliRunner().invoke(app, ["spectrum", str(config), "--top-percent", "0"])
    assert isinstance(bad.exception, ForgeError) and "--top-percent 0" in str(bad.exception)


def test_merge_into_the_dolphin_2_9_3_card_config_keeps_everything_else(four_layer_dir, tmp_path):
    card = Path(__file__).resolve().parents[2] / "examples" / "dolphin-2.9.3-mistral-nemo-12b.yml"
    if not card.is_file():
        pytest.skip(f"{card} not found")
    target = tmp_path / "nemo.yml"
    target.write_text(card.read_text())
    scan = scan_model(four_layer_dir, TYPES)
    merge_into_config(target, unfrozen_parameters_yaml(scan, 50))
    before, after = yaml.safe_load(card.read_text()), yaml.safe_load(target.read_text())
    assert after.pop("unfrozen_parameters") == unfrozen_parameters(scan, 50)
    before.pop("unfrozen_parameters")
    assert after == before
    assert "# mlp.down_proj layers" in target.read_text() and "model.layers.37.mlp.down_proj" not in target.read_text()


@pytest.mark.parametrize("key", ["'unfrozen_parameters'", '"unfrozen_parameters"'])
def test_a_quoted_key_is_replaced_not_written_twice(four_layer_dir, tmp_path, key):
    fragment = unfrozen_parameters_yaml(scan_model(four_layer_dir, TYPES), 25)
    config = tmp_path / "train.yml"
    config.write_text(f"base_model: default\n{key}:\n- model.layers.9.mlp.up_proj\nlearning_rate: 5e-6\n")
    merge_into_config(config, fragment)
    text = config.read_text()
    assert text.count("unfrozen_parameters") == 1 and "model.layers.9" not in text
    assert yaml.safe_load(text) == {"base_model": "default", "learning_rate": "5e-6", **yaml.safe_load(fragment)}


def test_a_merge_that_would_write_a_key_twice_is_refused(four_layer_dir, tmp_path):
    fragment = unfrozen_parameters_yaml(scan_model(four_layer_dir, TYPES), 25)
    config = tmp_path / "train.yml"
    original = "base_model: default\n!!str unfrozen_parameters:\n- model.layers.0.mlp.down_proj\n"
    config.write_text(original)
    with pytest.raises(ForgeError, match=r"merging would write the top-level key unfrozen_parameters twice"):
        merge_into_config(config, fragment)
    assert config.read_text() == original


@pytest.mark.parametrize(
    "target, expected",
    [
        ("missing.yml", "config file not found"),
        (".", "is a folder; expected a YAML config file"),
        ("list.yml", "expected a mapping of keys to values at the top level"),
    ],
)
def test_write_config_is_checked_before_the_scan(four_layer_dir, tmp_path, monkeypatch, target, expected):
    from dolphin_forge.spectral import stages

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned before checking --write-config")

    monkeypatch.setattr(stages, "scan_matrices", no_scan)
    (tmp_path / "list.yml").write_text("- a\n")
    config = load_config(data={"base_model": str(four_layer_dir), "output_dir": str(tmp_path / "out")}).config
    with pytest.raises(ForgeError, match=rf"^--write-config: {tmp_path / target}: {expected}$"):
        stages.run_spectrum(config, write_config=tmp_path / target)


def test_write_config_in_a_read_only_folder_is_refused_up_front(tmp_path, monkeypatch):
    from dolphin_forge.spectral.unfrozen import read_merge_target

    config = tmp_path / "train.yml"
    config.write_text("base_model: default\n")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ForgeError, match=rf"its folder {tmp_path} is not writable"):
        read_merge_target(config)


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory) -> Path:
    """Four down_proj matrices but two q_proj: a share can keep some of one type and none of the other."""
    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(24, 16, generator=generator) for i in range(4)}
    tensors |= {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(16, 16, generator=generator) for i in (0, 1)}
    folder = tmp_path_factory.mktemp("uneven")
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_a_share_that_keeps_no_matrix_of_a_type_warns_and_of_any_type_is_refused(uneven_dir, tmp_path, monkeypatch):
    from dolphin_forge.spectral import stages

    spectrum = {"module_types": ["mlp.down_proj", "self_attn.q_proj"], "top_percent": 30}
    data = {"base_model": str(uneven_dir), "output_dir": str(tmp_path), "spectrum": spectrum}
    outputs = stages.run_spectrum(load_config(data=data).config)
    assert outputs.warnings == [
        "spectrum.top_percent = 30 selects no matrix of self_attn.q_proj; 50 or more selects one of each module type"
    ]
    assert {t: len(group) for t, group in select_top(outputs.scan, 30).items()} == {
        "mlp.down_proj": 1, "self_attn.q_proj": 0  # the reference count is unchanged
    }
    assert stages.run_spectrum(load_config(data=data).config, top_percent=50).warnings == []

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned before checking the share")

    monkeypatch.setattr(stages, "scan_matrices", no_scan)
    expected = r"selects no matrix of any module type; expected 50 or more \(one of each\)$"
    with pytest.raises(ForgeError, match=rf"^--top-percent 20: {expected}"):
        stages.run_spectrum(load_config(data=data).config, top_percent=20)
    with pytest.raises(ForgeError, match=rf"^spectrum\.top_percent = 20: {expected}"):
        stages.run_spectrum(load_config(data={**data, "spectrum": {**spectrum, "top_percent": 20}}).config)
