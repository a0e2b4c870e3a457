"""GPT shapes: the GPT-2 configs have GPT-2's parameter counts; tying shares one matrix."""

from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import ModelConfig
from trainer.models import build_model, token_losses

CONF = Path(__file__).resolve().parent.parent / "trainer" / "conf" / "model"


@pytest.mark.parametrize("name,expected", [("gpt2_124m", 124_475_904), ("gpt2_350m", 354_871_296)])
def test_gpt2_shapes(name, expected):
    cfg = ModelConfig(**yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == expected  # GPT-2 small/medium with the vocabulary padded to 50304


def test_tied_embeddings_share_storage():
    tied = build_model(ModelConfig(n_layer=1, d_model=32, vocab_size=64, max_seq_len=16))
    assert tied.lm_head.weight is tied.wte.weight
    untied = build_model(ModelConfig(n_layer=1, d_model=32, vocab_size=64, max_seq_len=16, tie_embeddings=False))
    assert untied.num_params() == tied.num_params() + 64 * 32


def test_token_losses_and_causality():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, max_seq_len=16))
    x = torch.randint(0, 64, (3, 9))
    loss = token_losses(model, x)
    assert loss.shape == (3, 8) and torch.isfinite(loss).all()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 64  # changing the last token changes only the last position's target
    diff = (token_losses(model, y) - loss).abs()
    assert diff[:, :-1].max() == 0 and diff[:, -1].min() > 0
    with pytest.raises(ValueError, match="model.max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_frozen_token_losses_equal_token_losses():
    from trainer.models import frozen_token_losses

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, max_seq_len=16)).eval()
    for shape in ((3, 9), (5, 13), (2, 5)):  # the buffer grows, then serves a smaller batch
        x = torch.randint(0, 64, shape)
        with torch.no_grad():
            expected = token_losses(model, x)
        got = frozen_token_losses(model, x)
        assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-6, atol=1e-5)
