"""LASER-RMT: truncation ranks, exact restore of rejected changes, the exact layer-input cache, the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dolphin_forge.config import LaserConfig, load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.perplexity import perplexity_of_ids, tokenize_text
from dolphin_forge.models.load import load_model
from dolphin_forge.spectral import laser as laser_module
from dolphin_forge.spectral.laser import Scorer, laser_search, low_rank, order_candidates
from dolphin_forge.spectral.scan import scan_model
from dolphin_forge.spectral.stages import run_laser
from tests.spectral.reference import planted
from tests.tiny import build_tiny_model

TYPES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


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
    assert again.nll == pytest.approx(perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2).nll, rel=1e-12)


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
    assert result.final.nll == pytest.approx(perplexity_of_ids(tiny, ids, max_length=64, stride=64, batch_size=2).nll, rel=1e-12)
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
    assert [a.kept for a in result.attempts] == [False] and result.attempts[0].rank_after < result.attempts[0].rank_before
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
    text = (shared_data / "eval" / "wikitext2_test.raw").read_text(encoding="utf-8")
    heldout = tokenize_text(tokenizer, text, max_tokens=384)[256:]
    measured = perplexity_of_ids(saved, heldout, max_length=128, stride=128, batch_size=2)
    assert measured.perplexity == pytest.approx(outputs.heldout_after.perplexity, rel=1e-9)
    kept = set(log["kept"])
    source = load_model(tiny_model_dir)
    for name, param in saved.named_parameters():
        same = torch.equal(param, dict(source.named_parameters())[name])
        assert same == (name.removesuffix(".weight") not in kept), name


def test_laser_errors(tmp_path, tiny_model_dir):
    base = {"base_model": str(tiny_model_dir), "output_dir": str(tmp_path)}
    with pytest.raises(ForgeError, match="laser.eval_file: set a plain-text file"):
        run_laser(load_config(data=base).config)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    with pytest.raises(ForgeError, match=r"has \d+ tokens; search_tokens \+ heldout_tokens = 4096"):
        run_laser(load_config(data={**base, "laser": {"eval_file": str(short)}}).config)
    with pytest.raises(ForgeError, match=r"laser\.order = 'random': expected one of"):
        load_config(data={**base, "laser": {"order": "random"}})
