"""LASER-RMT: truncation ranks, exact restore of rejected changes, the exact layer-input cache, the stage."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from dolphin_forge.config import SPECTRAL_MODULE_TYPES, LaserConfig, load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.perplexity import perplexity_of_ids, tokenize_text
from dolphin_forge.models.load import load_model
from dolphin_forge.spectral import laser as laser_module
from dolphin_forge.spectral import stages
from dolphin_forge.spectral.laser import Scorer, laser_search, low_rank, order_candidates
from dolphin_forge.spectral.report import laser_summary
from dolphin_forge.spectral.scan import scan_model
from dolphin_forge.spectral.stages import run_laser
from dolphin_forge.spectral.thresholds import gavish_donoho_threshold
from tests.spectral.reference import planted
from tests.tiny import build_tiny_model

TYPES = SPECTRAL_MODULE_TYPES  # the default: attention q/k/v/o and MLP gate/up/down


def own_text(n_sentences: int = 120) -> str:
    """Deterministic prose written for these tests."""
    rng = np.random.default_rng(0)
    words = "the river model layer signal noise small large quickly carefully reads writes counts every".split()
    return " ".join(" ".join(rng.choice(words, size=9)).capitalize() + "." for _ in range(n_sentences))


@pytest.fixture
def tiny(tokenizer):
    model = build_tiny_model(tokenizer, num_hidden_layers=3, seed=2)
    model.eval()
    return model


@pytest.fixture(scope="module")
def ids(tokenizer) -> torch.Tensor:
    return tokenize_text(tokenizer, own_text(), max_tokens=192)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120)])
def test_low_rank_keeps_exactly_the_singular_values_above_the_reference_threshold(shape):
    weight = planted(*shape, rank=6, seed=4)
    reduced, before, after = low_rank(torch.from_numpy(weight), "marchenko_pastur")
    u, s, vh = np.linalg.svd(weight, full_matrices=False)
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    k = int((s > sigma * (1 + np.sqrt(80 / 120))).sum())
    assert (before, after) == (80, k) and 6 <= k < 80
    np.testing.assert_allclose(reduced.numpy(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-10)
    _, _, gd = low_rank(torch.from_numpy(weight), "gavish_donoho")
    assert gd == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_before_detects_an_exactly_rank_deficient_matrix(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(100, 5, generator=generator) @ torch.randn(5, 60, generator=generator)).to(dtype)
    _, before, after = low_rank(weight, "marchenko_pastur")
    assert before == 5 and after >= before  # the search logs "no singular value below threshold" and skips it


def test_bf16_weights_are_truncated_not_skipped(tokenizer, ids, tmp_path):
    """A rank rule at bf16's eps (2^-7) called every matrix with a side >= 128 rank 0, so nothing was ever tried."""
    model = build_tiny_model(tokenizer, num_hidden_layers=3, seed=2).to(torch.bfloat16).eval()
    folder = tmp_path / "bf16"
    model.save_pretrained(folder, safe_serialization=True)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    scan = scan_model(folder, ["mlp.up_proj", "mlp.down_proj"])
    result = laser_search(model, ids, scan.matrices, LaserConfig(max_length=64, batch_size=2, max_changes=6))
    assert len(result.attempts) == 6 and result.kept
    params = dict(model.named_parameters())
    for attempt in result.attempts:
        assert attempt.rank_before == 64 and attempt.rank_after < 64 and attempt.perplexity_after is not None
        name = attempt.module + ".weight"
        expected = low_rank(original[name], "marchenko_pastur")[0] if attempt.kept else original[name]
        assert params[name].dtype == torch.bfloat16 and torch.equal(params[name], expected), name


def test_prefix_cache_scores_exactly_like_a_full_forward(tiny, ids):
    scorer = Scorer(tiny, ids, max_length=64, batch_size=2)
    assert scorer.cached is not None  # verified exact on this architecture
    assert scorer.baseline.nll == perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2).nll
    calls = []
    hook = tiny.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    weight = tiny.model.layers[2].mlp.up_proj.weight
    with torch.no_grad():
        weight.mul_(0.5)
    cached = scorer.score(2)
    assert calls == []  # layer 0 was not run
    hook.remove()
    full = perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2)
    assert cached.nll == pytest.approx(full.nll, rel=1e-12, abs=0) and cached.tokens == full.tokens
    scorer.keep()  # the layer-2 change is kept; a later change at layer 1 must see it
    with torch.no_grad():
        tiny.model.layers[1].self_attn.q_proj.weight.mul_(0.0)
    again = scorer.score(1)
    assert again.nll == pytest.approx(
        perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2).nll, rel=1e-12
    )


