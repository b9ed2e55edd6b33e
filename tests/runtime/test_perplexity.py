"""Perplexity follows the transformers sliding-window recipe exactly, on tiny and real models."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gcupipe.runtime.perplexity import (  # noqa: E402
    greedy_generate,
    perplexity,
    windows,
)


def test_windows_score_every_token_once_except_window_starts():
    spans = windows(1100, window=512, stride=512)
    assert spans == [(0, 512, 1), (512, 1024, 513), (1024, 1100, 1025)]
    overlapping = windows(1000, window=512, stride=256)
    scored = [t for _, end, first in overlapping for t in range(first, end)]
    assert scored == list(range(1, 1000))


def test_uniform_model_has_perplexity_equal_to_vocab():
    vocab = 37

    def uniform(input_ids):
        return torch.zeros(input_ids.shape[0], input_ids.shape[1], vocab)

    result = perplexity(uniform, list(range(30)) * 40, window=64, stride=64)
    assert result.ppl == pytest.approx(vocab, rel=1e-6)
    assert result.scored_tokens == 1200 - math.ceil(1200 / 64)


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _transformers_guide_ppl(model, ids, window, stride):
    """The transformers perplexity guide, verbatim in spirit: labels masked with -100."""
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, x.size(1), stride):
        end = min(begin + window, x.size(1))
        target_len = end - prev_end
        inputs = x[:, begin:end]
        labels = inputs.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        valid = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * valid
        count += valid
        prev_end = end
        if end == x.size(1):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("stride", [64, 32])
def test_matches_transformers_labels_loss_on_tiny_llama(stride):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    expected, count = _transformers_guide_ppl(model, ids, 64, stride)
    result = perplexity(model, ids, window=64, stride=stride)
    assert result.scored_tokens == count
    assert result.ppl == pytest.approx(expected, rel=1e-5)


def test_position_scores_are_what_the_logits_say_at_each_position():
    model = _tiny_llama()
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    result = perplexity(model, ids, window=64, stride=64)
    scores = result.positions
    assert len(scores.top1) == len(scores.margin) == result.scored_tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids[64:128]])).logits[0]
    index = 63  # the second window's first scored position predicts token 65
    top2 = logits[0].topk(2)
    assert scores.top1[index] == int(top2.indices[0])
    assert scores.margin[index] == pytest.approx(float(top2.values[0] - top2.values[1]), abs=1e-5)
    want = float(torch.log_softmax(logits[0], -1)[ids[65]])
    assert scores.target_logprob[index] == pytest.approx(want, abs=1e-5)
    assert -sum(scores.target_logprob) == pytest.approx(result.nll_sum, rel=1e-6)


def test_greedy_generation_continues_with_the_top1_of_each_step():
    """Each new token is the top-1 of the sequence so far (checked in float64, where the
    re-forward of the longer sequence cannot turn a near-tie the other way)."""
    model = _tiny_llama().double()
    new = greedy_generate(model, [1, 2, 3], max_new_tokens=6)
    assert len(new) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, *new]])).logits[0]
    assert logits[2:-1].argmax(-1).tolist() == new
