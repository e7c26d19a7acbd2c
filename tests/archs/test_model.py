import json

import pytest
import torch

from archs.model import PRESETS, LanguageModel, ModelSpec, SpecError
from registry import MIXERS


def small(**kw) -> ModelSpec:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=1024)
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize("t", [128, 512, 1024])
@pytest.mark.parametrize("positions", ["learned", "rope", "alibi", "none"])
def test_forward_lengths(t, positions):
    model = LanguageModel(small(positions=positions)).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (1, t)))
    assert logits.shape == (1, t, 64) and torch.isfinite(logits).all()


def test_learned_positions_overflow_is_a_clear_error():
    model = LanguageModel(small(positions="learned", max_seq_len=32))
    model(torch.randint(0, 64, (1, 32)))  # up to the limit works
    with pytest.raises(ValueError) as err:
        model(torch.randint(0, 64, (1, 33)))
    msg = str(err.value)
    assert "max_seq_len=32" in msg and "ModelSpec(max_seq_len=33)" in msg and "rope" in msg
    assert not isinstance(err.value, IndexError)


def test_learned_positions_overflow_while_decoding():
    model = LanguageModel(small(positions="learned", max_seq_len=8)).eval()
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.generate(torch.randint(0, 64, (1, 6)), 5)


def test_spec_json_round_trip():
    spec = small(mixer_options={"attention": {"n_kv_heads": 2, "impl": "math"}}, mlp="gelu", short_conv=4)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.resolved_layers == spec.resolved_layers
    data = json.loads(spec.to_json())
    layer0 = data["resolved_layers"][0]
    assert layer0["mixer"] == "attention"
    assert {k: layer0["options"][k] for k in ("n_heads", "n_kv_heads", "impl", "positions")} == {
        "n_heads": 4, "n_kv_heads": 2, "impl": "math", "positions": "rope"}


def test_spec_errors_name_the_field():
    with pytest.raises(SpecError, match="positions"):
        small(positions="sinusoidal")
    with pytest.raises(SpecError, match="no field 'n_layer'.*did you mean 'n_layers'"):
        ModelSpec.from_dict({"n_layer": 3})
    with pytest.raises(SpecError, match="no option 'n_head'"):
        small(mixer_options={"attention": {"n_head": 2}})
    with pytest.raises(SpecError, match="unknown mixer 'atention'.*did you mean 'attention'"):
        small(mixer="atention")
    with pytest.raises(SpecError, match="no layer uses"):
        small(mixer_options={"sliding_window_attention": {"window": 3}})


def test_model_knobs_reach_mixers():
    spec = small(n_heads=8, positions="alibi")
    opts = spec.resolved_layers[0].options
    assert opts["n_heads"] == 8 and opts["positions"] == "alibi"
    # an explicit mixer option wins over the model-level knob
    assert small(mixer_options={"attention": {"n_heads": 2}}).resolved_layers[0].options["n_heads"] == 2


@pytest.mark.parametrize("spec", [small(), small(positions="learned"), small(short_conv=4, positions="alibi"),
                                  small(layers=["attention", "sliding_window_attention"],
                                        mixer_options={"sliding_window_attention": {"window": 4}}),
                                  small(n_layers=4, pattern="MSAW", short_conv=4, positions="rope",
                                        mixer_options={"mamba2": {"headdim": 16, "d_state": 8},
                                                       "sliding_window_attention": {"window": 4}})],
                         ids=["attention", "learned", "alibi-conv", "window", "hybrid-MSAW"])
def test_generate_equals_greedy_full_forward(spec):
    model = LanguageModel(spec).eval()
    ids = torch.randint(0, 64, (2, 5))
    out = model.generate(ids, 12)
    ref = ids
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_sampling_is_seeded():
    model = LanguageModel(small()).eval()
    ids = torch.randint(0, 64, (1, 3))
    a = model.generate(ids, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_loss_only_where_labelled():
    model = LanguageModel(small())
    ids = torch.randint(0, 64, (2, 10))
    targets = torch.full((2, 10), -100)
    targets[:, 7] = 3
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, 7], targets[:, 7])
    torch.testing.assert_close(model.loss(ids, targets), expected)


def test_tied_embeddings_and_param_count():
    tied, untied = LanguageModel(small()), LanguageModel(small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 64 * 32
    assert tied.num_params(non_embedding=True) == tied.num_params() - 64 * 32


def test_flops_and_state_bytes():
    model = LanguageModel(small())
    assert model.flops_per_token(256) > model.flops_per_token(64) > 2 * model.num_params(non_embedding=True)
    cache = model.init_cache(1, 20)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 20)), cache)
    assert cache.nbytes() == model.state_bytes(20)


def test_classic_transformer_preset():
    spec = ModelSpec.from_preset("classic-transformer")
    model = LanguageModel(spec)
    assert spec.positions == "learned" and model.pos is not None
    assert model.lm_head.bias is None
    assert {layer.mixer for layer in spec.resolved_layers} == {"attention"}


def test_hybrid_cache_is_constant_for_ssm_layers():
    model = LanguageModel(small(n_layers=4, pattern="MMMA", positions="none")).eval()
    ssm = [b.mixer.state_bytes(n) for b in model.blocks[:3] for n in (10, 1000)]
    assert len(set(ssm)) == 1  # per-token cost of an SSM layer does not grow with the context
    assert model.blocks[3].mixer.state_bytes(1000) == 100 * model.blocks[3].mixer.state_bytes(10)


def test_presets_build():
    assert {"mamba", "mamba2"} <= set(MIXERS.names())
    for name in PRESETS:
        model = LanguageModel(ModelSpec.from_preset(name, vocab_size=64, d_model=64))
        assert model(torch.randint(0, 64, (1, 9))).shape == (1, 9, 64)
    with pytest.raises(SpecError, match="unknown preset 'jamb'.*did you mean 'jamba'"):
        ModelSpec.from_preset("jamb")


HYBRIDS = {
    # the linear-attention family between attention and mamba
    "linear": (small(n_layers=8, pattern="GDAMRNLB", short_conv=4, positions="rope",
                     mixer_options={"gated_deltanet": {"head_dim": 8, "num_heads": 2},
                                    "based": {"num_heads": 4, "num_key_value_heads": 4, "feature_dim": 4},
                                    "retention": {"num_heads": 4}, "linear_attention": {"num_heads": 4},
                                    "gla": {"chunk_size": 16}, "deltanet": {"chunk_size": 16}}),
               ["gla", "deltanet", "attention", "mamba", "retention", "gated_deltanet", "linear_attention", "based"]),
    # the long-convolution, LTI and gated-RNN family between attention and mamba
    "long_conv": (small(n_layers=7, n_heads=2, pattern="KHYACQM", short_conv=4, positions="rope", mlp="swiglu",
                        mixer_options={"hyena": {"l_max": 32}, "h3": {"head_dim": 2}}),
                  ["s4d", "h3", "hyena", "attention", "base_conv", "rg_lru", "mamba"]),
}


@pytest.mark.parametrize("family", HYBRIDS)
@pytest.mark.parametrize("prefill", [1, 6])
def test_hybrid_of_a_family_decodes_as_its_forward(family, prefill):
    """A prefill then one-token steps through the model's caches give the full forward's logits."""
    spec, mixers = HYBRIDS[family]
    assert [layer.mixer for layer in spec.resolved_layers] == mixers
    torch.manual_seed(0)
    model = LanguageModel(spec).eval()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_cache(2, 40)
        steps = [model(ids[:, :prefill], cache)]
        steps += [model(ids[:, t: t + 1], cache) for t in range(prefill, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