def test_search_keeps_only_non_worsening_changes_and_restores_rejected_ones_bit_for_bit(tiny, ids, tmp_path, tokenizer):
    folder = tmp_path / "m"
    tiny.save_pretrained(folder, safe_serialization=True)
    original = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    scan = scan_model(folder, TYPES)
    settings = LaserConfig(max_length=64, batch_size=2, max_changes=21)
    result = laser_search(tiny, ids, order_candidates(scan.matrices, "lowest_snr", TYPES), settings)
    assert len(result.attempts) == 21 and result.stopped_by == "candidates exhausted"
    params = dict(tiny.named_parameters())
    current = result.baseline.perplexity
    for attempt in result.attempts:
        assert attempt.perplexity_before == pytest.approx(current)
        weight = params[attempt.module + ".weight"]
        if attempt.kept:
            assert attempt.perplexity_after <= attempt.perplexity_before
            current = attempt.perplexity_after
            assert torch.equal(weight, low_rank(original[attempt.module + ".weight"], "marchenko_pastur")[0])
        else:
            assert attempt.perplexity_after is None or attempt.perplexity_after > attempt.perplexity_before
            assert torch.equal(weight, original[attempt.module + ".weight"])  # bit-identical restore
    assert result.final.perplexity == pytest.approx(current)
    # the final model really has the reported perplexity (so the cached scoring was exact)
    assert result.final.nll == pytest.approx(
        perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2).nll, rel=1e-12
    )
    # the same search without the layer-input cache makes the same decisions
    fresh = build_tiny_model(tokenizer, num_hidden_layers=3, seed=2).eval()
    plain = laser_search(fresh, ids, order_candidates(scan.matrices, "lowest_snr", TYPES), settings, prefix_cache=False)
    assert [a.kept for a in plain.attempts] == [a.kept for a in result.attempts]
    assert plain.final.nll == pytest.approx(result.final.nll, rel=1e-12)


def test_a_forced_rejection_restores_the_weight_bit_for_bit(tiny, ids, monkeypatch, tmp_path):
    folder = tmp_path / "m"
    tiny.save_pretrained(folder, safe_serialization=True)
    scan = scan_model(folder, ["mlp.down_proj"], layers=[1])
    name = "model.layers.1.mlp.down_proj.weight"
    before = dict(tiny.named_parameters())[name].detach().clone()
    real_score = Scorer.score

    def worse(self, layer):
        scored = real_score(self, layer)
        return type(scored)(scored.perplexity * 2, scored.nll + 1.0, scored.tokens)

    monkeypatch.setattr(laser_module.Scorer, "score", worse)
    result = laser_search(tiny, ids, scan.matrices, LaserConfig(max_length=64, batch_size=2))
    assert (
        [a.kept for a in result.attempts] == [False]
        and result.attempts[0].rank_after < result.attempts[0].rank_before
    )
    assert torch.equal(dict(tiny.named_parameters())[name], before)


def test_order_and_budgets(tiny, ids, tmp_path):
    folder = tmp_path / "m"
    tiny.save_pretrained(folder, safe_serialization=True)
    scan = scan_model(folder, TYPES)
    by_layer = order_candidates(scan.matrices, "last_layer_first", TYPES)
    assert [m.layer for m in by_layer[:7]] == [2] * 7 and by_layer[0].module_type == "self_attn.q_proj"
    lowest = order_candidates(scan.matrices, "lowest_snr", TYPES)
    assert [m.snr for m in lowest] == sorted(m.snr for m in scan.matrices)
    result = laser_search(tiny, ids, lowest, LaserConfig(max_length=64, batch_size=2, max_attempts=3))
    assert len(result.attempts) == 3 and result.stopped_by == "max_attempts (3) spent"


def test_max_changes_stops_at_the_second_kept_change_and_says_so(tokenizer, ids, tmp_path):
    model = build_tiny_model(tokenizer, num_hidden_layers=3, seed=2).eval()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    lowest = order_candidates(scan_model(tmp_path / "m", TYPES).matrices, "lowest_snr", TYPES)
    unlimited = laser_search(model, ids, lowest, LaserConfig(max_length=64, batch_size=2, max_changes=len(lowest)))
    decisions = [a.kept for a in unlimited.attempts]
    second = [i for i, kept in enumerate(decisions) if kept][1]  # this tiny model keeps several changes
    for candidates in (lowest, lowest[: second + 1]):  # also when the second kept change is the last candidate
        fresh = build_tiny_model(tokenizer, num_hidden_layers=3, seed=2).eval()
        result = laser_search(fresh, ids, candidates, LaserConfig(max_length=64, batch_size=2, max_changes=2))
        assert [a.kept for a in result.attempts] == decisions[: second + 1]
        assert len(result.kept) == 2 and result.stopped_by == "max_changes (2) kept"


