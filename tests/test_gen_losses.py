"""The SFT loss on response tokens: equal to torch's shifted CE with ignore_index, per row too."""

import torch
import torch.nn.functional as F

from kdshield.training.losses import masked_token_nll, response_ce


def test_response_ce_equals_shifted_cross_entropy_and_rows_add_up():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100],
                           [-100, 1, 2, 3, 5, 9],
                           [-100, -100, -100, -100, -100, -100]])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(response_ce(logits, labels), ref)
    nll, count = masked_token_nll(logits, labels)
    assert count.tolist() == [2, 5, 0]
    row1 = F.cross_entropy(logits[1, :-1], labels[1, 1:], reduction="sum")
    assert torch.allclose(nll[1], row1) and nll[2] == 0


def test_response_ce_ignores_logits_at_unlabelled_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, -100, 2, 3]])
    changed = logits.clone()
    changed[0, 0] += 100.0   # predicts a prompt token: must not matter
    changed[0, 3] += 100.0   # the last position predicts nothing
    assert torch.allclose(response_ce(logits, labels), response_ce(changed, labels))
