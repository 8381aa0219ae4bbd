"""Edge cases of the robust objective's LM-head paths (review of issue 9)."""

import warnings

import pytest
import torch
from tiny_models import make_batch
from transformers import LlamaConfig, LlamaForCausalLM

from modkern.objective.robust import RobustConfig, robust_loss

V, PADDED_V, H = 120, 128, 32
INFO = dict(
    kind="llama",
    vocab_size=V,
    hidden_size=H,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    text_token_range=(3, V),
    token_ids={},
)


class PaddedHeadLM(LlamaForCausalLM):
    """A padded LM head whose forward keeps the first ``unpadded_vocab_size`` logits (as
    transformers' Inkling does): the chunked path must not compute a softmax over the padding."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[..., : self.config.unpadded_vocab_size]
        return out


def padded_head_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=PADDED_V,
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config.unpadded_vocab_size = V
    model = PaddedHeadLM(config).train()
    with torch.no_grad():  # padding rows that would take real probability mass
        model.lm_head.weight[V:].mul_(20.0)
    return model


def test_chunked_head_refuses_a_model_that_slices_its_padded_vocabulary():
    model = padded_head_model()
    batch = make_batch(INFO, 3, seed=1, answer_lens=[2, 3, 1])
    cfg = RobustConfig(lam=0.5, steps=1, init="zero", lm_head="rows")
    torch.manual_seed(0)
    rows = robust_loss(model, batch, cfg)
    with pytest.raises(ValueError, match="unpadded_vocab_size.*lm_head='rows'"):
        robust_loss(model, batch, cfg.replace(lm_head="chunked"))
    # auto over the budget falls back to the answer-row path (the model's own sliced logits)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        auto = robust_loss(model, batch, cfg.replace(lm_head="auto", logits_budget_mb=1e-6))
    assert any("chunked LM-head path cannot run" in str(w.message) for w in caught)
    for part in ("loss", "ce_clean", "ce_adv", "consistency"):
        torch.testing.assert_close(getattr(auto, part).detach(), getattr(rows, part).detach())


def test_chunked_head_refuses_an_output_multiplier():
    model = padded_head_model()
    model.config.unpadded_vocab_size = PADDED_V  # no slicing: only the multiplier is refused
    model.config.output_multiplier = 2.0
    batch = make_batch(INFO, 2, seed=2, answer_lens=[1, 2])
    with pytest.raises(ValueError, match="output_multiplier.*lm_head='rows'"):
        robust_loss(model, batch, RobustConfig(lm_head="chunked"))
    model.config.output_multiplier = 1.0  # the identity is fine
    assert torch.isfinite(robust_loss(model, batch, RobustConfig(lm_head="chunked")).loss)


def test_config_chunk_size_accepts_any_integral():
    np = pytest.importorskip("numpy")
    model = padded_head_model()
    model.config.unpadded_vocab_size = PADDED_V
    batch = make_batch(INFO, 2, seed=3, answer_lens=[2, 2])
    cfg = RobustConfig(lm_head="chunked", chunk_size=np.int64(2))
    assert type(cfg.chunk_size) is int
    assert torch.isfinite(robust_loss(model, batch, cfg).loss)