def test_a_spent_time_budget_tries_nothing(tiny, ids, tmp_path):
    tiny.save_pretrained(tmp_path / "m", safe_serialization=True)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    scan = scan_model(tmp_path / "m", TYPES)
    result = laser_search(tiny, ids, scan.matrices, LaserConfig(max_length=64, batch_size=2, time_budget_minutes=1e-9))
    assert result.attempts == [] and result.stopped_by == "time budget (1e-09 min) spent"
    assert result.final == result.baseline
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())


def test_gavish_donoho_search_truncates_to_the_gavish_donoho_rank(tiny, ids, tmp_path):
    planted_name = "model.layers.1.mlp.up_proj.weight"
    params = dict(tiny.named_parameters())
    with torch.no_grad():  # a rank-3 signal in noise: the rank Gavish-Donoho must find
        params[planted_name].copy_(torch.from_numpy(0.02 * planted(128, 64, rank=3, seed=7)))
    tiny.save_pretrained(tmp_path / "m", safe_serialization=True)
    original = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    scan = scan_model(tmp_path / "m", TYPES, mode="gavish_donoho")
    settings = LaserConfig(max_length=64, batch_size=2, threshold="gavish_donoho", max_changes=len(scan.matrices))
    result = laser_search(tiny, ids, scan.matrices, settings)
    assert result.threshold == "gavish_donoho" and len(result.attempts) == len(scan.matrices)
    ranks = {a.module + ".weight": a.rank_after for a in result.attempts}
    assert ranks[planted_name] == 3
    for name, rank in ranks.items():
        s = np.linalg.svd(original[name].numpy().astype(np.float64), compute_uv=False)
        assert rank == int((s > gavish_donoho_threshold(torch.from_numpy(s), *original[name].shape)).sum()), name
    for attempt in result.attempts:
        name = attempt.module + ".weight"
        expected = low_rank(original[name], "gavish_donoho")[0] if attempt.kept else original[name]
        assert torch.equal(params[name], expected), name


def test_laser_stage_on_wikitext_writes_a_loadable_model(tmp_path, tiny_model_dir, shared_data, tokenizer):
    config = load_config(
        data={
            "base_model": str(tiny_model_dir),
            "output_dir": str(tmp_path / "out"),
            "laser": {
                "eval_file": str(shared_data / "eval" / "wikitext2_test.raw"),
                "search_tokens": 256, "heldout_tokens": 128, "max_length": 128, "batch_size": 2, "max_attempts": 4,
                "order": "last_layer_first",
            },
        }
    ).config
    outputs = run_laser(config)
    log = json.loads(outputs.log.read_text())
    assert len(log["attempts"]) == 4 and log["heldout_tokens"] == 128 and log["prefix_cache"] is True
    assert outputs.plot.stat().st_size > 1000
    saved = load_model(outputs.model_dir)
    source = load_model(tiny_model_dir)
    text = (shared_data / "eval" / "wikitext2_test.raw").read_text(encoding="utf-8")
    tokens = tokenize_text(tokenizer, text, max_tokens=384)
    search, heldout = tokens[:256], tokens[256:]

    def ppl(model, ids):
        return perplexity_of_ids(model, ids, max_length=128, stride=128, batch_size=2)

    # the search scored exactly the first 256 tokens, never the held-out part
    assert log["search_tokens"] == 256
    assert log["baseline"]["nll"] == pytest.approx(ppl(source, search).nll, rel=1e-9)
    assert log["baseline"]["tokens"] == ppl(source, search).tokens
    assert log["heldout_before"]["nll"] == pytest.approx(ppl(source, heldout).nll, rel=1e-9)
    assert ppl(saved, heldout).perplexity == pytest.approx(outputs.heldout_after.perplexity, rel=1e-9)
    kept = set(log["kept"])
    for name, param in saved.named_parameters():
        same = torch.equal(param, dict(source.named_parameters())[name])
        assert same == (name.removesuffix(".weight") not in kept), name


