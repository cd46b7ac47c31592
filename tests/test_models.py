"""The transformers causal LM built from generated layers (ttr_codegen.models): generation with the cache
equals full forwards, padded prompts generate as unpadded ones, save_pretrained/from_pretrained round-trips,
and the model trains."""

import torch

from ttr_codegen.models import CACHE_FIELD, TTRConfig, TTRForCausalLM

# A hybrid: three Gated DeltaNet blocks, then softmax attention, with short convolutions and gated norms.
HYBRID = dict(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_heads=2, pad_token_id=0,
              layers=["gated_delta_rule", "gated_delta_rule", "gated_delta_rule", "softmax_attention"],
              layer_kwargs={"use_short_conv": True, "conv_size": 3, "use_output_gate": True})


def _model(**overrides) -> TTRForCausalLM:
    torch.manual_seed(0)
    return TTRForCausalLM(TTRConfig(**{**HYBRID, **overrides})).double().eval()


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_with_the_cache_equals_full_forwards():
    model = _model()
    ids = torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, _greedy_without_cache(model, ids, 6))
    # The logits of a cached step equal the full forward's at that position.
    out = model(ids[:, :5], use_cache=True)
    step = model(ids[:, 5:6], past_key_values=getattr(out, CACHE_FIELD), use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], model(ids[:, :6], use_cache=False).logits[:, -1])


def test_generation_reads_each_token_once():
    """After the prompt, every step feeds the model one token: the cache, not the whole sequence again."""
    model = _model()
    lengths = []
    forward = model.model.forward
    model.model.forward = lambda *a, **k: (lengths.append(k["input_ids"].shape[1]), forward(*a, **k))[1]
    model.generate(torch.randint(1, 40, (2, 9), generator=torch.Generator().manual_seed(5)), max_new_tokens=4,
                   do_sample=False)
    assert lengths == [9, 1, 1, 1], lengths


def test_left_padded_prompts_generate_as_alone():
    model = _model()
    generator = torch.Generator().manual_seed(2)
    short, long = torch.randint(1, 40, (1, 5), generator=generator), torch.randint(1, 40, (1, 8), generator=generator)
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[0, 3:], model.generate(short, max_new_tokens=4, do_sample=False)[0])
    assert torch.equal(generated[1], model.generate(long, max_new_tokens=4, do_sample=False)[0])


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = TTRForCausalLM.from_pretrained(tmp_path).double().eval()
    assert loaded.config.layers == HYBRID["layers"] and loaded.config.layer_kwargs == HYBRID["layer_kwargs"]
    ids = torch.randint(1, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_the_model_trains():
    model = _model(layers=["gated_delta_rule", "linear_attention"], num_hidden_layers=2).train()
    ids = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(4))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):  # memorise one batch
        loss = model(ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert losses[-1] < 0.5 * losses[0], losses