def test_reported_perplexities_are_those_of_the_saved_bf16_model(tmp_path, tokenizer):
    """The search scores fp32 weights on CPU but saves bf16: each change is rounded before it is scored."""
    source = tmp_path / "bf16"
    build_tiny_model(tokenizer, num_hidden_layers=3, seed=2).to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text(own_text())
    laser = {"eval_file": str(text), "search_tokens": 128, "heldout_tokens": 64, "max_length": 64, "batch_size": 2}
    config = load_config(data={"base_model": str(source), "output_dir": str(tmp_path / "out"), "laser": laser}).config
    outputs = run_laser(config)
    assert outputs.result.kept  # some changed matrix went through the bf16 rounding
    assert {t.dtype for t in load_file(outputs.model_dir / "model.safetensors").values()} == {torch.bfloat16}
    saved = load_model(outputs.model_dir)  # float32, as the search ran on CPU
    tokens = tokenize_text(tokenizer, own_text(), max_tokens=192)
    search = perplexity_of_ids(saved, tokens[:128], max_length=64, stride=64, batch_size=2)
    heldout = perplexity_of_ids(saved, tokens[128:], max_length=64, stride=64, batch_size=2)
    assert outputs.result.final.nll == pytest.approx(search.nll, rel=1e-12)
    assert outputs.heldout_after.nll == pytest.approx(heldout.nll, rel=1e-12)
    # without a held-out part (laser.heldout_tokens: 0, or a file that ends there) the summary says it was not measured
    console = Console(record=True, width=200)
    console.print(laser_summary(replace(outputs, heldout_before=None, heldout_after=None)))
    text = console.export_text()
    row = [line for line in text.splitlines() if "held-out perplexity" in line]
    assert len(row) == 1 and "not measured (heldout_tokens: 0, or eval_file ends there)" in row[0]
    assert f"kept: {outputs.result.kept[0]}" in text and f"model: {outputs.model_dir}" in text


@pytest.mark.parametrize(
    "file_tokens, heldout_tokens, expected",
    [
        (400, None, 128),  # default: as many held-out tokens as search tokens ...
        (200, None, 72),  # ... or what the file has after the search part
        (129, None, 0),  # one token left: nothing to score
        (400, 0, 0),  # turned off
        (400, 50, 50),
    ],
)
def test_the_held_out_part_defaults_to_as_many_tokens_as_the_search(tmp_path, tokenizer, file_tokens, heldout_tokens,
                                                                     expected):
    ids = tokenize_text(tokenizer, own_text(200), max_tokens=file_tokens)
    text = tmp_path / "text.txt"
    text.write_text(tokenizer.decode(ids))
    laser = {"eval_file": str(text), "search_tokens": 128, "heldout_tokens": heldout_tokens}
    config = load_config(data={"base_model": "unused", "laser": laser}).config
    search, heldout = stages._eval_ids(config, None, tokenizer)
    assert torch.equal(search, ids[:128])
    if expected:
        assert torch.equal(heldout, ids[128 : 128 + expected])
    else:
        assert heldout is None


def test_laser_errors(tmp_path, tiny_model_dir):
    base = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path)}
    with pytest.raises(ForgeError, match="laser.eval_file: set a plain-text file"):
        run_laser(load_config(data=base).config)
    with pytest.raises(ForgeError, match=f"^laser.eval_file: {tmp_path} is a folder, not a file$"):
        run_laser(load_config(data={**base, "laser": {"eval_file": str(tmp_path)}}).config)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(ForgeError, match=r"has \d+ tokens; search_tokens = 4096 are needed"):
        run_laser(load_config(data={**base, "laser": {"eval_file": str(short)}}).config)
    with pytest.raises(ForgeError, match=r"has \d+ tokens; search_tokens \+ heldout_tokens = 4196 are needed"):
        run_laser(load_config(data={**base, "laser": {"eval_file": str(short), "heldout_tokens": 100}}).config)
    with pytest.raises(ForgeError, match=r"laser\.order = 'random': expected one of"):
        load_config(data={**base, "laser": {"order": "random"}})
    with pytest.raises(ForgeError, match=r"laser\.heldout_tokens = 1: expected 0 \(no held-out .*\) or a number >= 2"):
        load_config(data={**base, "laser": {"heldout_tokens": 1}})
    assert load_config(data={**base, "laser": {"heldout_tokens": 2}}).config.laser.heldout_tokens == 2


def test_a_laser_model_without_a_tokenizer_is_named_as_laser_model(tmp_path, tiny_model_dir, untokenized_model_dir):
    bare = untokenized_model_dir
    base = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path), "laser": {"model": str(bare)}}
    with pytest.raises(ForgeError, match=f"^laser.model: {bare} has no tokenizer"):
        run_laser(load_config(data=base).config)
    with pytest.raises(ForgeError, match=f"^base_model: {bare} has no tokenizer"):
        run_laser(load_config(data={"base_model": str(bare), "output_dir": str(tmp_path)}).config)


def no_scan(*args, **kwargs):
    raise AssertionError("scanned first")


def test_weights_that_transformers_renames_on_load_are_a_clear_laser_error(tmp_path, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    folder = tmp_path / "tiny-mixtral"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)  # experts stored apart, loaded fused
    tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(own_text())
    laser = {"eval_file": str(text), "search_tokens": 64, "max_length": 32, "module_types": ["w1"]}
    data = {"base_model": str(folder), "output_dir": str(tmp_path / "out"), "laser": laser}
    expected = (r"^laser\.module_types: 4 of 4 matrices, e\.g\. model\.layers\.\d\.block_sparse_moe\.experts\.\d\."
                r"w1\.weight, are not weights of the model as .*: "
                r"self_attn\.k_proj, self_attn\.o_proj, self_attn\.q_proj, self_attn\.v_proj$")
    monkeypatch.setattr(stages, "scan_matrices", no_scan)  # fails fast: before the SNR scan, not after it
    with pytest.raises(ForgeError, match=expected):
        run_laser(load_config(data=data).config)


class Loaded(Exception):
    """Raised in place of loading the tokenizer: the output folder was accepted."""


def test_laser_refuses_an_output_folder_holding_a_model_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    def load_tokenizer(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(stages, "load_tokenizer", load_tokenizer)
    base = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path / "out")}
    saved = tmp_path / "out" / "laser" / "model"
    saved.mkdir(parents=True)
    with pytest.raises(Loaded):  # an empty folder is fine
        run_laser(load_config(data=base).config)
    (saved / "config.json").write_text("{}")
    refused = "already holds a model; choose another folder or remove it$"
    with pytest.raises(ForgeError, match=rf"^output_dir: {re.escape(str(saved))} {refused}"):
        run_laser(load_config(data=base).config)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ForgeError, match=rf"^laser\.output_dir: {re.escape(str(mine))} {refused}"):
        run_laser(load_config(data={**base, "laser": {"output_dir": str(mine)}}).config)
    with pytest.raises(Loaded):  # a folder that does not exist yet is fine
        run_laser(load_config(data={**base, "laser": {"output_dir": str(tmp_path / "new")}}).config)


def test_laser_refuses_to_write_into_its_input_model(tmp_path, tiny_model_dir):
    into = "would write into the input model"
    inside = {"base_model": str(tiny_model_dir), "laser": {"output_dir": str(tiny_model_dir)}}
    with pytest.raises(ForgeError, match=rf"^laser\.output_dir: {re.escape(str(tiny_model_dir))} {into}"):
        run_laser(load_config(data=inside).config)
    again = tmp_path / "out" / "laser" / "model"  # laser run again on its own output, same output_dir
    shutil.copytree(tiny_model_dir, again)
    expected = rf"^output_dir: {re.escape(str(again.parent))} {into} {re.escape(str(again))}; choose another folder$"
    with pytest.raises(ForgeError, match=expected):
        run_laser(load_config(data={"base_model": str(again), "output_dir": str(tmp_path / "out")}).config)


def test_a_bf16_model_whose_config_declares_no_dtype_is_saved_in_bf16(tmp_path, tokenizer):
    source = tmp_path / "bf16"
    build_tiny_model(tokenizer, seed=2).to(torch.bfloat16).save_pretrained(source)
    tokenizer.save_pretrained(source)
    declared = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({k: v for k, v in declared.items() if "dtype" not in k}))
    text = tmp_path / "text.txt"
    text.write_text(own_text())
    laser = {"eval_file": str(text), "search_tokens": 64, "max_length": 32, "batch_size": 2, "max_attempts": 1}
    config = load_config(data={"base_model": str(source), "output_dir": str(tmp_path / "out"), "laser": laser}).config
    outputs = run_laser(config)
    assert {t.dtype for t in load_file(outputs.model_dir / "model.safetensors").values()} == {torch.bfloat16}


def test_an_eval_file_that_is_not_utf8_is_refused_naming_the_key(tmp_path):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\u00e9 text to score".encode("latin-1"))
    config = load_config(data={"laser": {"eval_file": str(text)}}).config
    with pytest.raises(ForgeError, match=rf"^laser\.eval_file: {re.escape(str(text))}: not UTF-8 text \(byte 3"):
        stages._eval_ids(config, None, tokenizer=None)
